"""In-memory images (numpy arrays ``(h, w)`` or ``(h, w, 1|2|3|4)``): a single level, no file."""

from __future__ import annotations

import numpy as np

from ...errors import ImageError, InputError
from ._base import Slide, _ArrayLevel, _ToRGB8


def open_array(array: np.ndarray, level: int) -> Slide:
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
    return Slide([_ArrayLevel(a, conv)], path=None, dtype=a.dtype, fmt="array", backend="array")

