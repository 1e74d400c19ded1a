"""Pooling an encoder's feature map over the tissue section only (``features(..., pool="section")``).

A context patch (the ``stmorph`` method's 6 spot spacings) around a spot near the edge of the section
shows glass beyond the edge. Averaged over the whole patch, the encoder's features then say mostly *how
far the spot is from the edge*, and a clustering spends a domain on a band along the tissue border,
which no pathologist would draw (measured on HER2ST A1, docs/design-notes.md). With
``pool="section"`` the encoder still sees the whole patch, but its last feature map is averaged over the
cells that lie inside the section only:

    section mask   :func:`~stmorph.im.tissue_mask` (saturation above Otsu's threshold) on the slide's
                   thumbnail, closed and with its holes filled, so adipose tissue, lumens and vessels
                   inside the section count as section while the glass around it does not
    cell weights   each cell of the encoder's map (:func:`~stmorph.im._fmap.cell_geometry` gives where
                   its centre lies in the patch) weighs 1 inside the section and 0 outside it or outside
                   the image; a spot whose cells all fall outside the mask keeps the plain average

What it does not remove: a cell inside the section still sees the glass within its receptive field, which
for EfficientNet-Lite2's last map spans most of the patch. On HER2ST A1 the section-pooled features of
SENCA-st's context patch (side 6 spacings) still predict a spot's distance to the section's border (R^2 0.80
of a linear fit on 10 principal components, against 0.14 for the spot patch's features;
``benchmarks/bench_stmorph.py --border``, BENCHMARKS.md section 7); a patch of the spot and its first ring
(side 3 spacings, the ``stmorph`` method's default since 2026-12-01) halves the glass it can see (R^2 0.50).
Describing the context by encoding tissue tiles one by one would remove it. A glass-free stand-in measured in
place of the context patch (the spot features' neighbourhood mean at 300 um) lowered the ``stmorph`` ARI on A1
(0.427 against 0.496) and on the synthetic section (0.882 against 0.945), 5 seeds, so it was not pursued.

Only convolutional encoders whose module has ``forward_features`` returning the map (EfficientNet-Lite2,
ResNet-50) support it; the map is computed by PyTorch even where ONNX Runtime runs the plain features.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from ._fmap import _trunk, cell_geometry
from ._tissue import tissue_mask
from .slide import Slide

#: Closing of the thumbnail's tissue mask before its holes are filled (iterations of a 5 x 5 square).
CLOSING_ITERATIONS = 2


def section_mask(image, *, max_side: int = 2048) -> tuple[np.ndarray, float]:
    """The tissue section on a slide's thumbnail: ``(mask bool (h, w), thumbnail pixels per level-0 pixel)``.

    :func:`~stmorph.im.tissue_mask`, closed (two iterations of a 5 x 5 square) and with every hole
    filled: what lies inside the section's outline counts, whatever its stain.
    """
    mask, scale, _ = tissue_mask(image, max_side=max_side)
    return section_of(mask), float(scale)


def in_mask(mask: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """bool ``(..., len(ys), len(xs))``: whether each grid point of the rows ``ys`` by the columns ``xs``
    (thumbnail pixels, leading dimensions broadcast) lies in ``mask``; outside the mask's frame it does not."""
    mh, mw = mask.shape
    yi, xi = np.floor(ys).astype(np.int64), np.floor(xs).astype(np.int64)
    oky, okx = (yi >= 0) & (yi < mh), (xi >= 0) & (xi < mw)
    inside = mask[np.clip(yi, 0, mh - 1)[..., :, None], np.clip(xi, 0, mw - 1)[..., None, :]]
    return inside & oky[..., :, None] & okx[..., None, :]


def section_of(mask: np.ndarray) -> np.ndarray:
    """The section from a thumbnail's tissue mask (:func:`~stmorph.im.tissue_mask`): closed (two iterations of a
    5 x 5 square) and with every hole filled."""
    from scipy import ndimage as ndi

    closed = ndi.binary_closing(mask, structure=np.ones((5, 5), bool), iterations=CLOSING_ITERATIONS)
    return ndi.binary_fill_holes(closed | mask)


class SectionPool:
    """Weights of an encoder's map cells for patches centred on ``xy``: 1 inside the section, 0 outside.

    Call it with the rows of a batch, the patch side (level-0 pixels) and the map's ``(h, w)``; it returns
    float32 ``(len(rows), h, w)``.
    """

    def __init__(self, slide: Slide, xy: np.ndarray, enc, *, device="cpu"):
        import threading

        try:
            self.stride, self.lost, _ = cell_geometry(enc, device=device)
        except InputError:
            msg = (f"pool='section' needs a convolutional encoder whose feature map can be averaged over the "
                   f"section (efficientnet_lite2, resnet50); {enc.name!r} is not one: use pool='mean'.")
            raise InputError(msg) from None
        self.mask, self.scale = section_mask(slide)
        self.xy = np.asarray(xy, dtype=np.float64)
        self.input_size = int(enc.input_size)
        self.trunk = _trunk(enc)
        self.n_fallback = 0  # spots whose cells all lay outside the section (plain average kept)
        self._lock = threading.Lock()

    def cell_offsets(self, size: int, n_cells: int) -> np.ndarray:
        """Level-0 offsets from a patch's origin of the centres of ``n_cells`` map cells along one side."""
        centre_in = (self.lost - 1) / 2 + self.stride * np.arange(n_cells)  # input pixels
        return (centre_in + 0.5) * (size / self.input_size)

    def __call__(self, rows: np.ndarray, size: int, h: int, w: int) -> np.ndarray:
        from ._patches import patch_origins

        origin = patch_origins(self.xy[rows], int(size)).astype(np.float64)  # (B, 2) x0, y0
        ys = (origin[:, 1:2] + self.cell_offsets(size, h)[None]) * self.scale  # (B, h) thumbnail rows
        xs = (origin[:, 0:1] + self.cell_offsets(size, w)[None]) * self.scale  # (B, w)
        wts = in_mask(self.mask, ys, xs)
        empty = ~wts.any(axis=(1, 2))
        with self._lock:
            self.n_fallback += int(empty.sum())
        out = wts.astype(np.float32)
        out[empty] = 1.0
        return out


def pooled(fmap, weights):
    """Weighted average over the cells of a map ``(B, C, h, w)`` (torch) with weights ``(B, h, w)``, float32."""
    import torch

    w = torch.as_tensor(weights, device=fmap.device, dtype=torch.float32)[:, None]
    return (fmap.float() * w).sum(dim=(2, 3)) / w.sum(dim=(2, 3)).clamp_min(1e-12)


def check_pool(pool, n: int) -> list[str]:
    """``pool`` as a list of ``n`` values from ``("mean", "section")``."""
    values = [pool] * n if isinstance(pool, str) else list(pool)
    if len(values) != n or any(v not in ("mean", "section") for v in values):
        msg = f"pool={pool!r} must be 'mean' or 'section', or one of them per patch ({n})."
        raise InputError(msg)
    return values
