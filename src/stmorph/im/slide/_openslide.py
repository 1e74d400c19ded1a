"""Vendor whole-slide formats through OpenSlide (optional extra ``stmorph[openslide]``).

Claims ``.svs .ndpi .mrxs .scn .bif .vms .vmu .svslide`` when ``openslide``
imports (openslide-python with the openslide-bin wheel); any other file OpenSlide
reads (e.g. a generic tiled TIFF) only with ``open_slide(path, backend="openslide")``.
Reads are lazy: OpenSlide decodes only the tiles a region touches, into its own
cache bounded by ``cache_bytes``; every pyramid level OpenSlide reports is a
level of the slide, so :meth:`Slide.best_level_for_downsample` and
``read_region(..., level=k)`` read the stored downsampled data. OpenSlide returns
RGBA; transparent pixels (outside the scanned area) are composited on the slide's
declared background colour, the property ``openslide.background-color`` (white when the file
declares none), which becomes :attr:`Slide.background` (see :mod:`._fill`).
"""

from __future__ import annotations

import math

import numpy as np

from ...errors import DependencyError, ImageError
from ._base import Slide, _Level, _ToRGB8
from ._fill import parse_color

#: File suffixes (lower case) this backend claims by default.
SUFFIXES = (".svs", ".ndpi", ".mrxs", ".scn", ".bif", ".vms", ".vmu", ".svslide")
_INSTALL = "pip install 'stmorph[openslide]'"


def _module(path: str | None = None):
    """The ``openslide`` module, or DependencyError naming ``path``."""
    try:
        import openslide
    except (ImportError, OSError) as e:  # OSError: the Python package without the OpenSlide library
        where = f"{path}: " if path else ""
        msg = (f"{where}reading this whole-slide format needs OpenSlide, which cannot be imported "
               f"({type(e).__name__}: {e}); install it with: {_INSTALL}")
        raise DependencyError(msg) from e
    return openslide


def available() -> bool:
    """Whether OpenSlide can be imported here."""
    try:
        _module()
    except DependencyError:
        return False
    return True


class _OpenSlideLevel(_Level):
    """Level ``k`` of an ``openslide.OpenSlide``: regions read with ``read_region`` (level-0 origin)."""

    def __init__(self, slide: Slide, osr, k: int):
        self.slide, self.osr, self.k = slide, osr, k
        self.width, self.height = (int(v) for v in osr.level_dimensions[k])
        self.downsample = float(osr.level_downsamples[k])
        props = osr.properties
        try:
            self.tile = (int(props[f"openslide.level[{k}].tile-height"]),
                         int(props[f"openslide.level[{k}].tile-width"]))
        except (KeyError, ValueError):
            self.tile = (256, 256)
        self.convert = _ToRGB8(np.uint8, 4, alpha="unassoc", background=slide.background)

    def read(self, y0, y1, x0, x1, cache=True):
        from openslide import OpenSlideError

        loc = (int(math.floor(x0 * self.downsample + 0.5)), int(math.floor(y0 * self.downsample + 0.5)))
        try:
            im = self.osr.read_region(loc, self.k, (x1 - x0, y1 - y0))
        except OpenSlideError as e:
            msg = f"OpenSlide cannot read level {self.k} at {loc}: {e}"
            raise ImageError(msg, self.slide.path) from e
        return self.convert(np.asarray(im))

    def close(self):
        self.osr = None


def open_openslide(path: str, cache_bytes: int) -> Slide:
    openslide = _module(path)
    try:
        osr = openslide.OpenSlide(path)
    except openslide.OpenSlideUnsupportedFormatError as e:
        msg = f"OpenSlide does not recognise this file as a whole-slide image it can read ({e or 'unknown format'})."
        raise ImageError(msg, path) from e
    except (openslide.OpenSlideError, OSError) as e:
        msg = f"OpenSlide cannot read this file (truncated or corrupt?): {e}"
        raise ImageError(msg, path) from e
    try:
        if cache_bytes and hasattr(openslide, "OpenSlideCache"):
            osr.set_cache(openslide.OpenSlideCache(int(cache_bytes)))
        vendor = osr.properties.get("openslide.vendor") or "OpenSlide"
        slide = Slide([], path=path, dtype=np.uint8, fmt=vendor, cache_bytes=cache_bytes, closer=osr.close,
                      backend="openslide", background=parse_color(osr.properties.get("openslide.background-color")))
        slide._levels = [_OpenSlideLevel(slide, osr, k) for k in range(osr.level_count)]
        if not slide._levels or slide.width < 1 or slide.height < 1:
            msg = "OpenSlide reports no image level in this file."
            raise ImageError(msg, path)
    except ImageError:
        osr.close()
        raise
    except Exception as e:  # noqa: BLE001 - any OpenSlide failure on a damaged file
        osr.close()
        msg = f"OpenSlide cannot read this file: {type(e).__name__}: {e}"
        raise ImageError(msg, path) from e
    return slide
