"""TIFF / BigTIFF backend (plain, OME-TIFF, SVS-like) through :mod:`tifffile`: the default for TIFF files.

Tiled and stripped pages are read segment by segment (a tile or a strip at a
time): only the tiles/strips a region touches are read and decoded, and decoded
segments are kept in the slide's LRU cache bounded in bytes (``cache_bytes``).
Uncompressed contiguous pages are memory-mapped. Pyramid levels
(``series[0].levels``: SubIFDs, SVS, OME) become the slide's levels. Layouts the
segment reader does not cover (several pages per level, e.g. one page per
channel) go through tifffile's zarr store.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
from typing import Any

import numpy as np

from ...errors import ImageError
from ._base import DECODE_CHECK_FLOOR, Slide, _ArrayLevel, _Level, _ToRGB8

TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_JPEG_COMPRESSIONS = {6, 7, 33007, 34892}


def is_tiff(magic: bytes) -> bool:
    """Whether the first bytes of a file are a TIFF or BigTIFF header."""
    return magic[:4] in TIFF_MAGIC


class _SeparateMemmapLevel(_ArrayLevel):
    """Memory-mapped planar-separate data with axes (s, y, x)."""

    def __init__(self, array: np.ndarray, convert: _ToRGB8):
        super().__init__(array, convert)
        self.height, self.width = array.shape[1:3]

    def read(self, y0, y1, x0, x1, cache=True):
        return self.convert(np.moveaxis(np.asarray(self.array[:, y0:y1, x0:x1]), 0, -1))



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
        need = self.n_rows * self.n_cols * self.n_planes
        if len(self.offsets) != need or len(self.bytecounts) != need:
            kind = "tiles" if page.is_tiled else "strips"
            msg = (f"corrupt TIFF: level {key} lists {len(self.offsets)} {kind} ({len(self.bytecounts)} byte counts), "
                   f"but its {self.width} x {self.height} px in {self.tile[1]} x {self.tile[0]} px {kind} need {need}; "
                   "re-export or re-copy the image.")
            raise ImageError(msg, slide.path)
        self.decodeargs: dict[str, Any] = {}
        if page.compression in _JPEG_COMPRESSIONS:
            self.decodeargs = {"jpegtables": page.jpegtables, "jpegheader": page.jpegheader}
        self.n_decoded = 0
        th, tw = self.tile
        samples = int(page.samplesperpixel)
        raw = th * tw * samples * page.dtype.itemsize
        self._decode_need = ((2 * raw if self.separate else raw) + max(self.bytecounts, default=0) * self.n_planes
                             + th * tw * convert.work_bytes_per_px())

    def decode_bytes(self) -> tuple[int, str]:
        th, tw = self.tile
        kind = "tile" if self.page.is_tiled else "strip"
        return self._decode_need, f"one {tw} x {th} px {kind} of this {self.width} x {self.height} px TIFF"

    def _decode_tiles(self, tiles: list[int]) -> dict[int, np.ndarray]:
        """Read and decode tiles (linear index row * n_cols + col), return uint8 RGB arrays."""
        if self._decode_need > DECODE_CHECK_FLOOR:
            self.check_decode(self.slide.path)
        per_plane = self.n_rows * self.n_cols
        seg_index = [p * per_plane + t for t in tiles for p in range(self.n_planes)]
        offsets = [self.offsets[i] for i in seg_index]
        counts = [self.bytecounts[i] for i in seg_index]
        decode = self.page.decode
        raw: dict[int, np.ndarray | None] = {}
        try:
            with quiet_tifffile():
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
        self.path = None  # set by _tiff_levels, for messages
        page = series.levels[level].keyframe
        th, tw = tile
        n_ch = int(shape[axes.index("C")]) if "C" in axes else int(shape[axes.index("S")]) if "S" in axes else 1
        self._decode_need = th * tw * (2 * n_ch * page.dtype.itemsize + convert.work_bytes_per_px())

    def decode_bytes(self) -> tuple[int, str]:
        th, tw = self.tile
        return self._decode_need, f"one {tw} x {th} px segment of this {self.width} x {self.height} px TIFF"

    def read(self, y0, y1, x0, x1, cache=True):
        if self._decode_need > DECODE_CHECK_FLOOR:
            self.check_decode(self.path)
        sel = tuple(slice(y0, y1) if i == "Y" else slice(x0, x1) if i == "X" else slice(None) if i == "C" else i
                    for i in self.index)
        with self.lock, quiet_tifffile():
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



# --------------------------------------------------------------------------- TIFF helpers
_QUIET = {"depth": 0, "disabled": False}
_QUIET_LOCK = threading.Lock()


@contextlib.contextmanager
def quiet_tifffile():
    """tifffile's logger silenced meanwhile: it logs every problem it meets in a damaged file (lines printed
    before the one-line error stmorph raises about the same problem)."""
    log = logging.getLogger("tifffile")
    with _QUIET_LOCK:
        if _QUIET["depth"] == 0:
            _QUIET["disabled"] = log.disabled
            log.disabled = True
        _QUIET["depth"] += 1
    try:
        yield
    finally:
        with _QUIET_LOCK:
            _QUIET["depth"] -= 1
            if _QUIET["depth"] == 0:
                log.disabled = _QUIET["disabled"]


def _check_shape(series, path) -> None:
    """ImageError for a series that is no image stmorph reads: one whose last axis, taken for X by tifffile,
    is a handful of values (an (H, W, 2) array stored as H pages of W x 2 px)."""
    axes, shape = series.axes, tuple(int(n) for n in series.shape)
    if "X" not in axes or "Y" not in axes:
        return  # refused with the axes by _tiff_levels
    width, height = shape[axes.index("X")], shape[axes.index("Y")]
    if len(shape) >= 3 and axes.endswith("X") and width <= 4:
        msg = (f"TIFF holds an array of shape {shape} (axes {axes!r}), i.e. {shape[0]} planes of {width} x "
               f"{height} px; if it is an image of {shape[-3]} x {shape[-2]} px with {width} values per pixel, "
               "only grayscale, RGB and RGBA (1, 3 or 4 samples per pixel, or gray + alpha) are read: save it "
               "as RGB.")
        raise ImageError(msg, path)
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
    _check_shape(series, path)
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
        levels[-1].path = path
    return levels



def open_tiff(path: str, cache_bytes: int) -> Slide:
    with quiet_tifffile():
        return _open_tiff(path, cache_bytes)


def _open_tiff(path: str, cache_bytes: int) -> Slide:
    import tifffile

    try:
        tif = tifffile.TiffFile(path)
    except Exception as e:  # noqa: BLE001 - tifffile raises many types on corrupt files
        msg = f"cannot read TIFF: {type(e).__name__}: {e}"
        raise ImageError(msg, path) from e
    lock = threading.RLock()
    slide = Slide([], path=path, dtype=np.uint8, fmt="TIFF", cache_bytes=cache_bytes, closer=tif.close,
                  backend="tiff")
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


