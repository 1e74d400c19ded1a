"""Spatial neighbourhoods in micrometres: the smoothing kernel and the refinement graph.

Distances are physical (full-resolution pixels times microns per pixel), so
the same radius means the same piece of tissue on legacy ST (200 um pitch),
Visium (100 um) and Visium HD bins. Graphs are sparse and built with a k-d
tree, so cost grows linearly with the number of spots for a fixed radius.

- :func:`spot_spacing`: the median distance from a spot to its nearest other spot.
- :func:`radius_graph`: every pair of spots closer than a radius, with their distance.
- :func:`gaussian_smoother`: a row-stochastic Gaussian kernel (``W @ X`` = neighbourhood mean of ``X``).
- :func:`refine_labels`: majority vote over spatial neighbours (SpaGCN / GraphST style).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from .. import _spatial
from ..errors import InputError


def coordinates_um(adata) -> np.ndarray:
    """Spot centres in micrometres ``(n_obs, 2)``."""
    return _spatial.coordinates(adata) * _spatial.microns_per_pixel(adata)


def spot_spacing(xy: np.ndarray) -> float:
    """Median distance from a spot to its nearest other spot, in the units of ``xy``."""
    from scipy.spatial import cKDTree

    if xy.shape[0] < 2:
        return float("nan")
    d, _ = cKDTree(xy).query(xy, k=2)
    d = d[:, 1]
    d = d[d > 0]
    return float(np.median(d)) if d.size else float("nan")


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


def gaussian_smoother(xy_um: np.ndarray, sigma_um: float, *, truncate: float = 2.5,
                      include_self: bool = True) -> sp.csr_matrix:
    """Row-stochastic Gaussian kernel ``W`` (``W @ X`` is each spot's neighbourhood mean of ``X``).

    Weights ``exp(-d^2 / 2 sigma^2)`` for every spot within ``truncate * sigma_um``;
    the spot itself has weight 1 when ``include_self`` (otherwise a spot with no
    neighbour keeps only itself, so no row is empty).
    """
    if not np.isfinite(sigma_um) or sigma_um <= 0:
        msg = f"sigma_um={sigma_um} must be a positive number of micrometres."
        raise InputError(msg)
    n = xy_um.shape[0]
    W = radius_graph(xy_um, truncate * sigma_um)
    W.data = np.exp(-(W.data**2) / (2.0 * sigma_um**2))
    deg = np.asarray(W.sum(axis=1)).ravel()
    diag = np.ones(n) if include_self else (deg == 0).astype(float)
    W = (W + sp.diags(diag)).tocsr()
    W = sp.diags(1.0 / np.asarray(W.sum(axis=1)).ravel()) @ W
    return sp.csr_matrix(W)


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
