"""The slide interface every backend implements, and what the backends share.

A backend opens a file into a :class:`Slide`: a list of :class:`_Level` readers,
level 0 (full resolution) first. A level only has to know its ``height``,
``width``, storage ``tile`` and how to ``read(y0, y1, x0, x1)`` a region of its
own pixels as uint8 RGB (:class:`_ToRGB8` converts any supported source layout);
:class:`Slide` adds everything else (level-0 coordinates, out-of-image fill,
level choice by downsample, streamed thumbnails, the decoded-tile cache,
pickling, closing).

The tunable settings below are read at call time, so a caller (or a test) may
change them on this module.
"""

from __future__ import annotations

import math
import os
import resource
import threading
from collections import OrderedDict
from typing import Any

import numpy as np

from ...errors import ImageError, InputError
from ._fill import GLASS, GLASS_FILL, check_fill, paint_fill

#: Largest JPEG/PNG (in pixels) :func:`open_slide` decodes; beyond it, convert to a tiled pyramidal TIFF.
MAX_PIL_PIXELS = 2**31
#: Default byte budget of a slide's decoded-tile cache.
DEFAULT_CACHE_BYTES = 256 * 2**20
#: Bytes of decoded rows a thumbnail reads at a time.
_THUMB_BAND_BYTES = 32 * 2**20
#: Tile grid assumed for in-memory images (to order spot visits).
_ARRAY_TILE = 512
#: Environment variable: the most bytes one decode may allocate (``4e9``, ``4G``, ``512M``), instead of
#: :data:`DECODE_FRACTION` of the memory available.
DECODE_ENV = "STMORPH_MAX_DECODE_BYTES"
#: Default share of the memory available now (:func:`available_memory`) that one decode may use.
DECODE_FRACTION = 0.5
#: Decode units smaller than this are never checked against the budget (a check reads /proc).
DECODE_CHECK_FLOOR = 64 * 2**20
#: How to make an image readable in pieces, for the messages that refuse to decode one whole.
CONVERT_HINT = ("convert it to a tiled pyramidal TIFF (e.g. vips tiffsave IN OUT.tif --tile --pyramid "
                "--compression jpeg), which is read tile by tile")


# --------------------------------------------------------------------------- decode memory budget
def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def available_memory() -> int | None:
    """Bytes this process can still allocate: the least of Linux ``MemAvailable``, the room left under the
    cgroup's memory limit (v2 ``memory.max``, v1 ``memory.limit_in_bytes``) and the room left under
    ``RLIMIT_AS``; None when none of them is known."""
    room = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    room.append(int(line.split()[1]) * 1024)
                    break
    except (OSError, ValueError, IndexError):
        pass
    for limit, used in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        lim, cur = _read_int(limit), _read_int(used)
        if lim is not None and cur is not None and lim < 2**60:
            room.append(max(0, lim - cur))
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        try:
            with open("/proc/self/statm") as f:
                vsize = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            vsize = 0
        room.append(max(0, soft - vsize))
    return min(room) if room else None


_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def max_decode_bytes() -> int | None:
    """Most bytes one image decode may allocate: ``$STMORPH_MAX_DECODE_BYTES`` (bytes, or with a K/M/G/T
    suffix), else :data:`DECODE_FRACTION` of :func:`available_memory`, else None (no bound known)."""
    env = os.environ.get(DECODE_ENV, "").strip()
    if env:
        text = env.upper().removesuffix("IB").removesuffix("B")
        unit = text[-1:] if text[-1:] in _UNITS else ""
        try:
            value = float(text[: len(text) - len(unit)]) * _UNITS[unit]
        except ValueError:
            value = float("nan")
        if not value > 0:
            msg = f"${DECODE_ENV}={env!r} is not a positive number of bytes (e.g. 4e9, 4G or 512M)."
            raise InputError(msg)
        return int(value)
    room = available_memory()
    return None if room is None else int(room * DECODE_FRACTION)


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**28 else f"{n / 2**20:.0f} MiB"


def check_decode(path, need: int, what: str, hint: str = CONVERT_HINT) -> None:
    """ImageError naming ``path``, its size on disk and ``hint`` when decoding ``what`` would need more than
    :func:`max_decode_bytes` (``need`` bytes)."""
    budget = max_decode_bytes()
    if budget is None or need <= budget:
        return
    where = "set by $" + DECODE_ENV if os.environ.get(DECODE_ENV, "").strip() else (
        f"{DECODE_FRACTION:.0%} of the memory available; ${DECODE_ENV} sets another limit")
    try:
        size = f" ({_gib(os.path.getsize(path))} on disk)" if path is not None and os.path.isfile(path) else ""
    except OSError:
        size = ""
    msg = (f"decoding {what}{size} would take about {_gib(need)} of memory, more than the {_gib(budget)} one "
           f"decode may use ({where}); {hint}.")
    raise ImageError(msg, path)


# --------------------------------------------------------------------------- conversion to uint8 RGB
class _ToRGB8:
    """Converts arrays of one source layout to uint8 RGB ``(h, w, 3)``.

    Built once per image from its dtype, number of samples and photometric
    interpretation; applied to every tile/region read.
    """

    def __init__(self, dtype, samples: int, *, bits: int | None = None, photometric: int | None = None,
                 colormap: np.ndarray | None = None, float_scale: float | None = None, alpha: str = "unassoc",
                 background=GLASS, path=None):
        dtype = np.dtype(dtype)
        self.dtype = dtype
        self.samples = samples
        self.alpha = alpha  # last sample of gray+alpha / RGBA: "unassoc", "assoc" (premultiplied) or "none" (drop)
        self.background = np.asarray(background, np.float32)  # what transparent pixels show (the slide's glass)
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

    def work_bytes_per_px(self) -> int:
        """Bytes per pixel that converting a decoded array allocates at most, besides the array itself."""
        s = self.samples
        if self.lut is not None:
            return 3 + self.dtype.itemsize
        if s == 3 and self.dtype == np.uint8 and not self.invert:
            return 0  # returned as it is (a copy only of a region that is not contiguous)
        b = 3  # the uint8 RGB result
        if self.dtype == np.bool_:
            b += 2 * s
        elif self.scale is not None:
            b += 5 * s  # float32 working copy and its uint8 result
        if s in (2, 4) and self.alpha != "none":
            b += 13 * (s - 1) + 4  # float32 alpha, colour and compositing temporaries
        if self.invert:
            b += s
        return b

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
        if n in (2, 4):  # composite on the background colour (white unless the slide declares one)
            alpha = a[:, :, n - 1]
            color = a[:, :, : n - 1]
            if self.alpha != "none" and alpha.min() < 255:
                af = alpha.astype(np.float32)[:, :, None] * np.float32(1 / 255)
                cf = color.astype(np.float32)
                if self.alpha == "unassoc":
                    cf *= af
                bg = self.background[: n - 1] if n == 4 else self.background.mean(keepdims=True)
                cf += bg * (1 - af) + np.float32(0.5)
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

    def thumbnail(self, max_side: int) -> np.ndarray | None:
        """A cheaper thumbnail than streaming the whole level (e.g. JPEG draft mode), or None."""
        return None

    def decode_bytes(self) -> tuple[int, str]:
        """``(bytes, what)``: the memory that decoding the smallest piece this level can decode takes (a tile,
        a strip, the whole image), and what that piece is, for messages. ``(0, "")`` where reads cost only
        what they return (memory-mapped or in-memory arrays)."""
        return 0, ""

    def check_decode(self, path) -> None:
        """ImageError (:func:`check_decode`) when this level's decode unit does not fit the decode budget."""
        need, what = self.decode_bytes()
        if need:
            check_decode(path, need, what)

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


def _shrink_to(arr: np.ndarray, max_side: int, Image=None) -> np.ndarray:
    if Image is None:
        from PIL import Image
    h, w = arr.shape[:2]
    s = max_side / max(h, w)
    if s >= 1:
        return arr
    size = (max(1, round(w * s)), max(1, round(h * s)))
    return np.asarray(Image.fromarray(arr).resize(size, Image.BILINEAR, reducing_gap=2.0))


def _reduce_level(lv: _Level, f: int, Image, paint=None) -> np.ndarray:
    """Whole level area-averaged by an integer factor ``f``, streamed along tile rows.

    Reads bands of whole tile rows (about 32 MB) without filling the tile cache (bands of one tile row,
    kept in the cache, where a tile row is larger),
    carries the rows left over when a band is not a multiple of ``f`` into the
    next band, so the result equals ``Image.reduce(f)`` of the whole level while
    only one band is in memory. ``paint``, if given, is applied to each band in place first.
    """
    th = lv.tile[0]
    rows = max(1, _THUMB_BAND_BYTES // (3 * lv.width))
    # whole tile rows per band when one fits; else bands of a tile row, which stays in the cache meanwhile
    step, cache = (th * (rows // th), False) if th <= rows else (rows, True)
    parts = []
    carry = None
    for y0 in range(0, lv.height, step):
        y1 = min(lv.height, y0 + step)
        a = lv.read(y0, y1, 0, lv.width, cache=cache)
        if paint is not None:
            a = paint(np.array(a))  # a copy: a level may return a view of its cache or of the caller's array
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
    format
        What the file is (``"TIFF"``, ``"JPEG"``, ``"aperio"``, ...).
    backend
        The backend that opened it (``"tiff"``, ``"pil"``, ``"openslide"``, ``"array"``).
    background
        ``(r, g, b)``: the colour of the slide's glass, shown where nothing was scanned: OpenSlide's
        ``openslide.background-color`` when the file declares one, else white. Transparent pixels
        are composited onto it; reads with ``fill="glass"`` paint black fill and the area outside
        the image with it (:mod:`stmorph.im.slide._fill`).
    """

    def __init__(self, levels: list[_Level], *, path: str | None, dtype, fmt: str,
                 cache_bytes: int = DEFAULT_CACHE_BYTES, closer=None, backend: str | None = None,
                 background=GLASS):
        self._levels = levels
        self.path = path
        self.dtype = np.dtype(dtype)
        self.format = fmt
        self._cache = _TileCache(cache_bytes)
        self._closer = closer
        self._closed = False
        self._base_level = 0
        self.backend = backend
        self.background = tuple(int(v) for v in background)

    def __reduce__(self):
        # picklable (e.g. for DataLoader worker processes): a file-backed slide reopens its file
        if self.path is not None:
            return (_reopen, (self.path, self.backend),
                    {"_base_level": self._base_level, "_cache_bytes": self._cache.max_bytes})
        return (_reopen, (self._levels[0].array, None))

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

    def best_level_for_downsample(self, downsample: float) -> int:
        """The smallest level whose downsample is at most ``downsample`` (level-0 pixels per pixel).

        Reading there and reducing by the remaining factor never upsamples; as
        OpenSlide's ``get_best_level_for_downsample``.
        """
        ds = float(downsample)
        if not math.isfinite(ds) or ds <= 0:
            msg = f"downsample must be a positive number, got {downsample}."
            raise InputError(msg, self.path)
        best = 0
        for i, d in enumerate(self.level_downsamples):
            if d <= ds * (1 + 1e-6):
                best = i
        return best

    def _level(self, level: int) -> _Level:
        if self._closed:
            msg = "slide is closed."
            raise ImageError(msg, self.path)
        if not -len(self._levels) <= level < len(self._levels):
            msg = f"level {level} does not exist; the slide has {len(self._levels)} level(s)."
            raise InputError(msg, self.path)
        return self._levels[level]

    # reading ---------------------------------------------------------------
    def read_region(self, x: int, y: int, w: int, h: int, *, level: int = 0, fill: int | str = 255) -> np.ndarray:
        """Read a rectangle as uint8 RGB ``(h, w, 3)``.

        ``x``, ``y`` (top-left corner) are level-0 (full-resolution) pixels, as
        spot coordinates are; ``w``, ``h`` are pixels of ``level`` (as in
        OpenSlide). Any part outside the image is filled with ``fill`` (0-255);
        ``fill="glass"`` paints it, and the image's black fill, with :attr:`background`
        (see :mod:`stmorph.im.slide._fill`).
        """
        lv = self._level(level)
        w, h = int(w), int(h)
        if w < 0 or h < 0:
            msg = f"region size must be non-negative, got w={w}, h={h}."
            raise InputError(msg, self.path)
        fill = check_fill(fill, self.path)
        if level not in (0, -len(self._levels)):
            x = int(math.floor(x * lv.width / self.width + 0.5))
            y = int(math.floor(y * lv.height / self.height + 0.5))
        else:
            x, y = int(x), int(y)
        return self._read(lv, x, y, w, h, fill)

    def _read(self, lv: _Level, x: int, y: int, w: int, h: int, fill: int | str,
              out: np.ndarray | None = None) -> np.ndarray:
        """Region of level ``lv`` (its own pixels) into ``out`` (h, w, 3) or a new array.

        ``fill``: the value outside the image, or ``"glass"``: :attr:`background` there and on black fill.
        """
        if out is None:
            out = np.empty((h, w, 3), np.uint8)
        glass = fill == GLASS_FILL
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + w, lv.width), min(y + h, lv.height)
        if not (x0 == x and y0 == y and x1 == x + w and y1 == y + h):
            out[...] = self.background if glass else fill
        if x1 > x0 and y1 > y0:
            inner = out[y0 - y: y1 - y, x0 - x: x1 - x]
            inner[...] = lv.read(y0, y1, x0, x1)
            if glass:
                paint_fill(inner, self.background)
        return out

    def thumbnail(self, max_side: int = 2000, *, fill: str | None = None) -> tuple[np.ndarray, float]:
        """A downscaled RGB image whose longer side is at most ``max_side``.

        Built from the smallest pyramid level at least that large, streamed in
        bands (area-averaged), so a non-pyramidal 30k x 30k TIFF never sits in
        memory whole. ``fill="glass"``: black fill painted with :attr:`background`
        (before the area averaging where the thumbnail is streamed).

        Returns
        -------
        ``(image, scale)``: uint8 ``(h, w, 3)`` and thumbnail pixels per level-0 pixel
        (multiply ``obsm["spatial"]`` by it to plot spots on the thumbnail).
        """
        from PIL import Image

        max_side = int(max_side)
        if fill not in (None, GLASS_FILL):
            msg = f"thumbnail fill must be None or 'glass', got {fill!r}."
            raise InputError(msg, self.path)
        if max_side < 1:
            msg = f"max_side must be >= 1, got {max_side}."
            raise InputError(msg, self.path)
        self._level(0)
        k = 0
        for i, lv in enumerate(self._levels):
            if max(lv.width, lv.height) >= max_side:
                k = i
        lv = self._levels[k]
        paint = (lambda a: paint_fill(a, self.background)) if fill == GLASS_FILL else None
        thumb = lv.thumbnail(max_side)
        if thumb is None:
            thumb = _shrink_to(_reduce_level(lv, max(1, max(lv.width, lv.height) // max_side), Image, paint),
                               max_side, Image)
        elif paint is not None:
            thumb = paint(np.array(thumb))
        return thumb, thumb.shape[1] / self.width

    def check_decode(self, level: int = 0) -> None:
        """Raise ImageError now, before any pixel is decoded, when reading ``level`` would take more memory
        than one decode may use (:func:`max_decode_bytes`): a JPEG/PNG decoded whole, a TIFF strip or tile,
        a zarr chunk. Every read checks the same on first use; readers call this to fail before any work."""
        self._level(level).check_decode(self.path)

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




def _reopen(source, backend: str | None) -> Slide:
    """Unpickling: open the file again with the backend that opened it."""
    from . import open_slide

    return open_slide(source, backend=backend)
