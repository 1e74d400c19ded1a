"""Spatial neighbourhoods in micrometres: the smoothing kernel and the refinement graph.

Distances are physical (full-resolution pixels times microns per pixel), so
the same radius means the same piece of tissue on legacy ST (200 um pitch),
Visium (100 um) and Visium HD bins. Graphs are sparse and built with a k-d
tree, so cost grows linearly with the number of spots for a fixed radius.

- :func:`spot_spacing` (from :mod:`stmorph._spatial`): the median distance from a spot to its nearest other spot.
- :func:`radius_graph`: every pair of spots closer than a radius, with their distance.
- :func:`gaussian_smoother`: a row-stochastic Gaussian kernel (``W @ X`` = neighbourhood mean of ``X``):
  a sparse matrix when each spot has few neighbours within the kernel (ST, Visium), a
  :class:`GridSmoother` (the same kernel as a convolution on a grid, memory linear in the number of
  spots) when it has hundreds or thousands (Visium HD bins: a 100 um kernel over 8 um bins reaches
  about 3,000 of them, which as a sparse matrix is 12 GB at 100,000 bins).
- :func:`block_diag`: smoothers of several sections as one, a neighbourhood never crossing sections.
- :func:`refine_labels`: majority vote over spatial neighbours (SpaGCN / GraphST style), by default within
  :func:`refine_radius` (the first ring of neighbours, never farther than :data:`REFINE_MAX_UM`).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from .. import _spatial
from .._spatial import spot_spacing
from ..errors import InputError


def coordinates_um(adata) -> np.ndarray:
    """Spot centres in micrometres ``(n_obs, 2)``."""
    return _spatial.coordinates(adata) * _spatial.microns_per_pixel(adata)


def radius_graph(xy_um: np.ndarray, radius_um: float) -> sp.csr_matrix:
    """Sparse ``(n, n)`` matrix of distances between spots closer than ``radius_um`` (self excluded).

    A pair at distance exactly 0 (duplicated coordinates) is stored with a tiny
    positive distance so that it is not dropped as an implicit zero.
    """
    from scipy.spatial import cKDTree

    if not np.isfinite(radius_um) or radius_um <= 0:
        msg = f"radius_um={radius_um} must be a positive number of micrometres."
        raise InputError(msg)
    n = xy_um.shape[0]
    tree = cKDTree(xy_um)
    pairs = tree.query_pairs(float(radius_um), output_type="ndarray")
    if pairs.size == 0:
        return sp.csr_matrix((n, n))
    i, j = pairs[:, 0], pairs[:, 1]
    d = np.linalg.norm(xy_um[i] - xy_um[j], axis=1)
    d = np.maximum(d, 1e-9)
    D = sp.coo_matrix((np.concatenate([d, d]), (np.concatenate([i, j]), np.concatenate([j, i]))), shape=(n, n))
    return D.tocsr()


#: Above this many expected neighbours within the kernel, :func:`gaussian_smoother` convolves on a grid.
GRID_NEIGHBOURS = 200


def gaussian_smoother(xy_um: np.ndarray, sigma_um: float, *, truncate: float = 2.5,
                      include_self: bool = True, method: str = "auto"):
    """Row-stochastic Gaussian kernel ``W`` (``W @ X`` is each spot's neighbourhood mean of ``X``).

    Weights ``exp(-d^2 / 2 sigma^2)`` for every spot within ``truncate * sigma_um``;
    the spot itself has weight 1 when ``include_self`` (otherwise a spot with no
    neighbour keeps only itself, so no row is empty).

    ``method="sparse"`` builds the ``(n, n)`` sparse matrix; ``"grid"`` returns a
    :class:`GridSmoother`, the same kernel applied as a convolution on a grid
    of cells of the spot spacing (positions rounded to the nearest cell centre,
    exact for spots on a square grid such as Visium HD bins); ``"auto"`` takes
    the grid when a spot has more than :data:`GRID_NEIGHBOURS` spots within the
    kernel on average, where the sparse matrix would hold that many entries per
    spot. Both support ``W @ X``, ``W.T @ X`` and ``W.sum(axis=0)``.
    """
    if not np.isfinite(sigma_um) or sigma_um <= 0:
        msg = f"sigma_um={sigma_um} must be a positive number of micrometres."
        raise InputError(msg)
    if method not in ("auto", "sparse", "grid"):
        msg = f"method={method!r} is not one of 'auto', 'sparse', 'grid'."
        raise InputError(msg)
    n = xy_um.shape[0]
    spacing = spot_spacing(xy_um) if n > 1 else float("nan")
    if method == "auto":
        expected = np.pi * (truncate * sigma_um) ** 2 / spacing**2 if np.isfinite(spacing) and spacing > 0 else 0.0
        method = "grid" if expected > GRID_NEIGHBOURS else "sparse"
    if method == "grid":
        return GridSmoother(xy_um, sigma_um, truncate=truncate, include_self=include_self,
                            cell_um=min(spacing, sigma_um / 2.0) if np.isfinite(spacing) and spacing > 0 else sigma_um / 2.0)
    W = radius_graph(xy_um, truncate * sigma_um)
    W.data = np.exp(-(W.data**2) / (2.0 * sigma_um**2))
    deg = np.asarray(W.sum(axis=1)).ravel()
    diag = np.ones(n) if include_self else (deg == 0).astype(float)
    W = (W + sp.diags(diag)).tocsr()
    W = sp.diags(1.0 / np.asarray(W.sum(axis=1)).ravel()) @ W
    return sp.csr_matrix(W)


class _Operator:
    """Row/column sums of a square linear operator from its ``@`` and ``.T`` (as a sparse matrix gives them)."""

    def sum(self, axis=None):
        n = self.shape[0]
        if axis == 1:
            return (self @ np.ones(n)).reshape(-1, 1)
        if axis == 0:
            return (self.T @ np.ones(n)).reshape(1, -1)
        return float((self @ np.ones(n)).sum())


class GridSmoother(_Operator):
    """``W = D^-1 K`` as a linear operator, ``K = S^T C S`` minus (or keeping) the spot itself.

    ``S`` puts each spot into its grid cell (a sparse ``(cells, n)`` indicator), ``C``
    convolves the cell grid (FFT, zero outside) with the sparse kernel's weights at
    the cells' distances (cut at ``truncate`` standard deviations), ``D`` the row sums. Memory and time
    grow with the number of spots and grid cells times the columns of ``X``, never
    with the number of neighbours. ``K`` is symmetric, so ``W.T @ X = K @ (D^-1 X)``.
    """

    def __init__(self, xy_um: np.ndarray, sigma_um: float, *, truncate: float = 2.5, include_self: bool = True,
                 cell_um: float, _transposed: bool = False, _state=None):
        if _state is not None:
            self.__dict__.update(_state)
            self._transposed = _transposed
            return
        xy = np.asarray(xy_um, dtype=np.float64)
        n = xy.shape[0]
        idx = np.floor((xy - xy.min(axis=0)) / cell_um + 0.5).astype(np.int64)
        self.grid = (int(idx[:, 1].max()) + 1, int(idx[:, 0].max()) + 1)  # (rows = y, cols = x)
        cells = idx[:, 1] * self.grid[1] + idx[:, 0]
        self.S = sp.csr_matrix((np.ones(n), (cells, np.arange(n))), shape=(self.grid[0] * self.grid[1], n))
        self.include_self = bool(include_self)
        # the sparse kernel's weights on the cell grid: exp(-d^2 / 2 sigma^2) within truncate * sigma (a disc)
        reach = float(truncate) * float(sigma_um)
        r = int(np.floor(reach / cell_um))
        d2 = ((np.arange(-r, r + 1)[:, None] ** 2 + np.arange(-r, r + 1)[None, :] ** 2) * float(cell_um) ** 2)
        self.kernel = np.where(d2 <= reach**2, np.exp(-d2 / (2.0 * float(sigma_um) ** 2)), 0.0)
        self.shape = (n, n)
        self._transposed = False
        deg = np.maximum(self._k(np.ones((n, 1)))[:, 0], 0.0)  # FFT rounding
        if not self.include_self:
            lonely = deg <= 1e-9  # no neighbour: keeps itself, as the sparse kernel does
            self._lonely = lonely
            deg = np.where(lonely, 1.0, deg)
        else:
            self._lonely = np.zeros(n, dtype=bool)
        self.deg = deg

    def _k(self, B: np.ndarray) -> np.ndarray:
        """``K @ B`` (the unnormalised kernel, self excluded or kept), a few columns at a time."""
        from scipy.signal import fftconvolve

        B = np.asarray(B, dtype=np.float64)
        q = B.shape[1]
        out = np.empty_like(B)
        kern = self.kernel[:, :, None]
        for lo in range(0, q, 8):  # bounds the FFT buffers to 8 channels of the grid
            part = B[:, lo:lo + 8]
            G = np.asarray(self.S @ part).reshape(self.grid[0], self.grid[1], part.shape[1])
            G = fftconvolve(G, kern, mode="same", axes=(0, 1))
            out[:, lo:lo + 8] = np.asarray(self.S.T @ G.reshape(-1, part.shape[1]))
        if not self.include_self:
            out -= B  # the kernel's own cell has weight exp(0) = 1
        return out

    def _apply(self, B: np.ndarray) -> np.ndarray:
        one_d = np.ndim(B) == 1
        B = np.asarray(B, dtype=np.float64).reshape(B.shape[0], -1)
        if not self._transposed:
            out = self._k(B) / self.deg[:, None]
            out[self._lonely] = B[self._lonely]
        else:
            Bd = B / self.deg[:, None]
            Bd[self._lonely] = 0.0
            out = self._k(Bd)
            out[self._lonely] += B[self._lonely]
        return out[:, 0] if one_d else out

    def __matmul__(self, B):
        if sp.issparse(B):
            B = B.toarray()
        return self._apply(B)

    @property
    def T(self) -> GridSmoother:
        return GridSmoother(None, 0.0, cell_um=1.0, _transposed=not self._transposed,
                            _state={k: v for k, v in self.__dict__.items() if k != "_transposed"})


class _BlockSmoother(_Operator):
    """Block-diagonal stack of smoothers (sparse matrices or :class:`GridSmoother`)."""

    def __init__(self, blocks, _transposed: bool = False):
        self.blocks = list(blocks)
        self._transposed = _transposed
        self.bounds = np.cumsum([0] + [b.shape[0] for b in self.blocks])
        self.shape = (int(self.bounds[-1]), int(self.bounds[-1]))

    def __matmul__(self, B):
        B = B.toarray() if sp.issparse(B) else np.asarray(B)
        parts = [np.asarray((b.T if self._transposed else b) @ B[lo:hi])
                 for b, lo, hi in zip(self.blocks, self.bounds[:-1], self.bounds[1:])]
        return np.concatenate(parts, axis=0)

    @property
    def T(self) -> _BlockSmoother:
        return _BlockSmoother(self.blocks, not self._transposed)


def block_diag(smoothers):
    """Smoothers of several sections as one block-diagonal smoother (sparse when every block is)."""
    if all(sp.issparse(b) for b in smoothers):
        return sp.block_diag(smoothers, format="csr")
    return _BlockSmoother(smoothers)


#: The default refinement never reaches farther than this (micrometres): 1.5 Visium pitches.
REFINE_MAX_UM = 150.0


def refine_radius(spacing_um: float) -> float:
    """Default radius of the majority refinement for spots ``spacing_um`` apart (:func:`spot_spacing`): the first
    ring of neighbours (1.5 spot spacings), at most :data:`REFINE_MAX_UM`.

    The refinement removes spot-level noise where the spots sample the tissue densely (Visium at 100 um pitch,
    Visium HD bins): the ring is 150 um or less there. On legacy ST (200 um pitch, spots 100 um across) one spot
    already stands for a 200 um piece of tissue and its first ring spans 600 um, so a majority over it erases
    structures one or two spots wide (ducts, infiltrates) that pathologists annotate; with the cap no spot has a
    neighbour within the radius there and the labels stay as the clustering put them. NaN for a NaN spacing
    (fewer than two spots).
    """
    return float("nan") if np.isnan(spacing_um) else min(1.5 * float(spacing_um), REFINE_MAX_UM)


def refine_labels(labels: np.ndarray, xy_um: np.ndarray, radius_um: float) -> tuple[np.ndarray, int]:
    """Majority vote over spatial neighbours. Returns ``(refined, n_changed)``.

    A spot takes the most frequent label among the spots within ``radius_um``
    (itself excluded) when its own label holds less than half of them, as
    SpaGCN's and GraphST's refinement do; spots without neighbours keep their
    label. One pass, so the result does not depend on the spot order.
    """
    labels = np.asarray(labels)
    n = labels.shape[0]
    cats, codes = np.unique(labels, return_inverse=True)
    G = radius_graph(xy_um, radius_um)
    G.data[:] = 1.0
    onehot = sp.csr_matrix((np.ones(n), (np.arange(n), codes)), shape=(n, cats.size))
    counts = np.asarray((G @ onehot).todense())
    total = counts.sum(axis=1)
    own = counts[np.arange(n), codes]
    switch = (total > 0) & (own < total / 2.0)
    new = codes.copy()
    new[switch] = counts[switch].argmax(axis=1)
    changed = int((new != codes).sum())
    return cats[new], changed
