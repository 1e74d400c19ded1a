"""The tissue mask of a slide: which thumbnail pixels are stained tissue (saturation above Otsu's threshold).

Used by the dense path (:mod:`._dense`: tiles without tissue are skipped) and by the section pooling
(:mod:`._section`: the mask, closed and hole-filled, is the section a context patch is averaged over).
"""

from __future__ import annotations

import numpy as np

from .slide import Slide
from .slide._fill import GLASS_FILL

#: Saturation thresholds bounding Otsu's (see :func:`tissue_mask`).
MIN_SATURATION, MAX_SATURATION = 0.03, 0.10

__all__ = ["otsu_threshold", "tissue_mask"]


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of values in [0, 1] (maximises the between-class variance of a histogram)."""
    hist, edges = np.histogram(np.asarray(values, np.float64).ravel(), bins=bins, range=(0.0, 1.0))
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist).astype(np.float64)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    best = np.flatnonzero(between >= between.max() * (1 - 1e-9))  # a flat top (an empty gap): its middle
    return float(edges[(best[0] + best[-1]) // 2 + 1])


def tissue_mask(image, *, max_side: int = 2048) -> tuple[np.ndarray, float, float]:
    """Tissue pixels of a slide's thumbnail.

    The saturation ``(max - min) / max`` of each RGB thumbnail pixel is thresholded at Otsu's
    threshold, clipped to [0.03, 0.10]: stained tissue is saturated, glass and white background
    are not; the clip keeps a sensible mask when the section has no background (Otsu would then
    split tissue from tissue) or the background is noise-free (Otsu near 0). Black fill (a
    background masked black, whose JPEG noise such as ``(3, 0, 1)`` is fully saturated) is
    painted as glass first (:func:`stmorph.im.slide._fill.paint_fill`), so it is never tissue.

    Parameters
    ----------
    image
        A :class:`Slide`, a path or an array (see :func:`open_slide`).
    max_side
        Longer side of the thumbnail.

    Returns
    -------
    ``(mask, scale, threshold)``: bool ``(h, w)``, thumbnail pixels per level-0 pixel, and the
    saturation threshold used.
    """
    from .slide import open_slide

    own = not isinstance(image, Slide)
    slide = open_slide(image) if own else image
    try:
        thumb, scale = slide.thumbnail(max_side, fill=GLASS_FILL)
    finally:
        if own:
            slide.close()
    rgb = thumb.astype(np.float32)
    mx, mn = rgb.max(axis=2), rgb.min(axis=2)
    sat = (mx - mn) / np.maximum(mx, 1.0)
    t = float(np.clip(otsu_threshold(sat), MIN_SATURATION, MAX_SATURATION))
    return sat > t, scale, t
