"""JPEG / PNG (and other formats Pillow reads) backend: the fallback for files that are not TIFF.

These cannot be read lazily: the header is read at open, the pixels are decoded
once on first use and kept in memory (plain JPEG and PNG through imagecodecs,
the rest through Pillow). ``PIL.Image.MAX_IMAGE_PIXELS`` is raised to
:data:`~stmorph.im.slide._base.MAX_PIL_PIXELS` while opening, on purpose:
whole-slide JPEGs are large. Truncated files raise
:class:`~stmorph.errors.ImageError` (a missing end marker is detected at open, a
corrupt stream when decoding); ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` is never
set. EXIF orientation is ignored: spot coordinates refer to the stored pixel
grid.
"""

from __future__ import annotations

import os
import threading

import numpy as np

from ...errors import ImageError
from . import _base
from ._base import _ARRAY_TILE, Slide, _ArrayLevel, _shrink_to, _ToRGB8


class _PilLevel(_ArrayLevel):
    """JPEG/PNG/...: header read at open, pixels decoded once on first use."""

    def __init__(self, slide: Slide, path: str, size: tuple[int, int]):
        self.slide = slide
        self.path = path
        self.width, self.height = size
        self.tile = (_ARRAY_TILE, _ARRAY_TILE)
        self.array = None
        self.convert = None
        self._lock = threading.Lock()

    def _load(self):
        with self._lock:
            if self.array is None:
                _check_decode_memory(self.path, self.width, self.height, self.slide.dtype, self.slide.format)
                arr, convert = _pil_decode(self.path)
                if arr.shape[:2] != (self.height, self.width):
                    msg = f"decoded size {arr.shape[:2]} differs from the header {(self.height, self.width)}."
                    raise ImageError(msg, self.path)
                self.array, self.convert = arr, convert
        return self.array

    def read(self, y0, y1, x0, x1, cache=True):
        self._load()
        return super().read(y0, y1, x0, x1)

    def thumbnail(self, max_side: int) -> np.ndarray | None:
        """Thumbnail without decoding the full image (JPEG draft mode), or None."""
        if self.array is not None:
            return None
        from PIL import Image

        with _pil_open(self.path) as im:
            if im.format != "JPEG":
                return None
            scale = max_side / max(self.width, self.height)
            try:
                im.draft("RGB", (max(1, int(self.width * scale)), max(1, int(self.height * scale))))
                im.load()
            except (OSError, SyntaxError, ValueError) as e:
                msg = f"cannot decode image: {e}"
                raise ImageError(msg, self.path) from e
            if im.mode not in ("RGB", "L"):
                return None
            arr = np.asarray(im.convert("RGB"))
        return _shrink_to(arr, max_side, Image)



# --------------------------------------------------------------------------- PIL helpers
_PIL_LIMIT_LOCK = threading.Lock()


def max_decode_bytes() -> int | None:
    """Most bytes a whole-image (JPEG/PNG) decode may allocate: ``$STMORPH_MAX_DECODE_BYTES``, else 80% of
    the memory available now (Linux ``MemAvailable``), else None (no bound beyond :data:`MAX_PIL_PIXELS`)."""
    env = os.environ.get("STMORPH_MAX_DECODE_BYTES")
    if env:
        try:
            return int(float(env))
        except ValueError:
            pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(int(line.split()[1]) * 1024 * 0.8)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _check_decode_memory(path: str, width: int, height: int, dtype, fmt: str) -> None:
    """ImageError before decoding a JPEG/PNG whole when that would not fit in memory.

    Counts the decoded array (up to 4 samples of ``dtype``), plus Pillow's working copy for the formats
    imagecodecs does not decode.
    """
    per_px = 4 * np.dtype(dtype).itemsize + (0 if fmt in ("JPEG", "PNG") else 4)
    need = int(width) * int(height) * per_px
    budget = max_decode_bytes()
    if budget is not None and need > budget:
        msg = (f"the {width} x {height} px {fmt} would take about {need / 2**30:.1f} GiB to decode whole, more than "
               f"the {budget / 2**30:.1f} GiB of memory it may use; {fmt} cannot be read lazily: convert it to a "
               "tiled pyramidal TIFF (e.g. vips tiffsave IN OUT.tif --tile --pyramid --compression jpeg), which is "
               "read tile by tile.")
        raise ImageError(msg, path)


def _too_big_msg() -> str:
    return (f"image is larger than {_base.MAX_PIL_PIXELS} pixels, too large to decode whole; convert it to a tiled "
            "pyramidal TIFF (e.g. with tifffile or vips) so it can be read lazily.")


class _pil_open:
    """``Image.open`` with the decompression-bomb limit raised deliberately and errors as ImageError."""

    def __init__(self, path: str):
        self.path = path
        self.im = None

    def __enter__(self):
        import warnings

        from PIL import Image, UnidentifiedImageError

        try:
            with _PIL_LIMIT_LOCK, warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                old = Image.MAX_IMAGE_PIXELS
                Image.MAX_IMAGE_PIXELS = _base.MAX_PIL_PIXELS
                try:
                    self.im = Image.open(self.path)
                finally:
                    Image.MAX_IMAGE_PIXELS = old
        except Image.DecompressionBombError as e:
            self.im = None
            raise ImageError(_too_big_msg(), self.path) from e
        except UnidentifiedImageError as e:
            msg = "not a readable image (unknown format); expected TIFF, JPEG or PNG."
            raise ImageError(msg, self.path) from e
        except (OSError, SyntaxError, ValueError) as e:
            msg = f"cannot read image: {e}"
            raise ImageError(msg, self.path) from e
        w, h = self.im.size
        if w * h > _base.MAX_PIL_PIXELS:
            self.im.close()
            raise ImageError(_too_big_msg(), self.path)
        return self.im

    def __exit__(self, *exc):
        if self.im is not None:
            self.im.close()


def _check_end_marker(path: str, fmt: str) -> None:
    """Cheap truncation test: a JPEG ends with EOI (FFD9), a PNG with its IEND chunk."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        f.seek(max(0, size - 4096))
        tail = f.read()
    if fmt == "JPEG" and b"\xff\xd9" not in tail:
        msg = "JPEG file is truncated (no end-of-image marker); re-export or re-copy the image."
        raise ImageError(msg, path)
    if fmt == "PNG" and b"IEND" not in tail:
        msg = "PNG file is truncated (no IEND chunk); re-export or re-copy the image."
        raise ImageError(msg, path)


def _pil_decode(path: str) -> tuple[np.ndarray, _ToRGB8]:
    """Decode a whole JPEG/PNG/... image; returns the raw array and its converter.

    Plain JPEG and PNG go through imagecodecs (libjpeg-turbo / libpng): one
    allocation of the decoded size, GIL released. Other formats and modes
    (palette, CMYK, ...) go through Pillow.
    """
    with _pil_open(path) as im:
        fmt, mode = im.format, im.mode
    arr = None
    if (fmt == "JPEG" and mode in ("RGB", "L")) or (
        fmt == "PNG" and mode in ("RGB", "RGBA", "L", "LA", "I", "I;16", "I;16B")
    ):
        arr = _codecs_decode(path, fmt)
        if arr is not None and arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[:, :, 0]
    if arr is None:
        arr = _pillow_decode(path)
    samples = 1 if arr.ndim == 2 else arr.shape[2]
    return arr, _ToRGB8(arr.dtype, samples, path=path)


def _codecs_decode(path: str, fmt: str) -> np.ndarray | None:
    try:
        import imagecodecs
    except ImportError:  # pragma: no cover - imagecodecs is a dependency
        return None
    func = getattr(imagecodecs, "jpeg8_decode" if fmt == "JPEG" else "png_decode", None)
    if func is None:  # pragma: no cover
        return None
    with open(path, "rb") as f:
        data = f.read()
    try:
        return np.asarray(func(data))
    except Exception as e:  # noqa: BLE001 - codec errors on corrupt data
        msg = f"cannot decode {fmt} image (truncated or corrupt?): {e}"
        raise ImageError(msg, path) from e


def _pillow_decode(path: str) -> np.ndarray:
    with _pil_open(path) as im:
        try:
            im.load()
        except (OSError, SyntaxError, ValueError) as e:
            msg = f"cannot decode image (truncated or corrupt?): {e}"
            raise ImageError(msg, path) from e
        mode = im.mode
        if mode in ("RGB", "L", "RGBA", "LA"):
            arr = np.asarray(im)
        elif mode.startswith("I;16") or mode == "I":
            arr = np.asarray(im)
            if mode == "I":  # 32-bit int container of (usually 16-bit) PNG data
                if arr.min() < 0 or arr.max() > 65535:
                    msg = "32-bit integer image is outside the 16-bit range; convert it to 8- or 16-bit."
                    raise ImageError(msg, path)
                arr = arr.astype(np.uint16)
            else:
                arr = arr.astype(np.uint16, copy=False)
        elif mode in ("P", "PA", "1", "CMYK", "YCbCr", "LAB", "HSV", "RGBX", "RGBa", "La"):
            alpha = mode in ("PA", "RGBa", "La") or (mode == "P" and "transparency" in im.info)
            arr = np.asarray(im.convert("RGBA" if alpha else "RGB"))
        else:
            msg = f"unsupported image mode {mode!r}; expected RGB, RGBA, grayscale or 16-bit grayscale."
            raise ImageError(msg, path)
    return arr



def open_pil(path: str, cache_bytes: int) -> Slide:
    with _pil_open(path) as im:
        fmt = im.format or "image"
        size = im.size
        mode = im.mode
    if fmt in ("JPEG", "PNG"):
        _check_end_marker(path, fmt)
    dtype = np.uint16 if mode.startswith("I;16") or mode == "I" else np.uint8
    slide = Slide([], path=path, dtype=dtype, fmt=fmt, cache_bytes=cache_bytes, backend="pil")
    slide._levels = [_PilLevel(slide, path, size)]
    return slide


