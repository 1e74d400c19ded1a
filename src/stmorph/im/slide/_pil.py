"""JPEG / PNG (and other formats Pillow reads) backend: the fallback for files that are not TIFF.

These cannot be read lazily: the header is read at open, the pixels are decoded
once on first use and kept in memory (plain JPEG and PNG through imagecodecs,
the rest through Pillow; palette images as one byte per pixel and a colour
table, turned into RGB a region at a time). ``PIL.Image.MAX_IMAGE_PIXELS`` is
raised to :data:`~stmorph.im.slide._base.MAX_PIL_PIXELS` while opening, on
purpose: whole-slide JPEGs are large. Instead, the memory a whole decode takes
is estimated from the header (:func:`decode_bytes`) and the decode refused,
naming the file, when it exceeds :func:`~stmorph.im.slide._base.max_decode_bytes`
(``$STMORPH_MAX_DECODE_BYTES``, else half the memory available).

Truncated files raise :class:`~stmorph.errors.ImageError`, never an image
filled with grey: a PNG must end with its IEND chunk, and a JPEG's structure is
walked at open (:func:`jpeg_structure`): its scans must be followed by the
end-of-image marker, cover every colour component, hold at least the
compressed data any JPEG of the declared size needs (so a tiny file whose
header claims a huge image is refused), and, when the file uses restart
markers, hold every restart interval. ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES``
is never set. EXIF orientation is ignored: spot coordinates refer to the stored
pixel grid.
"""

from __future__ import annotations

import math
import os
import re
import struct
import threading
from dataclasses import dataclass, field

import numpy as np

from ...errors import ImageError
from . import _base
from ._base import (
    _ARRAY_TILE,
    CONVERT_HINT,
    GLASS,
    Slide,
    _ArrayLevel,
    _shrink_to,
    _ToRGB8,
    check_decode,
    max_decode_bytes,
)

__all__ = ["open_pil", "jpeg_structure", "decode_bytes", "max_decode_bytes"]


class _PilLevel(_ArrayLevel):
    """JPEG/PNG/...: header read at open, pixels decoded once on first use."""

    def __init__(self, slide: Slide, path: str, size: tuple[int, int], mode: str):
        self.slide = slide
        self.path = path
        self.width, self.height = size
        self.mode = mode
        self.tile = (_ARRAY_TILE, _ARRAY_TILE)
        self.array = None
        self.convert = None
        self._lock = threading.Lock()

    def decode_bytes(self) -> tuple[int, str]:
        if self.array is not None:
            return 0, ""
        fmt = self.slide.format
        need = decode_bytes(fmt, self.mode, self.width, self.height) + _file_size(self.path)
        return need, f"this {self.width} x {self.height} px {fmt} whole ({fmt} cannot be read in pieces)"

    def _load(self):
        with self._lock:
            if self.array is None:
                self.check_decode(self.path)
                arr, convert = _pil_decode(self.path, self.slide.background)
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
        if self.array is not None or self.slide.format != "JPEG":
            return None
        from PIL import Image

        scale = max_side / max(self.width, self.height)
        reduce = 1 if scale >= 1 else max(1, min(8, 2 ** int(math.floor(math.log2(1 / scale)))))
        tw, th = -(-self.width // reduce), -(-self.height // reduce)
        check_decode(self.path, tw * th * 8 + _file_size(self.path),
                     f"a {tw} x {th} px thumbnail of this {self.width} x {self.height} px JPEG")
        with _pil_open(self.path) as im:
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


def _file_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


#: Bytes per pixel of Pillow's own buffer for each mode (Pillow keeps 3- and 4-band modes in 4 bytes).
_PILLOW_PX = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I": 4, "F": 4}
#: Samples per pixel imagecodecs returns for a Pillow mode (PNG palettes are expanded to RGB or RGBA).
_CODEC_SAMPLES = {"1": 1, "L": 1, "I": 1, "I;16": 1, "I;16B": 1, "LA": 2, "RGB": 3, "RGBA": 4}


def _codecs_path(fmt: str, mode: str) -> bool:
    """Whether :func:`_pil_decode` decodes this format and mode with imagecodecs."""
    return (fmt == "JPEG" and mode in ("RGB", "L")) or (
        fmt == "PNG" and mode in ("1", "RGB", "RGBA", "L", "LA", "I", "I;16", "I;16B"))


def decode_bytes(fmt: str, mode: str, width: int, height: int) -> int:
    """Peak bytes of decoding a ``width`` x ``height`` image of Pillow ``mode`` whole (:func:`_pil_decode`),
    besides the bytes of the file, which imagecodecs reads into memory."""
    n = int(width) * int(height)
    if _codecs_path(fmt, mode):
        itemsize = 2 if mode.startswith("I") else 1
        return n * _CODEC_SAMPLES[mode] * itemsize
    src = _PILLOW_PX.get(mode, 4)
    if mode in ("L", "P", "1", "I;16", "I;16B", "I;16L"):
        return n * 2 * src  # Pillow's buffer and the array copied from it
    if mode == "I":
        return n * (4 + 4 + 2)  # Pillow's buffer, its 32-bit copy, then the 16-bit one
    if mode in ("RGB", "RGBA", "LA"):
        return n * (4 + 4)
    return n * (src + 4 + 4)  # converted to RGB(A) by Pillow, then copied out


# --------------------------------------------------------------------------- JPEG structure
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_PROGRESSIVE = {0xC2, 0xC6, 0xCA, 0xCE}
_LOSSLESS = {0xC3, 0xC7, 0xCB, 0xCF}
_ARITHMETIC = {0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
#: The marker that ends entropy-coded data: 0xFF not followed by stuffing (00), a restart (D0-D7) or fill (FF).
_NEXT_MARKER = re.compile(rb"\xff(?![\x00\xd0-\xd7\xff])", re.DOTALL)
_RESTART = re.compile(rb"\xff[\xd0-\xd7]")


@dataclass
class JpegScan:
    """One scan of a JPEG: the components it codes, its entropy-coded bytes and restart markers."""

    components: list[int]
    data_bytes: int
    restarts: int
    restart_interval: int  # MCUs per restart interval in force (0: no restart markers)


@dataclass
class JpegStructure:
    """What :func:`jpeg_structure` found: frame type (SOF marker) and size, components ``{id: (h, v)}``
    (sampling factors), scans, and whether the end-of-image marker follows them."""

    width: int = 0
    height: int = 0
    marker: int = 0
    components: dict[int, tuple[int, int]] = field(default_factory=dict)
    scans: list[JpegScan] = field(default_factory=list)
    eoi: bool = False

    def _max(self) -> tuple[int, int]:
        return max(h for h, _ in self.components.values()), max(v for _, v in self.components.values())

    def blocks(self, cid: int) -> int:
        """8 x 8 blocks of component ``cid``, as a non-interleaved scan codes them."""
        hmax, vmax = self._max()
        h, v = self.components[cid]
        cw, ch = -(-self.width * h // hmax), -(-self.height * v // vmax)
        return -(-cw // 8) * -(-ch // 8)

    def mcus(self, scan: JpegScan) -> int:
        """Minimum coded units of ``scan`` (blocks of its one component, or interleaved MCUs)."""
        if len(scan.components) == 1:
            return self.blocks(scan.components[0])
        hmax, vmax = self._max()
        return -(-self.width // (8 * hmax)) * -(-self.height // (8 * vmax))


def jpeg_structure(data: bytes) -> JpegStructure:
    """Walk the markers of a JPEG file: frame header, scans (entropy-coded size, restart markers) and
    the end-of-image marker. Raises ValueError saying what is malformed; a file that stops early
    returns what was found (``eoi`` False)."""
    n = len(data)
    if data[:2] != b"\xff\xd8":
        raise ValueError("no start-of-image marker")
    out = JpegStructure()
    i, restart_interval = 2, 0
    while i < n:
        if data[i] != 0xFF:
            raise ValueError(f"expected a marker at byte {i}, found 0x{data[i]:02x}")
        while i < n and data[i] == 0xFF:  # fill bytes
            i += 1
        if i >= n:
            break
        m = data[i]
        i += 1
        if m == 0xD9:
            out.eoi = True
            break
        if m == 0x01 or 0xD0 <= m <= 0xD7:  # markers without a segment
            continue
        if i + 2 > n:
            break
        length = int.from_bytes(data[i: i + 2], "big")
        if length < 2:
            raise ValueError(f"marker 0xff{m:02x} at byte {i - 2} has length {length}")
        if i + length > n:
            break
        seg = data[i + 2: i + length]
        i += length
        if m in _SOF:
            if len(seg) < 6 or len(seg) < 6 + 3 * seg[5]:
                raise ValueError("frame header too short")
            out.marker = m
            out.height, out.width = int.from_bytes(seg[1:3], "big"), int.from_bytes(seg[3:5], "big")
            out.components = {}
            for k in range(seg[5]):
                cid, hv = seg[6 + 3 * k], seg[7 + 3 * k]
                h, v = hv >> 4, hv & 15
                if not (1 <= h <= 4 and 1 <= v <= 4):
                    raise ValueError(f"component {cid} has sampling factors {h}x{v}")
                out.components[cid] = (h, v)
        elif m == 0xDD and len(seg) >= 2:
            restart_interval = int.from_bytes(seg[:2], "big")
        elif m == 0xDA:
            if not seg or len(seg) < 1 + 2 * seg[0] + 3:
                raise ValueError("scan header too short")
            comps = [seg[1 + 2 * k] for k in range(seg[0])]
            nxt = _NEXT_MARKER.search(data, i)
            end = n if nxt is None else nxt.start()
            restarts = len(_RESTART.findall(data, i, end))
            out.scans.append(JpegScan(comps, end - i, restarts, restart_interval))
            i = end
    return out


def _check_jpeg(path: str) -> None:
    """ImageError when a JPEG file is truncated, or its header claims more pixels than its data can hold."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        st = jpeg_structure(data)
    except ValueError as e:
        msg = f"JPEG file is corrupt ({e}); re-export or re-copy the image."
        raise ImageError(msg, path) from None
    del data
    if not st.scans or not st.eoi:
        msg = "JPEG file is truncated (no end-of-image marker after its image data); re-export or re-copy the image."
        raise ImageError(msg, path)
    if not st.components or st.width == 0 or st.height == 0:
        return  # no frame header, or a height given after the first scan (DNL): left to the decoder
    unknown = {c for s in st.scans for c in s.components} - set(st.components)
    if unknown:
        msg = f"JPEG file is corrupt (a scan codes component(s) {sorted(unknown)} that its frame does not have)."
        raise ImageError(msg, path)
    if st.marker not in _PROGRESSIVE:
        missing = set(st.components) - {c for s in st.scans for c in s.components}
        if missing:
            msg = (f"JPEG file is truncated: {len(missing)} of its {len(st.components)} colour components have no "
                   "image data; re-export or re-copy the image.")
            raise ImageError(msg, path)
    if st.marker not in _LOSSLESS:
        for k, scan in enumerate(st.scans):
            if scan.restart_interval:
                expected = -(-st.mcus(scan) // scan.restart_interval) - 1
                if scan.restarts < expected:
                    msg = (f"JPEG file is truncated: scan {k + 1} holds {scan.restarts + 1} of its {expected + 1} "
                           "restart intervals; re-export or re-copy the image.")
                    raise ImageError(msg, path)
    if st.marker in _ARITHMETIC or st.marker in _LOSSLESS:
        return
    # Huffman coding spends at least one bit on the DC coefficient of every block and, in a sequential
    # scan, at least one more on its AC coefficients (their end-of-block code or the coefficients)
    if st.marker in _PROGRESSIVE:
        need_bits = max(st.blocks(c) for c in st.components)
    else:
        need_bits = 2 * sum(st.blocks(c) for c in st.components)
    have = sum(s.data_bytes for s in st.scans)
    if 8 * have < need_bits:
        msg = (f"JPEG file is truncated or corrupt: its header says {st.width} x {st.height} px, which takes at "
               f"least {need_bits // 8:,} bytes of image data, but the file holds {have:,}; re-export or re-copy "
               "the image.")
        raise ImageError(msg, path)


# --------------------------------------------------------------------------- PIL helpers
_PIL_LIMIT_LOCK = threading.Lock()


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
        except (OSError, SyntaxError, ValueError, EOFError, struct.error) as e:
            msg = f"cannot read image: {e}"
            raise ImageError(msg, self.path) from e
        w, h = self.im.size
        if w < 1 or h < 1:
            self.im.close()
            msg = f"image header says {w} x {h} px: no pixels."
            raise ImageError(msg, self.path)
        if w * h > _base.MAX_PIL_PIXELS:
            self.im.close()
            raise ImageError(_too_big_msg(), self.path)
        return self.im

    def __exit__(self, *exc):
        if self.im is not None:
            self.im.close()


def _check_end_marker(path: str, fmt: str) -> None:
    """Truncation test at open: a PNG ends with its IEND chunk; a JPEG's structure is walked (:func:`_check_jpeg`)."""
    if fmt == "JPEG":
        _check_jpeg(path)
        return
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        f.seek(max(0, size - 4096))
        tail = f.read()
    if fmt == "PNG" and b"IEND" not in tail:
        msg = "PNG file is truncated (no IEND chunk); re-export or re-copy the image."
        raise ImageError(msg, path)


def _pil_decode(path: str, background=GLASS) -> tuple[np.ndarray, _ToRGB8]:
    """Decode a whole JPEG/PNG/... image; returns the raw array and its converter.

    Plain JPEG and PNG (1-bit included) go through imagecodecs (libjpeg-turbo / libpng): one
    allocation of the decoded size, GIL released. Other formats and modes go through Pillow; palette
    images keep their indices and a colour table (transparency composited on ``background``).
    """
    with _pil_open(path) as im:
        fmt, mode = im.format, im.mode
    arr = None
    if _codecs_path(fmt, mode):
        arr = _codecs_decode(path, fmt)
        if arr is not None and arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[:, :, 0]
    if arr is None:
        arr, convert = _pillow_decode(path, background)
        if convert is not None:
            return arr, convert
    samples = 1 if arr.ndim == 2 else arr.shape[2]
    return arr, _ToRGB8(arr.dtype, samples, path=path, background=background)


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
    except MemoryError:
        msg = f"not enough memory to decode this {fmt} whole; {CONVERT_HINT}."
        raise ImageError(msg, path) from None
    except Exception as e:  # noqa: BLE001 - codec errors on corrupt data
        msg = f"cannot decode {fmt} image (truncated or corrupt?): {e}"
        raise ImageError(msg, path) from e


def _palette_lut(im, background) -> np.ndarray:
    """``(3, 256)`` uint8 colour table of a palette image, transparent entries composited on ``background``."""
    table = np.asarray(im.getpalette("RGB"), np.float32).reshape(-1, 3)
    trns = im.info.get("transparency")
    if trns is not None:  # one transparent index, or an alpha per index (PNG tRNS)
        a = np.ones(len(table), np.float32)
        if isinstance(trns, int) and 0 <= trns < len(table):
            a[trns] = 0
        elif isinstance(trns, (bytes, bytearray)):
            k = min(len(trns), len(table))
            a[:k] = np.frombuffer(bytes(trns[:k]), np.uint8) / np.float32(255)
        a = a[:, None]
        table = table * a + np.asarray(background, np.float32)[None, :3] * (1 - a)
    table = np.clip(table + 0.5, 0, 255).astype(np.uint8)
    if len(table) < 256:  # indices beyond the table show its last colour
        table = np.concatenate([table, np.repeat(table[-1:], 256 - len(table), axis=0)])
    return np.ascontiguousarray(table.T)


def _pillow_decode(path: str, background=GLASS) -> tuple[np.ndarray, _ToRGB8 | None]:
    """Decode through Pillow; returns the array and, for palette images, their converter (else None)."""
    with _pil_open(path) as im:
        try:
            im.load()
        except MemoryError:
            msg = f"not enough memory to decode this image whole; {CONVERT_HINT}."
            raise ImageError(msg, path) from None
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            msg = f"cannot decode image (truncated or corrupt?): {e}"
            raise ImageError(msg, path) from e
        mode = im.mode
        if mode in ("RGB", "L", "RGBA", "LA", "1"):
            arr = np.asarray(im)
        elif mode == "P" and im.getpalette() is not None:
            lut = _palette_lut(im, background)
            arr = np.asarray(im)
            return arr, _ToRGB8(np.uint8, 1, photometric=3, colormap=lut, path=path)
        elif mode.startswith("I;16") or mode == "I":
            arr = np.asarray(im)
            if mode == "I":  # 32-bit int container of (usually 16-bit) PNG data
                if arr.min() < 0 or arr.max() > 65535:
                    msg = "32-bit integer image is outside the 16-bit range; convert it to 8- or 16-bit."
                    raise ImageError(msg, path)
                arr = arr.astype(np.uint16)
            else:
                arr = arr.astype(np.uint16, copy=False)
        elif mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "RGBX", "RGBa", "La"):
            alpha = mode in ("PA", "RGBa", "La") or (mode == "P" and "transparency" in im.info)
            arr = np.asarray(im.convert("RGBA" if alpha else "RGB"))
        else:
            msg = f"unsupported image mode {mode!r}; expected RGB, RGBA, grayscale or 16-bit grayscale."
            raise ImageError(msg, path)
    return arr, None


def open_pil(path: str, cache_bytes: int) -> Slide:
    with _pil_open(path) as im:
        fmt = im.format or "image"
        size = im.size
        mode = im.mode
    if fmt in ("JPEG", "PNG"):
        _check_end_marker(path, fmt)
    dtype = np.uint16 if mode.startswith("I;16") or mode == "I" else np.uint8
    slide = Slide([], path=path, dtype=dtype, fmt=fmt, cache_bytes=cache_bytes, backend="pil")
    slide._levels = [_PilLevel(slide, path, size, mode)]
    return slide
