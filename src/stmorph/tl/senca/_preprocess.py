"""SENCA-st pre-processing (paper section 3.1): genes -> features V_i, spots -> graph G.

Genes: drop genes with a total count below ``min_gene_counts`` (10), normalise
each spot to ``target_sum`` counts, ``log1p``, keep the ``n_top_genes`` (500)
most highly variable genes, by default ranked by the variance of the
log-normalised values (``hvg_flavor="variance"``); ``"seurat"`` ranks by
*normalised dispersion* as ConGcR does (the "literal" preset). The log-normalised values of those genes
are the node features ``V_i``.

Graph: the ``n_neighbors`` (4) nearest spots of every spot by physical
distance, found with a ball tree (scikit-learn ``algorithm="ball_tree"``).
*Choice*: the kNN relation is made symmetric, self loops are added and the
adjacency is normalised as ``D^-1/2 (A + I) D^-1/2`` (GCN normalisation) for
the message-passing product of the graph transformer; the cross-attention
neighbourhood of a spot is the spot itself followed by its ``n_neighbors``
nearest spots (a fixed ``(N, k+1)`` index, so neighbourhoods can be gathered
as one tensor).

Spot spacing is the median distance from a spot to its nearest other spot; it
sets the image patch (radius 3 spacings) and the window sizes of the
hierarchical losses.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from ... import _spatial
from ..._spatial import coordinates
from ...errors import InputError
from ._config import SencaConfig


@dataclass
class SencaInputs:
    """Everything the model and the trainer need, as numpy/scipy objects."""

    x: np.ndarray  #: (N, G) float32 log-normalised HVG expression, the node features V_i
    genes: np.ndarray  #: (G,) names of the selected genes
    xy: np.ndarray  #: (N, 2) float64 spot centres (full-resolution px)
    spacing: float  #: median nearest-neighbour distance (px)
    neighborhood: np.ndarray  #: (N, k+1) int64: the spot itself, then its k nearest spots
    adjacency: sp.csr_matrix  #: (N, N) float32 D^-1/2 (A + I) D^-1/2
    attention_neighbors: np.ndarray | None  #: (N, m) int64 for local self-attention, else None


def select_genes(adata, cfg: SencaConfig, *, layer: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Filter, normalise, log and select highly variable genes; return ``(x, genes)``."""
    import anndata as ad
    import scanpy as sc

    counts = adata.layers[layer] if layer is not None else (
        adata.layers["counts"] if "counts" in adata.layers else adata.X)
    counts = sp.csr_matrix(counts, dtype=np.float32)
    if counts.shape[0] < 2:
        msg = f"SENCA-st needs at least 2 spots; got {counts.shape[0]}."
        raise InputError(msg)
    tmp = ad.AnnData(X=counts)
    tmp.var_names = np.asarray(adata.var_names).astype(str)
    keep = np.asarray(counts.sum(axis=0)).ravel() >= cfg.min_gene_counts
    if keep.sum() < 2:
        msg = (f"only {int(keep.sum())} genes have a total count >= {cfg.min_gene_counts}; "
               "SENCA-st needs raw counts in X (or layers['counts']).")
        raise InputError(msg)
    tmp = tmp[:, keep].copy()
    sc.pp.normalize_total(tmp, target_sum=cfg.target_sum)
    sc.pp.log1p(tmp)
    n_top = min(cfg.n_top_genes, tmp.n_vars)
    if n_top < tmp.n_vars and cfg.hvg_flavor == "variance":  # variance of the log data, ties by gene order
        xl = tmp.X
        mean = np.asarray(xl.mean(axis=0)).ravel()
        var = np.asarray(xl.multiply(xl).mean(axis=0)).ravel() - mean**2 if sp.issparse(xl) else xl.var(0)
        tmp = tmp[:, np.sort(np.argsort(-var, kind="stable")[:n_top])].copy()
    elif n_top < tmp.n_vars:
        sc.pp.highly_variable_genes(tmp, n_top_genes=n_top, flavor=cfg.hvg_flavor, subset=True)
    x = tmp.X.toarray() if sp.issparse(tmp.X) else np.asarray(tmp.X)
    x = x.astype(np.float32)
    if cfg.scale:
        x = (x - x.mean(0)) / np.maximum(x.std(0), 1e-6)
    return x.astype(np.float32, copy=False), np.asarray(tmp.var_names)


def _knn(xy: np.ndarray, k: int) -> np.ndarray:
    """(N, k) indices of the k nearest *other* spots (ball tree), nearest first."""
    from sklearn.neighbors import NearestNeighbors

    n = xy.shape[0]
    k = min(k, n - 1)
    nn = NearestNeighbors(n_neighbors=k + 1, algorithm="ball_tree").fit(xy)
    _, idx = nn.kneighbors(xy)  # (N, k+1), usually self first
    own = idx == np.arange(n)[:, None]
    # rows where self was not returned (duplicate coordinates): drop the last column instead
    own[~own.any(1), -1] = True
    own[np.cumsum(own, 1) > 1] = False  # at most one dropped per row
    return idx[~own].reshape(n, k).astype(np.int64)


def spot_spacing(xy: np.ndarray) -> float:
    """Median distance from each spot to its nearest other spot (px); refuses a single shared position."""
    return _spatial.required_spot_spacing(xy, "the spatial graph")


def normalized_adjacency(knn: np.ndarray) -> sp.csr_matrix:
    """``D^-1/2 (A + I) D^-1/2`` with ``A`` the symmetrised kNN graph."""
    n, k = knn.shape
    rows = np.repeat(np.arange(n), k)
    a = sp.csr_matrix((np.ones(n * k, np.float32), (rows, knn.ravel())), shape=(n, n))
    a = a.maximum(a.T) + sp.identity(n, dtype=np.float32, format="csr")
    d = np.asarray(a.sum(1)).ravel() ** -0.5
    return sp.csr_matrix(sp.diags(d) @ a @ sp.diags(d), dtype=np.float32)


def use_global_attention(n_spots: int, cfg: SencaConfig) -> bool:
    if cfg.attention == "auto":
        return n_spots <= cfg.global_attention_max_spots
    return cfg.attention == "global"


def prepare(adata, cfg: SencaConfig, *, layer: str | None = None) -> SencaInputs:
    """Run section 3.1 on ``adata`` and return the model inputs."""
    xy = coordinates(adata)
    if not np.isfinite(xy).all():
        msg = 'obsm["spatial"] contains NaN or infinite coordinates.'
        raise InputError(msg)
    x, genes = select_genes(adata, cfg, layer=layer)
    knn = _knn(xy, cfg.n_neighbors)  # (N, k)
    neighborhood = np.concatenate([np.arange(len(xy))[:, None], knn], axis=1)  # (N, k+1)
    attn_nb = None
    if not use_global_attention(len(xy), cfg):
        m = min(cfg.local_attention_neighbors, len(xy) - 1)
        attn_nb = np.concatenate([np.arange(len(xy))[:, None], _knn(xy, m)], axis=1)  # (N, m+1)
    return SencaInputs(x=x, genes=genes, xy=xy, spacing=spot_spacing(xy), neighborhood=neighborhood,
                       adjacency=normalized_adjacency(knn), attention_neighbors=attn_nb)


def window_index(xy: np.ndarray, side: float, offset: np.ndarray) -> tuple[np.ndarray, int]:
    """Assign each spot to a square window of ``side`` px on a grid shifted by ``offset``.

    Returns ``(index (N,), n_windows)``; windows are numbered 0..n-1 in grid order
    and only non-empty windows exist. Used for the windowed (local) and pooled
    (global) scales of the hierarchical losses.
    """
    cell = np.floor((xy - xy.min(0) + offset) / side).astype(np.int64)  # (N, 2)
    key = cell[:, 0] * (cell[:, 1].max() + 1) + cell[:, 1]
    _, index = np.unique(key, return_inverse=True)
    return index.astype(np.int64).ravel(), int(index.max()) + 1
