"""Smooth Gaussian random fields: the one source of spatial randomness of the synthetic generators.

Region maps (:mod:`._synthetic`, :mod:`._visium_hd`), stain variation and fibre orientation
(:mod:`._image`) are all drawn from it, so it lives apart from each of them.
"""

from __future__ import annotations

import math

import numpy as np


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian random field (mean 0, sd 1) smoothed with ``sigma`` cells (FFT, non-periodic via padding)."""
    pad = int(math.ceil(3 * sigma))
    h, w = shape[0] + 2 * pad, shape[1] + 2 * pad
    noise = rng.standard_normal((h, w))
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    kern = np.exp(-2.0 * (math.pi * sigma) ** 2 * (fy**2 + fx**2))
    f = np.fft.irfft2(np.fft.rfft2(noise) * kern, s=(h, w))[pad:pad + shape[0], pad:pad + shape[1]]
    f -= f.mean()
    sd = f.std()
    return f / sd if sd > 0 else f
