"""Lazy access to the full-resolution H&E image of a section.

:func:`open_slide` returns a :class:`Slide` that reads only what a caller asks
for:

- **TIFF / BigTIFF** (plain, OME-TIFF, SVS-like) through :mod:`tifffile`. Tiled
  and stripped pages are read segment by segment (a tile or a strip at a time):
  only the tiles/strips a region touches are read and decoded, and decoded
  segments are kept in a small LRU cache bounded in bytes
  (``cache_bytes``). Uncompressed contiguous pages are memory-mapped. Pyramid
  levels (``series[0].levels``: SubIFDs, SVS, OME) are exposed as
  ``Slide.level_shapes``. Layouts the segment reader does not cover (several
  pages per level, e.g. one page per channel) go through tifffile's zarr store.
- **JPEG / PNG** (and other formats Pillow reads) cannot be read lazily: the
  header is read by :func:`open_slide`, the pixels are decoded once on first use
  and kept in memory as uint8 RGB. ``PIL.Image.MAX_IMAGE_PIXELS`` is raised to
  :data:`MAX_PIL_PIXELS` while opening, on purpose: whole-slide JPEGs are large.
  Truncated files raise :class:`~stmorph.errors.ImageError` (a missing end
  marker is detected by :func:`open_slide`, a corrupt stream when decoding);
  ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` is never set. EXIF orientation is
  ignored: spot coordinates refer to the stored pixel grid.
- **numpy arrays**: an in-memory image, ``(h, w)``, ``(h, w, 1|2|3|4)``.

Every read returns **uint8 RGB** ``(h, w, 3)``:

- grayscale (and gray + alpha) is replicated to three channels;
- alpha (RGBA, gray + alpha) is composited on white (the background of a
  brightfield slide), so fully transparent pixels are white and opaque pixels
  keep their colour;
- 16-bit (and 32-bit unsigned) data is scaled by the range of its type,
  ``v * 255 / (2**bits - 1)``, where ``bits`` is the TIFF ``BitsPerSample``
  (e.g. 12 for 12-bit data stored in uint16) or the dtype's width; this keeps the
  intensities of every tile consistent, which a per-tile data range would not;
- palette TIFFs go through their colour map, ``MinIsWhite`` is inverted;
- floating-point arrays in ``[0, 1]`` are scaled by 255, those in ``[0, 255]``
  are rounded; floating-point TIFFs, signed integers, CMYK and more than four
  samples raise :class:`~stmorph.errors.ImageError`.
"""

from __future__ import annotations

import math
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from .. import _spatial
from ..errors import ImageError, InputError

__all__ = ["Slide", "open_slide", "slide_for", "MAX_PIL_PIXELS"]

#: Largest JPEG/PNG (in pixels) :func:`open_slide` decodes; beyond it, convert to a tiled pyramidal TIFF.
MAX_PIL_PIXELS = 2**31
#: Default byte budget of a slide's decoded-tile cache.
DEFAULT_CACHE_BYTES = 256 * 2**20
#: Bytes of decoded rows a thumbnail reads at a time.
_THUMB_BAND_BYTES = 32 * 2**20
#: Tile grid assumed for in-memory images (to order spot visits).
_ARRAY_TILE = 512

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_JPEG_COMPRESSIONS = {6, 7, 33007, 34892}


# --------------------------------------------------------------------------- conversion to uint8 RGB
class _ToRGB8:
    """Converts arrays of one source layout to uint8 RGB ``(h, w, 3)``.

    Built once per image from its dtype, number of samples and photometric
    interpretation; applied to every tile/region read.
    """

    def __init__(self, dtype, samples: int, *, bits: int | None = None, photometric: int | None = None,
                 colormap: np.ndarray | None = None, float_scale: float | None = None, alpha: str = "unassoc",
                 path=None):
        dtype = np.dtype(dtype)
        self.dtype = dtype
        self.samples = samples
        self.alpha = alpha  # last sample of gray+alpha / RGBA: "unassoc", "assoc" (premultiplied) or "none" (drop)
        self.invert = photometric == 0  # MinIsWhite
        self.lut = None
        if samples not in (1, 2, 3, 4):
            msg = f"image has {samples} samples per pixel; only grayscale, gray+alpha, RGB and RGBA are supported."
            raise ImageError(msg, path)
        if photometric == 5:
            msg = "CMYK (separated) images are not supported; convert the image to RGB."
            raise ImageError(msg, path)
        if photometric == 3 and colormap is not None and samples == 1:  # palette
            cmap = np.asarray(colormap)
            if cmap.ndim != 2 or cmap.shape[0] != 3:
                msg = f"palette image has a colour map of shape {cmap.shape}; expected (3, n)."
                raise ImageError(msg, path)
            if cmap.dtype != np.uint8:
                cmap = (cmap.astype(np.float64) * (255.0 / 65535.0) + 0.5).astype(np.uint8)
            self.lut = np.ascontiguousarray(cmap.T)  # (n, 3)
        if dtype == np.uint8 or dtype == np.bool_:
            self.scale = None
        elif dtype.kind == "u":
            nbits = bits if bits and bits < dtype.itemsize * 8 else dtype.itemsize * 8
            self.scale = 255.0 / float(2**nbits - 1)
        elif dtype.kind == "f":
            if float_scale is None:
                msg = (f"floating-point image data ({dtype}) has no defined intensity range; "
                       "convert it to 8- or 16-bit first.")
                raise ImageError(msg, path)
            self.scale = float_scale
        else:
            msg = f"unsupported pixel type {dtype} (signed or complex); expected uint8 or uint16."
            raise ImageError(msg, path)

    def __call__(self, a: np.ndarray) -> np.ndarray:
        if a.ndim == 2:
            a = a[:, :, None]
        if self.lut is not None:
            idx = a[:, :, 0]
            idx = np.minimum(idx, len(self.lut) - 1) if idx.dtype.kind == "u" else idx
            return self.lut[idx]
        if self.dtype == np.bool_:
            a = a.astype(np.uint8) * np.uint8(255)
        elif self.scale is not None:
            f = a.astype(np.float32)
            f *= np.float32(self.scale)
            f += np.float32(0.5)
            np.clip(f, 0, 255, out=f)
            a = f.astype(np.uint8)
        n = a.shape[2]
        if n in (2, 4):  # composite on white
            alpha = a[:, :, n - 1]
            color = a[:, :, : n - 1]
            if self.alpha != "none" and alpha.min() < 255:
                af = alpha.astype(np.float32)[:, :, None] * np.float32(1 / 255)
                cf = color.astype(np.float32)
                if self.alpha == "unassoc":
                    cf *= af
                cf += np.float32(255) * (1 - af) + np.float32(0.5)
                color = np.clip(cf, 0, 255).astype(np.uint8)
            a = color
            n -= 1
        if self.invert:
            a = 255 - a
        if n == 1:
            return np.repeat(a, 3, axis=2) if a.shape[2] == 1 else a
        return np.ascontiguousarray(a) if a.dtype == np.uint8 else a.astype(np.uint8)


# --------------------------------------------------------------------------- level readers
class _Level:
    """One resolution level: ``read`` returns uint8 RGB of a region inside the image."""

    height: int
    width: int
    tile: tuple[int, int]  # (tile height, tile width) of the storage grid, used to order reads

    def read(self, y0: int, y1: int, x0: int, x1: int, cache: bool = True) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError

    def close(self) -> None:
        pass


class _ArrayLevel(_Level):
    """An in-memory (or memory-mapped) array with axes (y, x[, s])."""

    def __init__(self, array: np.ndarray, convert: _ToRGB8, tile: tuple[int, int] | None = None):
        self.array = array
        self.convert = convert
        self.height, self.width = array.shape[:2]
        self.tile = tile or (_ARRAY_TILE, _ARRAY_TILE)

    def read(self, y0, y1, x0, x1, cache=True):
        return self.convert(np.asarray(self.array[y0:y1, x0:x1]))

    def close(self):
        self.array = None


class _SeparateMemmapLevel(_ArrayLevel):
    """Memory-mapped planar-separate data with axes (s, y, x)."""

    def __init__(self, array: np.ndarray, convert: _ToRGB8):
        super().__init__(array, convert)
        self.height, self.width = array.shape[1:3]

    def read(self, y0, y1, x0, x1, cache=True):
        return self.convert(np.moveaxis(np.asarray(self.array[:, y0:y1, x0:x1]), 0, -1))


class _TileCache:
    """LRU cache of decoded segments, bounded in bytes; thread-safe."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self.nbytes = 0
        self._d: OrderedDict[Any, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key):
        with self._lock:
            v = self._d.get(key)
            if v is None:
                self.misses += 1
                return None
            self._d.move_to_end(key)
            self.hits += 1
            return v

    def put(self, key, value: np.ndarray):
        with self._lock:
            if key in self._d:
                return
            self._d[key] = value
            self.nbytes += value.nbytes
            # evict least recently used; always keep the newest entry
            while self.nbytes > self.max_bytes and len(self._d) > 1:
                _, old = self._d.popitem(last=False)
                self.nbytes -= old.nbytes

    def clear(self):
        with self._lock:
            self._d.clear()
            self.nbytes = 0


class _TiffSegmentLevel(_Level):
    """A single-page TIFF level read tile by tile (or strip by strip)."""

    def __init__(self, slide: Slide, key: int, tif, page, convert: _ToRGB8, lock: threading.RLock):
        self.slide, self.key, self.tif, self.page = slide, key, tif, page
        self.convert = convert
        self.lock = lock
        self.height, self.width = int(page.imagelength), int(page.imagewidth)
        if page.is_tiled:
            self.tile = (int(page.tilelength), int(page.tilewidth))
        else:
            self.tile = (min(int(page.rowsperstrip), self.height), self.width)
        self.n_rows = math.ceil(self.height / self.tile[0])
        self.n_cols = math.ceil(self.width / self.tile[1])
        self.separate = page.planarconfig == 2 and page.samplesperpixel > 1
        self.n_planes = int(page.samplesperpixel) if self.separate else 1
        self.offsets = page.dataoffsets
        self.bytecounts = page.databytecounts
        self.decodeargs: dict[str, Any] = {}
        if page.compression in _JPEG_COMPRESSIONS:
            self.decodeargs = {"jpegtables": page.jpegtables, "jpegheader": page.jpegheader}
        self.n_decoded = 0

    def _decode_tiles(self, tiles: list[int]) -> dict[int, np.ndarray]:
        """Read and decode tiles (linear index row * n_cols + col), return uint8 RGB arrays."""
        per_plane = self.n_rows * self.n_cols
        seg_index = [p * per_plane + t for t in tiles for p in range(self.n_planes)]
        offsets = [self.offsets[i] for i in seg_index]
        counts = [self.bytecounts[i] for i in seg_index]
        decode = self.page.decode
        raw: dict[int, np.ndarray | None] = {}
        try:
            for data, index in self.tif.filehandle.read_segments(
                offsets, counts, indices=seg_index, sort=True, lock=self.lock, flat=True
            ):
                if data is not None and len(data) < self.bytecounts[index]:
                    msg = f"segment {index} ends beyond the end of the file (truncated TIFF?)."
                    raise ImageError(msg, self.slide.path)
                arr, _, shape = decode(data, index, **self.decodeargs)
                raw[index] = None if arr is None else arr.reshape(shape[1:])  # (length, width, contig samples)
        except ImageError:
            raise
        except Exception as e:  # noqa: BLE001 - any codec error means an unreadable file
            msg = f"cannot decode image data of level {self.key}: {type(e).__name__}: {e}"
            raise ImageError(msg, self.slide.path) from e
        out = {}
        th, tw = self.tile
        for t in tiles:
            r, c = divmod(t, self.n_cols)
            h = min(th, self.height - r * th)
            w = min(tw, self.width - c * tw)
            parts = [raw[p * per_plane + t] for p in range(self.n_planes)]
            if any(p is None for p in parts):  # empty segment (bytecount 0): TIFF says fill with 0
                samples = self.n_planes if self.separate else int(self.page.samplesperpixel)
                a = np.zeros((h, w, samples), dtype=self.page.dtype)
            elif self.separate:
                a = np.concatenate([p[:h, :w] for p in parts], axis=2)
            else:
                a = parts[0][:h, :w]
            out[t] = self.convert(a)
            self.n_decoded += 1
        return out

    def read(self, y0, y1, x0, x1, cache=True):
        th, tw = self.tile
        r0, r1 = y0 // th, (y1 - 1) // th
        c0, c1 = x0 // tw, (x1 - 1) // tw
        store = self.slide._cache
        tiles: dict[int, np.ndarray] = {}
        missing = []
        for r in range(r0, r1 + 1):
            for c in range(c0, c1 + 1):
                t = r * self.n_cols + c
                a = store.get((self.key, t))
                if a is None:
                    missing.append(t)
                else:
                    tiles[t] = a
        if missing:
            decoded = self._decode_tiles(missing)
            if cache:
                for t, a in decoded.items():
                    store.put((self.key, t), a)
            tiles.update(decoded)
        if len(tiles) == 1:
            (t, a), = tiles.items()
            r, c = divmod(t, self.n_cols)
            return a[y0 - r * th: y1 - r * th, x0 - c * tw: x1 - c * tw]
        out = np.empty((y1 - y0, x1 - x0, 3), np.uint8)
        for t, a in tiles.items():
            r, c = divmod(t, self.n_cols)
            ty, tx = r * th, c * tw
            sy0, sy1 = max(y0, ty), min(y1, ty + a.shape[0])
            sx0, sx1 = max(x0, tx), min(x1, tx + a.shape[1])
            out[sy0 - y0: sy1 - y0, sx0 - x0: sx1 - x0] = a[sy0 - ty: sy1 - ty, sx0 - tx: sx1 - tx]
        return out

    def close(self):
        self.tif = None


class _ZarrLevel(_Level):
    """Fallback for TIFF layouts the segment reader does not cover, via tifffile's zarr store."""

    def __init__(self, series, level: int, convert: _ToRGB8, index: tuple, lock: threading.RLock,
                 tile: tuple[int, int]):
        import zarr

        self.store = series.aszarr(level=level)
        self.z = zarr.open(self.store, mode="r")
        self.index = index  # per file axis: "Y", "X", "C" (kept) or an int (first plane)
        self.convert = convert
        self.lock = lock
        axes = series.levels[level].axes
        shape = series.levels[level].shape
        self.height, self.width = int(shape[axes.index("Y")]), int(shape[axes.index("X")])
        self.tile = tile

    def read(self, y0, y1, x0, x1, cache=True):
        sel = tuple(slice(y0, y1) if i == "Y" else slice(x0, x1) if i == "X" else slice(None) if i == "C" else i
                    for i in self.index)
        with self.lock:
            a = np.asarray(self.z[sel])
        # remaining axes are ordered as in the file; bring them to (y, x, c)
        kept = [i for i in self.index if not isinstance(i, int)]
        order = [kept.index("Y"), kept.index("X")] + ([kept.index("C")] if "C" in kept else [])
        return self.convert(np.transpose(a, order))

    def close(self):
        try:
            self.store.close()
        except Exception:  # noqa: BLE001
            pass


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
    return (f"image is larger than {MAX_PIL_PIXELS} pixels, too large to decode whole; convert it to a tiled "
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
                Image.MAX_IMAGE_PIXELS = MAX_PIL_PIXELS
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
        if w * h > MAX_PIL_PIXELS:
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


def _shrink_to(arr: np.ndarray, max_side: int, Image=None) -> np.ndarray:
    if Image is None:
        from PIL import Image
    h, w = arr.shape[:2]
    s = max_side / max(h, w)
    if s >= 1:
        return arr
    size = (max(1, round(w * s)), max(1, round(h * s)))
    return np.asarray(Image.fromarray(arr).resize(size, Image.BILINEAR, reducing_gap=2.0))


# --------------------------------------------------------------------------- TIFF helpers
def _tiff_converter(page, path) -> _ToRGB8:
    samples = int(page.samplesperpixel)
    if page.photometric == 6 and page.compression not in _JPEG_COMPRESSIONS:
        msg = "YCbCr TIFF without JPEG compression is not supported; convert the image to RGB."
        raise ImageError(msg, path)
    if page.dtype is None:
        msg = f"unsupported TIFF pixel type (SampleFormat {page.sampleformat}, {page.bitspersample}-bit)."
        raise ImageError(msg, path)
    bits = page.bitspersample if isinstance(page.bitspersample, int) else None
    colormap = page.colormap if page.photometric == 3 else None
    extra = tuple(int(e) for e in (page.extrasamples or ()))
    alpha = {0: "none", 1: "assoc"}.get(extra[0], "unassoc") if extra else "unassoc"
    return _ToRGB8(page.dtype, samples, bits=bits, photometric=int(page.photometric), colormap=colormap,
                   alpha=alpha, path=path)


def _main_series(tif):
    """The image series with the largest Y x X (the slide itself, not a label, macro or thumbnail)."""
    def area(series):
        axes, shape = series.axes, series.shape
        if "Y" not in axes or "X" not in axes:
            return -1
        return int(shape[axes.index("Y")]) * int(shape[axes.index("X")])

    return max(tif.series, key=area)  # max keeps the first of equals: series[0] wins ties


def _tiff_levels(slide: Slide, tif, path: str, lock) -> list[_Level]:
    if not tif.series:
        msg = "TIFF file contains no image."
        raise ImageError(msg, path)
    series = _main_series(tif)
    size = os.path.getsize(path)
    levels: list[_Level] = []
    for k, lev in enumerate(series.levels):
        pages = [p for p in lev.pages if p is not None]
        page = lev.keyframe
        axes = lev.axes
        if len(pages) == 1 and axes in ("YX", "YXS", "SYX"):
            page = pages[0]
            ends = [o + c for o, c in zip(page.dataoffsets, page.databytecounts) if c]
            if ends and max(ends) > size:
                msg = (f"file is truncated: level {k} image data ends at byte {max(ends)} "
                       f"but the file has {size} bytes.")
                raise ImageError(msg, path)
            convert = _tiff_converter(page, path)
            if page.is_memmappable and page.compression == 1:
                dtype = page.dtype.newbyteorder(tif.byteorder)
                mm = np.memmap(path, dtype=dtype, mode="r", offset=page.dataoffsets[0], shape=page.shaped)
                if page.planarconfig == 2 and page.samplesperpixel > 1:
                    levels.append(_SeparateMemmapLevel(mm[:, 0, :, :, 0], convert))
                else:
                    levels.append(_ArrayLevel(mm[0, 0], convert))
            else:
                levels.append(_TiffSegmentLevel(slide, k, tif, page, convert, lock))
            continue
        # generic layout through zarr: Y, X, optional channel axis (S or C), first plane of anything else
        if "Y" not in axes or "X" not in axes:
            msg = f"TIFF series has axes {axes!r}; expected an image with Y and X axes."
            raise ImageError(msg, path)
        index: list[Any] = []
        channel = None
        for ax, n in zip(axes, lev.shape):
            if ax in ("Y", "X"):
                index.append(ax)
            elif ax in ("S", "C") and channel is None and n in (1, 2, 3, 4):
                index.append("C")
                channel = ax
            elif ax in ("S", "C") and n > 4:
                msg = f"TIFF has {n} channels ({axes!r}); only grayscale, RGB and RGBA are supported."
                raise ImageError(msg, path)
            else:
                index.append(0)
        n_ch = lev.shape[axes.index(channel)] if channel else 1
        convert = _tiff_converter(page, path) if n_ch == page.samplesperpixel else _ToRGB8(
            page.dtype, n_ch, bits=page.bitspersample, photometric=int(page.photometric), path=path)
        tile = (int(page.tilelength), int(page.tilewidth)) if page.is_tiled else (
            max(1, min(int(page.rowsperstrip), int(page.imagelength))), int(page.imagewidth))
        levels.append(_ZarrLevel(series, k, convert, tuple(index), lock, tile))
    return levels


def _reduce_level(lv: _Level, f: int, Image) -> np.ndarray:
    """Whole level area-averaged by an integer factor ``f``, streamed along tile rows.

    Reads bands of whole tile rows (about 32 MB) without filling the tile cache,
    carries the rows left over when a band is not a multiple of ``f`` into the
    next band, so the result equals ``Image.reduce(f)`` of the whole level while
    only one band is in memory.
    """
    th = lv.tile[0]
    step = th * max(1, _THUMB_BAND_BYTES // (3 * lv.width * th))
    parts = []
    carry = None
    for y0 in range(0, lv.height, step):
        y1 = min(lv.height, y0 + step)
        a = lv.read(y0, y1, 0, lv.width, cache=False)
        if carry is not None:
            a = np.concatenate([carry, a], axis=0)
        m = len(a) if y1 == lv.height else (len(a) // f) * f
        if m:
            im = Image.fromarray(np.ascontiguousarray(a[:m]))
            parts.append(np.asarray(im.reduce(f) if f > 1 else im))
        carry = a[m:] if m < len(a) else None
    return np.concatenate(parts, axis=0)


# --------------------------------------------------------------------------- Slide
class Slide:
    """A lazily read whole-slide image; use :func:`open_slide` to create one.

    Attributes
    ----------
    path
        The file, or None for an in-memory image.
    width, height
        Size in pixels of level 0 (the full resolution).
    level_shapes
        ``(height, width)`` of every pyramid level, level 0 first.
    dtype
        Pixel type of the source data (reads are always converted to uint8 RGB).
    """

    def __init__(self, levels: list[_Level], *, path: str | None, dtype, fmt: str,
                 cache_bytes: int = DEFAULT_CACHE_BYTES, closer=None):
        self._levels = levels
        self.path = path
        self.dtype = np.dtype(dtype)
        self.format = fmt
        self._cache = _TileCache(cache_bytes)
        self._closer = closer
        self._closed = False
        self._base_level = 0

    def __reduce__(self):
        # picklable (e.g. for DataLoader worker processes): a file-backed slide reopens its file
        if self.path is not None:
            return (open_slide, (self.path,), {"_base_level": self._base_level, "_cache_bytes": self._cache.max_bytes})
        return (open_slide, (self._levels[0].array,))

    def __setstate__(self, state):
        # state of a reopened slide: select the same base level and cache budget
        level, cache_bytes = state["_base_level"], state["_cache_bytes"]
        self._cache = _TileCache(cache_bytes)
        if level:
            for lv in self._levels[:level]:
                lv.close()
            self._levels = self._levels[level:]
            self._base_level = level

    # geometry --------------------------------------------------------------
    @property
    def width(self) -> int:
        return self._levels[0].width

    @property
    def height(self) -> int:
        return self._levels[0].height

    @property
    def level_shapes(self) -> list[tuple[int, int]]:
        return [(lv.height, lv.width) for lv in self._levels]

    @property
    def n_levels(self) -> int:
        return len(self._levels)

    @property
    def level_downsamples(self) -> list[float]:
        """Level-0 pixels per pixel of each level (mean of the x and y ratios)."""
        return [0.5 * (self.width / lv.width + self.height / lv.height) for lv in self._levels]

    @property
    def tile_shape(self) -> tuple[int, int]:
        """``(height, width)`` of the storage tile (or strip) of level 0: reads aligned to it are cheapest."""
        return self._levels[0].tile

    def _level(self, level: int) -> _Level:
        if self._closed:
            msg = "slide is closed."
            raise ImageError(msg, self.path)
        if not -len(self._levels) <= level < len(self._levels):
            msg = f"level {level} does not exist; the slide has {len(self._levels)} level(s)."
            raise InputError(msg, self.path)
        return self._levels[level]

    # reading ---------------------------------------------------------------
    def read_region(self, x: int, y: int, w: int, h: int, *, level: int = 0, fill: int = 255) -> np.ndarray:
        """Read a rectangle as uint8 RGB ``(h, w, 3)``.

        ``x``, ``y`` (top-left corner) are level-0 (full-resolution) pixels, as
        spot coordinates are; ``w``, ``h`` are pixels of ``level`` (as in
        OpenSlide). Any part outside the image is filled with ``fill``.
        """
        lv = self._level(level)
        w, h = int(w), int(h)
        if w < 0 or h < 0:
            msg = f"region size must be non-negative, got w={w}, h={h}."
            raise InputError(msg, self.path)
        if not 0 <= int(fill) <= 255:
            msg = f"fill must be within 0..255, got {fill}."
            raise InputError(msg, self.path)
        if level not in (0, -len(self._levels)):
            x = int(math.floor(x * lv.width / self.width + 0.5))
            y = int(math.floor(y * lv.height / self.height + 0.5))
        else:
            x, y = int(x), int(y)
        return self._read(lv, x, y, w, h, fill)

    def _read(self, lv: _Level, x: int, y: int, w: int, h: int, fill: int, out: np.ndarray | None = None) -> np.ndarray:
        """Region of level ``lv`` (its own pixels) into ``out`` (h, w, 3) or a new array."""
        if out is None:
            out = np.empty((h, w, 3), np.uint8)
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + w, lv.width), min(y + h, lv.height)
        if not (x0 == x and y0 == y and x1 == x + w and y1 == y + h):
            out[...] = fill
        if x1 > x0 and y1 > y0:
            out[y0 - y: y1 - y, x0 - x: x1 - x] = lv.read(y0, y1, x0, x1)
        return out

    def thumbnail(self, max_side: int = 2000) -> tuple[np.ndarray, float]:
        """A downscaled RGB image whose longer side is at most ``max_side``.

        Built from the smallest pyramid level at least that large, streamed in
        bands (area-averaged), so a non-pyramidal 30k x 30k TIFF never sits in
        memory whole.

        Returns
        -------
        ``(image, scale)``: uint8 ``(h, w, 3)`` and thumbnail pixels per level-0 pixel
        (multiply ``obsm["spatial"]`` by it to plot spots on the thumbnail).
        """
        from PIL import Image

        max_side = int(max_side)
        if max_side < 1:
            msg = f"max_side must be >= 1, got {max_side}."
            raise InputError(msg, self.path)
        self._level(0)
        k = 0
        for i, lv in enumerate(self._levels):
            if max(lv.width, lv.height) >= max_side:
                k = i
        lv = self._levels[k]
        thumb = lv.thumbnail(max_side) if isinstance(lv, _PilLevel) else None
        if thumb is None:
            thumb = _shrink_to(_reduce_level(lv, max(1, max(lv.width, lv.height) // max_side), Image), max_side, Image)
        return thumb, thumb.shape[1] / self.width

    def cache_info(self) -> dict[str, int]:
        """Decoded-tile cache statistics (bytes held, hits, misses, tiles decoded)."""
        c = self._cache
        return {"nbytes": c.nbytes, "max_bytes": c.max_bytes, "hits": c.hits, "misses": c.misses,
                "decoded": sum(getattr(lv, "n_decoded", 0) for lv in self._levels)}

    # lifetime --------------------------------------------------------------
    def close(self) -> None:
        """Release the file and the cache. Further reads raise ImageError."""
        if self._closed:
            return
        self._closed = True
        for lv in self._levels:
            lv.close()
        self._cache.clear()
        if self._closer is not None:
            self._closer()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        src = self.path or "<array>"
        return (f"Slide({src!r}, {self.width} x {self.height}, levels={len(self._levels)}, "
                f"format={self.format}, dtype={self.dtype})")


# --------------------------------------------------------------------------- constructors
def _array_slide(array: np.ndarray, level: int) -> Slide:
    a = np.asarray(array)
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (1, 2, 3, 4)) or 0 in a.shape[:2]:
        msg = f"image array must have shape (h, w) or (h, w, 1|2|3|4); got {a.shape}."
        raise ImageError(msg)
    if level != 0:
        msg = f"an in-memory image has a single level; got level={level}."
        raise InputError(msg)
    float_scale = None
    if a.dtype.kind == "f":
        lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
        if not np.isfinite(a).all() or lo < 0 or hi > 255:
            msg = f"floating-point image must be finite and within [0, 1] or [0, 255]; got range [{lo}, {hi}]."
            raise ImageError(msg)
        float_scale = 255.0 if hi <= 1.0 else 1.0
    samples = 1 if a.ndim == 2 else a.shape[2]
    conv = _ToRGB8(a.dtype, samples, float_scale=float_scale)
    return Slide([_ArrayLevel(a, conv)], path=None, dtype=a.dtype, fmt="array")


def _sniff(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(8)
    except IsADirectoryError as e:
        msg = "is a folder, not an image file."
        raise ImageError(msg, path) from e
    except OSError as e:
        msg = f"cannot open image file: {e.strerror or e}"
        raise ImageError(msg, path) from e


def open_slide(source: str | os.PathLike | np.ndarray, *, level: int = 0,
               cache_bytes: int = DEFAULT_CACHE_BYTES) -> Slide:
    """Open a whole-slide image lazily.

    Parameters
    ----------
    source
        Path of a TIFF/BigTIFF (tiled or stripped, pyramidal or not), JPEG or PNG
        file, or an image array ``(h, w[, c])``.
    level
        Pyramid level to treat as level 0 (full resolution) of the returned
        slide; spot coordinates must then be in that level's pixels. Default 0.
    cache_bytes
        Byte budget of the decoded-tile cache (TIFF only).

    Returns
    -------
    A :class:`Slide`; use it as a context manager or call ``close()``.

    Raises
    ------
    ImageError
        The file is missing, not an image, truncated, or has an unsupported layout.
    """
    if isinstance(source, Slide):
        return source
    if isinstance(source, np.ndarray):
        return _array_slide(source, level)
    if not isinstance(source, (str, os.PathLike)):
        msg = f"image must be a path or a numpy array, got {type(source).__name__}."
        raise InputError(msg)
    path = os.fspath(source)
    if not os.path.exists(path):
        msg = "image file not found."
        raise ImageError(msg, path)
    magic = _sniff(path)
    if len(magic) == 0:
        msg = "image file is empty."
        raise ImageError(msg, path)
    if magic[:4] in _TIFF_MAGIC:
        slide = _open_tiff(path, cache_bytes)
    else:
        slide = _open_pil(path, cache_bytes)
    if level:
        if not 0 <= level < slide.n_levels:
            n = slide.n_levels
            slide.close()
            msg = f"level {level} does not exist; the image has {n} level(s)."
            raise InputError(msg, path)
        for lv in slide._levels[:level]:
            lv.close()
        slide._levels = slide._levels[level:]
        slide._base_level = level
    return slide


def _open_tiff(path: str, cache_bytes: int) -> Slide:
    import tifffile

    try:
        tif = tifffile.TiffFile(path)
    except Exception as e:  # noqa: BLE001 - tifffile raises many types on corrupt files
        msg = f"cannot read TIFF: {type(e).__name__}: {e}"
        raise ImageError(msg, path) from e
    lock = threading.RLock()
    slide = Slide([], path=path, dtype=np.uint8, fmt="TIFF", cache_bytes=cache_bytes, closer=tif.close)
    try:
        levels = _tiff_levels(slide, tif, path, lock)
    except ImageError:
        tif.close()
        raise
    except Exception as e:  # noqa: BLE001
        tif.close()
        msg = f"cannot read TIFF structure: {type(e).__name__}: {e}"
        raise ImageError(msg, path) from e
    slide._levels = levels
    slide.dtype = np.dtype(_main_series(tif).dtype)
    return slide


def _open_pil(path: str, cache_bytes: int) -> Slide:
    with _pil_open(path) as im:
        fmt = im.format or "image"
        size = im.size
        mode = im.mode
    if fmt in ("JPEG", "PNG"):
        _check_end_marker(path, fmt)
    dtype = np.uint16 if mode.startswith("I;16") or mode == "I" else np.uint8
    slide = Slide([], path=path, dtype=dtype, fmt=fmt, cache_bytes=cache_bytes)
    slide._levels = [_PilLevel(slide, path, size)]
    return slide


# --------------------------------------------------------------------------- AnnData helpers
def slide_for(adata, *, image=None, library_id: str | None = None) -> Slide:
    """The full-resolution slide of an AnnData.

    Resolution order: the explicit ``image`` (path, array or Slide);
    ``uns["spatial"][library_id]["metadata"]["source_image_path"]``;
    ``uns["spatial"][library_id]["images"]["fullres"]`` (in-memory data).
    """
    if image is not None:
        return open_slide(image)
    lib_id = _spatial.library_id(adata, library_id)
    lib = adata.uns["spatial"][lib_id]
    src = _spatial.source_image_path(adata, lib_id)
    fullres = lib.get("images", {}).get("fullres")
    if src:
        if Path(src).exists() or fullres is None:
            return open_slide(src)
    if fullres is not None:
        return open_slide(np.asarray(fullres))
    msg = (f"no full-resolution image for library {lib_id!r}: pass image=<path to the H&E TIFF/JPEG/PNG>, "
           f"or set adata.uns['spatial'][{lib_id!r}]['metadata']['source_image_path'].")
    raise InputError(msg)
