"""Graph-based clustering of a representation: kNN graph, then Louvain or Leiden.

stMIC clustered in Orange Data Mining: a k-nearest-neighbour graph (k = 39,
Euclidean) whose edges are weighted by the Jaccard index of the two spots'
neighbour sets, then Louvain modularity optimisation at resolution 1.5-1.9.
:func:`cluster` reproduces that graph (``weights="jaccard"``) and runs igraph's
multilevel Louvain or leidenalg's Leiden on it. With ``n_clusters`` it searches
the resolution by bisection until the number of clusters matches.
"""

from __future__ import annotations

import random
import warnings
from contextlib import contextmanager

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import InputError

_METHODS = ("louvain", "leiden")
_WEIGHTS = ("jaccard", "binary", "gaussian")


#: Above this many spots the kNN search is approximate (pynndescent), below it exact.
EXACT_KNN_MAX = 50_000


def knn_indices(X: np.ndarray, n_neighbors: int, *, exact: bool | None = None, random_state: int = 0) -> np.ndarray:
    """Indices ``(n, n_neighbors)`` of each row's nearest neighbours (Euclidean), itself first.

    Exact (scikit-learn trees) up to :data:`EXACT_KNN_MAX` rows; above that,
    nearest-neighbour descent (pynndescent, as scanpy/UMAP use), which is
    approximate but scales to hundreds of thousands of spots. ``exact``
    forces one or the other.
    """
    n = X.shape[0]
    k = min(int(n_neighbors), n)
    if exact is None:
        exact = n <= EXACT_KNN_MAX
    if exact:
        from sklearn.neighbors import NearestNeighbors

        algo = "kd_tree" if X.shape[1] <= 32 else "auto"
        idx = NearestNeighbors(n_neighbors=k, algorithm=algo, n_jobs=-1).fit(X).kneighbors(X, return_distance=False)
    else:
        from pynndescent import NNDescent

        index = NNDescent(X.astype(np.float32), n_neighbors=k, random_state=random_state, low_memory=True)
        idx = index.neighbor_graph[0].astype(np.int64)
    # make sure the spot itself comes first even with duplicated coordinates
    missing_self = ~(idx == np.arange(n)[:, None]).any(axis=1)
    idx[missing_self, -1] = np.flatnonzero(missing_self)
    order = np.argsort(~(idx == np.arange(n)[:, None]), axis=1, kind="stable")
    return np.take_along_axis(idx, order, axis=1)


def knn_graph(X: np.ndarray, n_neighbors: int = 39, *, weights: str = "jaccard", random_state: int = 0) -> sp.csr_matrix:
    """Symmetric weighted kNN graph (no self-loops) as a CSR adjacency matrix.

    ``weights="jaccard"`` weights the edge i-j by |N(i) & N(j)| / |N(i) | N(j)|,
    where N includes the spot itself (Orange's Louvain, used by stMIC);
    ``"binary"`` gives every edge weight 1; ``"gaussian"`` uses
    ``exp(-d^2 / sigma_i sigma_j)`` with sigma the distance to the k-th neighbour.
    """
    if weights not in _WEIGHTS:
        msg = f"weights={weights!r} is not one of {_WEIGHTS}."
        raise InputError(msg)
    n = X.shape[0]
    idx = knn_indices(X, n_neighbors, random_state=random_state)
    k = idx.shape[1]
    srt = np.sort(idx, axis=1).astype(np.int64)  # each spot's neighbour set, itself included
    rows = np.repeat(np.arange(n), k - 1)
    cols = srt[srt != np.arange(n)[:, None]]  # row-major: the same order as the kernel's edges
    if weights == "binary":
        w = np.ones(rows.size)
    elif weights == "gaussian":
        d = np.linalg.norm(X[rows] - X[cols], axis=1)
        sig = np.linalg.norm(X - X[idx[:, -1]], axis=1) + 1e-12
        w = np.exp(-(d**2) / (sig[rows] * sig[cols]))
    else:
        inter = _intersections(srt)
        w = inter.ravel() / (2.0 * k - inter.ravel())
    A = sp.csr_matrix((w, (rows, cols)), shape=(n, n))
    # symmetrise: an edge present in either direction; Jaccard is symmetric already
    A = A.maximum(A.T).tocsr()
    A.eliminate_zeros()
    return A


def _intersections(srt: np.ndarray) -> np.ndarray:
    """``|N(i) & N(j)|`` for every kNN edge i -> j (j = row i's neighbours but itself).

    ``srt`` holds each spot's neighbour set (itself included) sorted; the
    count is a merge of two sorted lists, compiled with numba.
    """
    return _intersections_kernel()(srt)


_KERNEL = None


def _intersections_kernel():
    global _KERNEL
    if _KERNEL is None:
        import numba

        @numba.njit(parallel=True, cache=True)
        def kernel(srt):  # pragma: no cover - compiled
            n, k = srt.shape
            out = np.zeros((n, k - 1), dtype=np.int32)
            for i in numba.prange(n):
                e = 0
                for t in range(k):
                    j = srt[i, t]
                    if j == i:
                        continue
                    a = 0
                    b = 0
                    c = 0
                    while a < k and b < k:
                        x = srt[i, a]
                        y = srt[j, b]
                        if x == y:
                            c += 1
                            a += 1
                            b += 1
                        elif x < y:
                            a += 1
                        else:
                            b += 1
                    out[i, e] = c
                    e += 1
            return out

        _KERNEL = kernel
    return _KERNEL


@contextmanager
def _igraph_rng(seed: int):
    import igraph

    igraph.set_random_number_generator(random.Random(seed))
    try:
        yield
    finally:
        igraph.set_random_number_generator(random)


def _partition(graph, weights, method: str, resolution: float, seed: int) -> np.ndarray:
    if method == "louvain":
        with _igraph_rng(seed):
            part = graph.community_multilevel(weights=weights, resolution=resolution)
    else:
        import leidenalg

        part = leidenalg.find_partition(
            graph, leidenalg.RBConfigurationVertexPartition, weights=weights,
            resolution_parameter=resolution, seed=seed, n_iterations=2,
        )
    return np.asarray(part.membership)


def _relabel(membership: np.ndarray) -> np.ndarray:
    """Clusters renamed 0..K-1 by decreasing size (ties by first appearance)."""
    ids, first, counts = np.unique(membership, return_index=True, return_counts=True)
    order = np.lexsort((first, -counts))
    new = np.empty(ids.size, dtype=np.int64)
    new[order] = np.arange(ids.size)
    return new[np.searchsorted(ids, membership)]


def cluster_graph(
    A: sp.csr_matrix,
    *,
    method: str = "louvain",
    resolution: float = 1.0,
    n_clusters: int | None = None,
    random_state: int = 0,
    max_iter: int = 40,
) -> tuple[np.ndarray, float, bool]:
    """Cluster a weighted graph. Returns ``(labels, resolution_used, matched)``.

    With ``n_clusters``, the resolution is searched by bisection on a log
    scale; ``matched`` tells whether the exact count was reached (otherwise the
    closest count found is returned).
    """
    import igraph

    if method not in _METHODS:
        msg = f"method={method!r} is not one of {_METHODS}."
        raise InputError(msg)
    upper = sp.triu(A, k=1).tocoo()
    g = igraph.Graph(n=A.shape[0], directed=False)
    g.add_edges(np.column_stack([upper.row, upper.col]))  # much faster than Graph(edges=...)
    w = upper.data.tolist()

    def run(res: float) -> np.ndarray:
        return _relabel(_partition(g, w, method, res, random_state))

    if n_clusters is None:
        return run(resolution), float(resolution), True
    n_clusters = int(n_clusters)
    if not 1 <= n_clusters <= A.shape[0]:
        msg = f"n_clusters={n_clusters} must be between 1 and the number of spots ({A.shape[0]})."
        raise InputError(msg)
    lo, hi = 1e-3, 1e2
    best = None  # (|diff|, res, labels)
    res = float(resolution) if resolution > 0 else 1.0
    for _ in range(max_iter):
        labels = run(res)
        k = int(labels.max()) + 1
        cand = (abs(k - n_clusters), res, labels)
        if best is None or cand[0] < best[0]:
            best = cand
        if k == n_clusters:
            return labels, res, True
        if k < n_clusters:
            lo = res
        else:
            hi = res
        res = float(np.sqrt(lo * hi))
        if hi / lo < 1 + 1e-6:
            break
    return best[2], best[1], False


def cluster(
    adata,
    use_rep: str,
    *,
    n_neighbors: int = 39,
    method: str = "louvain",
    resolution: float = 1.0,
    n_clusters: int | None = None,
    weights: str = "jaccard",
    key_added: str | None = None,
    random_state: int = 0,
    copy: bool = False,
):
    """Cluster spots on a representation: kNN graph, then Louvain or Leiden.

    Parameters
    ----------
    adata
        Holds the representation in ``obsm[use_rep]``.
    use_rep
        ``obsm`` key to cluster on (e.g. ``"X_stmic"``, ``"X_expr_pca"``).
    n_neighbors
        Neighbours per spot in the kNN graph, the spot itself included (stMIC: 39).
        The search is exact up to 50,000 spots and approximate (pynndescent) above.
    method
        ``"louvain"`` (igraph's multilevel algorithm) or ``"leiden"`` (leidenalg).
    resolution
        Modularity resolution (stMIC: 1.5-1.9). With ``n_clusters`` it is the
        starting point of the search.
    n_clusters
        Search the resolution until exactly this many clusters are found; if
        no resolution gives that count, a warning says so and the closest
        count is kept (``uns[key_added]["n_clusters_matched"]`` is False).
    weights
        Edge weights of the kNN graph: ``"jaccard"`` (Orange, as stMIC),
        ``"binary"`` or ``"gaussian"``.
    key_added
        ``obs`` key of the labels; defaults to ``use_rep`` without ``X_``.
    random_state
        Seed of the community detection.
    copy
        Return a modified copy instead of writing into ``adata``.

    Sets the following fields:

    ``adata.obs[key_added]``
        Categorical cluster labels ``"0"``, ``"1"``, ... by decreasing size.
    ``adata.uns[key_added]["params"]``
        Parameters, including the resolution finally used.
    ``adata.uns[key_added]["n_clusters_matched"]``
        Whether ``n_clusters`` was reached exactly (when given).
    """
    adata = adata.copy() if copy else adata
    if use_rep not in adata.obsm:
        msg = f"adata.obsm[{use_rep!r}] is missing (have {list(adata.obsm)})."
        raise InputError(msg)
    X = np.asarray(adata.obsm[use_rep], dtype=np.float64)
    if not np.all(np.isfinite(X)):
        msg = f"adata.obsm[{use_rep!r}] has NaN or infinite values; clustering needs finite coordinates."
        raise InputError(msg)
    if int(n_neighbors) < 2:
        msg = f"n_neighbors={n_neighbors} must be at least 2."
        raise InputError(msg)
    key_added = key_added or (use_rep[2:] if use_rep.startswith("X_") else use_rep)
    A = knn_graph(X, n_neighbors, weights=weights, random_state=random_state)
    labels, res, matched = cluster_graph(
        A, method=method, resolution=resolution, n_clusters=n_clusters, random_state=random_state
    )
    if not matched:
        k = int(labels.max()) + 1
        warnings.warn(
            f"cluster({use_rep!r}): no resolution gave exactly n_clusters={n_clusters}; "
            f"kept {k} clusters at resolution {res:.4g}. Try method='leiden' or another n_neighbors.",
            stacklevel=2,
        )
    cats = [str(i) for i in range(int(labels.max()) + 1)]
    adata.obs[key_added] = pd.Categorical([str(v) for v in labels], categories=cats)
    adata.uns[key_added] = {
        "params": {
            "use_rep": use_rep,
            "n_neighbors": int(n_neighbors),
            "method": method,
            "resolution": float(res),
            "n_clusters": None if n_clusters is None else int(n_clusters),
            "weights": weights,
            "random_state": random_state,
        },
        "n_clusters_matched": bool(matched),
    }
    return adata if copy else None
