"""Slide fill as glass: what an image shows where there is no scanned tissue.

Whole-slide images mark "nothing here" in three ways, and a CNN sees each differently:

- **transparent** pixels (alpha 0): OpenSlide returns them outside the scanned area of
  ``.mrxs``, ``.ndpi``, ... and publishes the colour meant behind them as the property
  ``openslide.background-color`` (white when absent); RGBA TIFF/PNG files use them for masks.
  Every read composites alpha onto the slide's background colour (:attr:`Slide.background`),
  never onto black;
- **pure black** fill: renderings and exports that mask the background paint it ``(0, 0, 0)``
  (HER2ST A1's H&E: 59% of its pixels). Black is not what glass looks like to an ImageNet CNN,
  so with ``fill="glass"`` (the default of :func:`stmorph.im.features`) every pixel whose three
  channels are all at most :data:`BLACK_FILL_MAX` becomes the background colour;
- pixels **outside the image** (patches crossing the border): with ``fill="glass"`` they get the
  same colour.

:func:`paint_fill` is the one place the rule lives; the patch path, the dense path and the
dense path's tissue mask all call it (through ``Slide._read`` and ``Slide.thumbnail``).

Why a per-pixel rule, and why 16: stained tissue is never black in all three channels (the
darkest haematoxylin nuclei keep a blue channel of 40-60), so the rule needs no look at
neighbours, which keeps the patch and dense paths identical whatever the read window. Measured
(``benchmarks/bench_glass_fill.py --pixels`` on ``../shared/data``): on HER2ST A1 (2000 px PNG) a
threshold of 16 paints 67 of its 1.72 million pixels lying more than 3 px from the black fill
(0.004%; 795 including the anti-aliased rim of the fill); on the full-resolution JPEGs C2 and B4
(92 million pixels each, real glass, no black fill) 116 and 142 pixels (1.3e-6, 1.5e-6); after
re-encoding A1 as JPEG at quality 75 it still catches all but 0.01% of the fill (at 4: 0.35%),
while 24 or more starts to reach into dark tissue (A1: 339 pixels away from the fill at 24,
2,754 at 40).

The background colour itself is the slide's: OpenSlide's ``openslide.background-color`` when the
file declares one, else white, the colour stmorph already used for every "no tissue" pixel it
makes (alpha, padding outside the image, the dense path's background tiles), so fill, padding
and transparent areas all give the CNN the same input.
"""

from __future__ import annotations

import numpy as np

from ...errors import InputError

#: The background colour of a slide that declares none: white, as a brightfield slide's glass.
GLASS = (255, 255, 255)
#: A pixel is black fill when each of its three channels is at most this (see the module docstring).
BLACK_FILL_MAX = 16
#: The values ``fill=`` takes to mean "paint fill as glass".
GLASS_FILL = "glass"


def paint_fill(rgb: np.ndarray, glass=GLASS, *, threshold: int = BLACK_FILL_MAX) -> np.ndarray:
    """Paint the black fill of uint8 RGB pixels ``(..., 3)`` with ``glass``, in place; returns ``rgb``.

    A pixel is fill when all three channels are ``<= threshold``; other pixels (dark nuclei such
    as ``(40, 20, 60)`` included) are left as they are.
    """
    if rgb.size == 0:
        return rgb
    t = np.uint8(threshold)
    fill = (rgb[..., 0] <= t) & (rgb[..., 1] <= t) & (rgb[..., 2] <= t)
    if fill.any():
        rgb[fill] = np.asarray(glass, np.uint8)
    return rgb


def parse_color(value, default=GLASS) -> tuple[int, int, int]:
    """An ``(r, g, b)`` tuple from OpenSlide's ``background-color`` (``"RRGGBB"`` hex), or ``default``."""
    if value is None:
        return tuple(default)
    s = str(value).strip().lstrip("#")
    if len(s) != 6:
        return tuple(default)
    try:
        return tuple(int(s[i: i + 2], 16) for i in (0, 2, 4))
    except ValueError:
        return tuple(default)


def check_fill(fill, path=None):
    """``fill`` of a read: an int 0..255 (pixels outside the image, others as read) or ``"glass"``."""
    if isinstance(fill, str):
        if fill == GLASS_FILL:
            return fill
    elif not isinstance(fill, bool) and isinstance(fill, (int, np.integer)) and 0 <= int(fill) <= 255:
        return int(fill)
    msg = f"fill must be an int within 0..255 or 'glass', got {fill!r}."
    raise InputError(msg, path)


def read_fill(fill, what: str = "fill"):
    """The read ``fill`` of a feature path's ``fill`` option: ``"glass"`` -> ``"glass"``, None -> 255 (raw pixels,
    white outside the image, as before the option existed)."""
    if fill is None:
        return 255
    if isinstance(fill, str) and fill == GLASS_FILL:
        return fill
    msg = f"{what} must be 'glass' or None, got {fill!r}."
    raise InputError(msg)


def fill_params(slide, fill) -> dict:
    """What ``fill`` did to a slide's pixels, for a feature cache key and ``uns[...]["params"]``."""
    if fill is None:
        return {"fill": None}
    return {"fill": GLASS_FILL, "glass_rgb": [int(v) for v in slide.background], "black_fill_max": BLACK_FILL_MAX}
