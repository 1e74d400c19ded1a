"""Clustering a representation into domains: kNN graph + Louvain/Leiden, or a Gaussian mixture.

stMIC clustered in Orange Data Mining: a k-nearest-neighbour graph (k = 39,
Euclidean) whose edges are weighted by the Jaccard index of the two spots'
neighbour sets, then Louvain modularity optimisation at resolution 1.5-1.9.
:func:`cluster` reproduces that graph (``weights="jaccard"``) and runs igraph's
multilevel Louvain or leidenalg's Leiden on it. With ``n_clusters`` it searches
the resolution (a safeguarded secant search) until the number of clusters matches.

``method="gmm"`` fits a Gaussian mixture with one covariance shared by all
components (``covariance_type="tied"``: the role mclust's EEE model plays for
GraphST), seeded and restarted ``n_init`` times, which gives exactly
``n_clusters`` domains; without ``n_clusters`` the count is chosen by
:func:`choose_n_clusters` (modularity of the embedding's kNN graph). Any method's labels can then be refined by a
majority vote over spatial neighbours (``refine=True``, see
:func:`stmorph.tl._neighbors.refine_labels`).

``method="consensus"`` (the ``stmorph`` method's default) makes the mixture's answer independent of where its
restarts land: many tied mixtures, their co-assignment cut into domains and settled by majority vote (a polish
under a spatial prior on request), with each spot's co-assignment frequency as its confidence (:mod:`stmorph.tl._consensus`).
"""

from __future__ import annotations

import random
import time
import warnings
from contextlib import contextmanager

import numpy as np
import pandas as pd
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from ..errors import InputError

_METHODS = ("louvain", "leiden", "gmm", "consensus")
#: Methods that fit a mixture to exactly ``n_clusters`` (no graph).
MIXTURES = ("gmm", "consensus")
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

        # scikit-learn's "auto": a k-d tree up to 15 dimensions, brute force (BLAS) above, where trees lose
        # (30-d stmorph embedding, 50,000 spots: k-d tree 56 s, brute force 10 s)
        idx = NearestNeighbors(n_neighbors=k, algorithm="auto", n_jobs=-1).fit(X).kneighbors(X, return_distance=False)
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


def _partition(graph, weights, method: str, resolution: float, seed: int, *, fast: bool = False) -> np.ndarray:
    """Membership of ``graph``'s vertices at ``resolution``.

    ``fast`` uses igraph's own Leiden on the modularity objective (same resolution meaning as
    multilevel Louvain, several times faster): only to locate a resolution, never for the result.
    """
    if method == "louvain" or fast:
        with _igraph_rng(seed):
            if fast:
                part = graph.community_leiden(objective_function="modularity", weights=weights,
                                              resolution=resolution, n_iterations=2)
            else:
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


#: Modularity clusterings grow roughly as ``k ~ resolution ** 0.75`` (kNN graphs of spots: 0.73-0.81 measured
#: on Visium HD bins); the search's first step extrapolates with it before any bracket exists.
_K_EXPONENT = 0.75
#: Above this many spots, a Louvain resolution search first locates the resolution with igraph's Leiden.
FAST_SEARCH_MIN = 50_000


def search_resolution(run, n_clusters: int, resolution: float, *, max_iter: int = 40,
                      bounds: tuple[float, float] = (1e-3, 1e2)):
    """Resolution at which ``run(res)`` (labels 0..K-1) gives ``n_clusters`` clusters.

    A safeguarded secant search on log(resolution) vs log(K): extrapolate with ``K ~ res ** 0.75`` until the
    target is bracketed, then interpolate between the bracket's ends, never closer than a tenth of the
    bracket to either end, so every step shrinks it (bisect where the counts are not increasing). Steps
    before a bracket exists are not pushed a tenth of the way to the far bound: from 20 clusters towards
    19 the next resolution is 7% lower, not 47% (that cost two extra Louvain runs of about 4 minutes each
    at 463,000 bins). Returns ``(labels, resolution, matched, n_runs)``; without an exact match, the run
    whose count came closest (``matched`` False).
    """
    lo, hi = (float(bounds[0]), None), (float(bounds[1]), None)  # (res, k) with k < target / k > target
    res = min(max(float(resolution) if resolution > 0 else 1.0, lo[0]), hi[0])
    best = None  # (|diff|, res, labels)
    for n_runs in range(1, max_iter + 1):
        labels = run(res)
        k = int(labels.max()) + 1
        if best is None or abs(k - n_clusters) < best[0]:
            best = (abs(k - n_clusters), res, labels)
        if k == n_clusters:
            return labels, res, True, n_runs
        if k < n_clusters:
            lo = (res, k)
        else:
            hi = (res, k)
        a, b = np.log(lo[0]), np.log(hi[0])
        if b - a < 1e-4:
            break
        if lo[1] is not None and hi[1] is not None:
            if hi[1] > lo[1]:
                f = (np.log(n_clusters) - np.log(lo[1])) / (np.log(hi[1]) - np.log(lo[1]))
                x = a + float(np.clip(f, 0.1, 0.9)) * (b - a)
            else:  # counts not increasing across the bracket (community detection's noise): bisect
                x = 0.5 * (a + b)
        else:  # one side known (this run): extrapolate from it, at most 10x, not past the search's bounds
            step = np.clip((np.log(n_clusters) - np.log(k)) / _K_EXPONENT, -np.log(10), np.log(10))
            x = float(np.clip(np.log(res) + step, a, b))
        res = float(np.exp(x))
    return best[2], best[1], False, n_runs


def cluster_graph(
    A: sp.csr_matrix,
    *,
    method: str = "louvain",
    resolution: float = 1.0,
    n_clusters: int | None = None,
    random_state: int = 0,
    max_iter: int = 40,
    trace: list | None = None,
) -> tuple[np.ndarray, float, bool]:
    """Cluster a weighted graph. Returns ``(labels, resolution_used, matched)``.

    With ``n_clusters``, the resolution is searched (:func:`search_resolution`); ``matched`` tells
    whether the exact count was reached (otherwise the closest count found is returned). Louvain on
    more than :data:`FAST_SEARCH_MIN` spots first locates the resolution with igraph's Leiden, then
    continues the search with Louvain from there, so the labels are always Louvain's. ``trace``, a list,
    receives one ``{"algorithm", "resolution", "n_clusters", "seconds"}`` per clustering run.
    """
    import igraph

    if method not in _METHODS:
        msg = f"method={method!r} is not one of {_METHODS}."
        raise InputError(msg)
    upper = sp.triu(A, k=1).tocoo()
    g = igraph.Graph(n=A.shape[0], directed=False)
    g.add_edges(np.column_stack([upper.row, upper.col]))  # much faster than Graph(edges=...)
    w = upper.data.tolist()

    def run(res: float, fast: bool = False) -> np.ndarray:
        t0 = time.perf_counter()
        labels = _relabel(_partition(g, w, method, res, random_state, fast=fast))
        if trace is not None:
            trace.append({"algorithm": "leiden (locating)" if fast else method, "resolution": float(res),
                          "n_clusters": int(labels.max()) + 1, "seconds": round(time.perf_counter() - t0, 3)})
        return labels

    if n_clusters is None:
        return run(resolution), float(resolution), True
    n_clusters = int(n_clusters)
    if not 1 <= n_clusters <= A.shape[0]:
        msg = f"n_clusters={n_clusters} must be between 1 and the number of spots ({A.shape[0]})."
        raise InputError(msg)
    if method == "louvain" and A.shape[0] > FAST_SEARCH_MIN:
        _, resolution, _, _ = search_resolution(lambda r: run(r, fast=True), n_clusters, resolution,
                                                max_iter=max_iter)
    labels, res, matched, _ = search_resolution(run, n_clusters, resolution, max_iter=max_iter)
    return labels, res, matched


#: A mixture component smaller than this share of the spots (and 5 spots) is not taken for a domain.
MIN_DOMAIN_FRACTION = 0.01


def robust_clip(X: np.ndarray, n_mad: float = 5.0) -> np.ndarray:
    """Each column clipped to its median +- ``n_mad`` robust standard deviations (1.4826 MAD)."""
    med = np.median(X, axis=0)
    mad = 1.4826 * np.median(np.abs(X - med), axis=0)
    mad[mad <= 0] = np.abs(X - med).max(axis=0)[mad <= 0] + 1e-12
    return np.clip(X, med - n_mad * mad, med + n_mad * mad)


#: Above this many spots the mixture's restarts and the automatic domain count run on a random subset of
#: this size (as mclust initialises on a subset for large data); one EM on every spot then starts from the
#: chosen restart. Below it, every spot is used and results are as without the subset.
FIT_SUBSET = 20_000
#: The mixture's EM stops when the mean log-likelihood per spot changes by less than this between iterations
#: (scikit-learn's ``tol``). Its default, 1e-3, stopped the tied mixture well short of convergence on the
#: development sections, so the labels depended on where EM happened to stop; mclust, whose EEE model the mixture
#: stands for, iterates to a relative change of 1e-5. At 1e-5 (with at most ``max_iter`` iterations) the labels on
#: the development sections are those of EM run to 1e-7 but for a few spots (docs/design-notes.md).
EM_TOL = 1e-5


def gaussian_mixture(
    X: np.ndarray,
    n_clusters: int,
    *,
    covariance_type: str = "tied",
    n_init: int = 10,
    random_state: int = 0,
    clip: float | None = None,
    min_size: float = MIN_DOMAIN_FRACTION,
    max_iter: int = 300,
    fit_subset: int | None = FIT_SUBSET,
) -> tuple[np.ndarray, float]:
    """Seeded Gaussian mixture with ``n_init`` restarts. Returns ``(labels, bic)`` of the chosen restart.

    ``covariance_type="tied"`` (one full covariance shared by all components)
    plays the role of mclust's EEE model. Two guards keep the mixture on tissue
    regions rather than on a few odd spots, which a tied mixture otherwise
    rewards with a higher likelihood:

    - ``min_size``: of the restarts (one started from Ward's hierarchical
      clustering, as mclust starts, and ``n_init`` from k-means), the
      best-likelihood one among those with the most components holding at
      least ``max(5, min_size * n)`` spots is kept;
    - ``clip`` (off by default): each dimension clipped to its median +- ``clip``
      robust standard deviations before fitting. Measured on the development
      sections it also removed real, small, distinct regions, so it is opt-in.

    Above ``fit_subset`` spots (Visium HD) the restarts are fitted on a random
    subset of that many spots and one EM over every spot starts from the kept
    restart's weights, means and covariance (``None``: always every spot).

    Every EM runs until the mean log-likelihood per spot changes by less than
    :data:`EM_TOL` (or ``max_iter`` iterations), not scikit-learn's looser default.
    """
    X = np.asarray(X, dtype=np.float64)
    if clip is not None:
        X = robust_clip(X, clip)
    if fit_subset is not None and X.shape[0] > int(fit_subset):
        rng = np.random.default_rng(random_state)
        sub = np.sort(rng.choice(X.shape[0], int(fit_subset), replace=False))
        start = _mixture_restarts(X[sub], n_clusters, covariance_type, n_init, rng, min_size, max_iter)
        gm = fit_mixture(X, start.n_components, covariance_type=covariance_type, max_iter=max_iter,
                         reg_covar=start.reg_covar, random_state=int(rng.integers(2**31)), weights_init=start.weights_,
                         means_init=start.means_, precisions_init=start.precisions_)
        return gm.predict(X), float(gm.bic(X))
    gm = _mixture_restarts(X, n_clusters, covariance_type, n_init, np.random.default_rng(random_state), min_size,
                           max_iter)
    return gm.predict(X), float(gm.bic(X))


def fit_mixture(X: np.ndarray, k: int, *, reg_covar: float, random_state: int, max_iter: int = 300,
                covariance_type: str = "tied", **init):
    """scikit-learn's ``GaussianMixture`` with ``k`` components fitted to ``X`` by EM run to :data:`EM_TOL`, on one
    BLAS thread (``n x ~20`` matrices: more threads cost more than they give, 5x slower on a busy 2-core machine),
    its convergence warning silenced; ``init``: its ``means_init`` and the like."""
    from sklearn.mixture import GaussianMixture

    gm = GaussianMixture(n_components=k, covariance_type=covariance_type, random_state=random_state,
                         max_iter=max_iter, tol=EM_TOL, reg_covar=reg_covar, **init)
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.filterwarnings("ignore", message=".*did not converge.*")
        gm.fit(X)
    return gm


def _mixture_restarts(X, n_clusters, covariance_type, n_init, rng, min_size, max_iter):
    """The fitted restart :func:`gaussian_mixture` keeps (see there for the rule)."""
    n = X.shape[0]
    k = int(n_clusters)
    floor = max(5.0, min_size * n) if k * 5 <= n else 1.0
    scale = float(np.mean(np.var(X, axis=0))) if n > 1 else 1.0
    ward = _ward_labels(X, k, rng)
    ward_means = np.stack([X[ward == c].mean(axis=0) for c in range(k)])
    best = None
    for r in range(max(1, int(n_init)) + 1):
        # restart 0 starts from Ward's hierarchical clustering (mclust's own initialisation), the others from k-means
        gm = fit_mixture(X, k, covariance_type=covariance_type, random_state=int(rng.integers(2**31)),
                         max_iter=max_iter, reg_covar=1e-6 * max(scale, 1e-12),
                         means_init=ward_means if r == 0 else None)
        labels = gm.predict(X)
        sizes = np.bincount(labels, minlength=k)
        key = (int((sizes >= floor).sum()), float(gm.lower_bound_))
        if best is None or key > best[0]:
            best = (key, gm)
    return best[1]


def _ward_labels(X: np.ndarray, k: int, rng, max_points: int = 5000) -> np.ndarray:
    """Ward agglomerative clustering into ``k`` groups; above ``max_points`` spots it runs on a random
    sample and every spot joins the nearest group centre."""
    from sklearn.cluster import AgglomerativeClustering

    n = X.shape[0]
    idx = np.sort(rng.choice(n, max_points, replace=False)) if n > max_points else np.arange(n)
    sub = AgglomerativeClustering(n_clusters=k, linkage="ward").fit_predict(X[idx])
    if idx.size == n:
        return sub
    centres = np.stack([X[idx][sub == c].mean(axis=0) for c in range(k)])
    d = ((X[:, None, :] - centres[None]) ** 2).sum(axis=2)
    return d.argmin(axis=1)


#: Criteria :func:`choose_n_clusters` knows.
K_CRITERIA = ("louvain", "bic")


def choose_n_clusters(
    X: np.ndarray,
    k_range: tuple[int, int] = (2, 12),
    *,
    criterion: str = "louvain",
    n_neighbors: int = 15,
    resolution: float = 0.5,
    n_init: int = 3,
    random_state: int = 0,
) -> tuple[int, dict[int, float]]:
    """Choose the number of domains. Returns ``(k, scores)``.

    ``criterion="louvain"`` (default): the number of communities Louvain finds on
    the kNN graph of ``X`` (``n_neighbors`` = 15, scanpy's default; Jaccard
    weights) at ``resolution`` 0.5, clamped to ``k_range``. Modularity decides
    how many groups the embedding holds; the mixture then draws their borders.
    ``scores`` maps the count found to the modularity resolution used. Above
    :data:`FIT_SUBSET` spots the graph is built on a random subset of that size.

    ``criterion="bic"``: the elbow of the tied mixture's BIC over ``k_range``
    (the smallest k whose BIC gain over k - 1 falls below a tenth of the
    largest gain). On the development sections BIC kept falling up to the top
    of the range, so it is not the default; ``scores`` maps k to BIC.
    """
    if criterion not in K_CRITERIA:
        msg = f"criterion={criterion!r} is not one of {K_CRITERIA}."
        raise InputError(msg)
    lo, hi = int(k_range[0]), int(k_range[1])
    hi = min(hi, X.shape[0] - 1)
    if lo < 1 or hi < lo:
        msg = f"k_range={k_range} is not a valid range of cluster counts for {X.shape[0]} spots."
        raise InputError(msg)
    if criterion == "louvain":
        if X.shape[0] > FIT_SUBSET:  # the count on a random subset (exact kNN, no 50k+ graph)
            rng = np.random.default_rng(random_state)
            X = X[np.sort(rng.choice(X.shape[0], FIT_SUBSET, replace=False))]
        A = knn_graph(X, min(int(n_neighbors), X.shape[0] - 1), random_state=random_state)
        labels, _, _ = cluster_graph(A, method="louvain", resolution=resolution, random_state=random_state)
        found = int(labels.max()) + 1
        return int(min(max(found, lo), hi)), {found: float(resolution)}
    scores = {}
    for k in range(max(lo - 1, 1), hi + 1):
        _, scores[k] = gaussian_mixture(X, k, n_init=n_init, random_state=random_state)
    gains = {k: scores[k - 1] - scores[k] for k in scores if k - 1 in scores}
    top = max(gains.values()) if gains else 0.0
    chosen = hi
    for k in range(lo, hi + 1):
        nxt = gains.get(k + 1)
        if nxt is None or nxt < 0.1 * top:
            chosen = k
            break
    return int(chosen), {k: scores[k] for k in sorted(scores) if k >= lo}


def cluster(
    adata,
    use_rep: str,
    *,
    n_neighbors: int = 39,
    method: str = "louvain",
    resolution: float = 1.0,
    n_clusters: int | None = None,
    weights: str = "jaccard",
    n_init: int = 10,
    k_range: tuple[int, int] = (2, 12),
    k_criterion: str = "louvain",
    refine: bool = False,
    refine_radius_um: float | None = None,
    n_runs: int | None = None,
    spatial_prior: float | None = None,
    key_added: str | None = None,
    random_state: int = 0,
    copy: bool = False,
):
    """Cluster spots on a representation: kNN graph + Louvain/Leiden, or a Gaussian mixture.

    Parameters
    ----------
    adata
        Holds the representation in ``obsm[use_rep]``.
    use_rep
        ``obsm`` key to cluster on (e.g. ``"X_stmic"``, ``"X_expr_pca"``).
    n_neighbors
        Neighbours per spot in the kNN graph, the spot itself included (stMIC: 39).
        The search is exact up to 50,000 spots and approximate (pynndescent) above.
        Larger than the number of spots is clamped, with a warning.
    method
        ``"louvain"`` (igraph's multilevel algorithm), ``"leiden"`` (leidenalg),
        ``"gmm"`` (tied-covariance Gaussian mixture, see :func:`gaussian_mixture`) or ``"consensus"`` (the
        majority vote of many such mixtures, see :func:`stmorph.tl._consensus.consensus_clustering`;
        writes ``obs[f"{key_added}_confidence"]``, each spot's co-assignment frequency).
    resolution
        Modularity resolution (stMIC: 1.5-1.9). With ``n_clusters`` it is the
        starting point of the search. Not used by ``"gmm"``.
    n_clusters
        Louvain/Leiden: search the resolution until exactly this many clusters
        are found; if no resolution gives that count, a warning says so and the
        closest count is kept (``uns[key_added]["n_clusters_matched"]`` is False).
        ``"gmm"``/``"consensus"``: the number of components; ``None`` chooses it by
        :func:`choose_n_clusters` (``k_criterion``) within ``k_range``.
    weights
        Edge weights of the kNN graph: ``"jaccard"`` (Orange, as stMIC),
        ``"binary"`` or ``"gaussian"``.
    n_init
        Restarts of ``"gmm"`` (the best likelihood is kept).
    n_runs, spatial_prior
        ``"consensus"`` only: mixtures in the consensus (``None``: by the section's size) and the spatial prior's
        weight in nats per neighbour of the same domain of an optional polish (``None``/0: no polish, the runs'
        majority as it is; none either without ``obsm["spatial"]``).
    k_range, k_criterion
        Smallest and largest count ``"gmm"`` considers when ``n_clusters`` is None, and
        how it chooses (``"louvain"`` or ``"bic"``, see :func:`choose_n_clusters`).
    refine
        Relabel each spot by the majority of its spatial neighbours when its own
        label holds less than half of them (SpaGCN/GraphST); off by default.
    refine_radius_um
        Neighbourhood radius of the refinement in micrometres; default the first ring of
        neighbours (1.5 spot spacings) but at most 150 um, so that on legacy ST (200 um
        pitch) spots keep their labels (see :func:`stmorph.tl._neighbors.refine_radius`).
        Needs ``obsm["spatial"]`` and ``uns["spatial"]``.
    key_added
        ``obs`` key of the labels; defaults to ``use_rep`` without ``X_``.
    random_state
        Seed of the community detection or the mixture.
    copy
        Return a modified copy instead of writing into ``adata``.

    Sets the following fields:

    ``adata.obs[key_added]``
        Categorical cluster labels ``"0"``, ``"1"``, ... by decreasing size.
    ``adata.uns[key_added]["params"]``
        Parameters, including the resolution (and ``resolution_requested``, the one given), neighbour count and
        refinement finally used.
    ``adata.uns[key_added]["n_clusters_matched"]``
        Whether ``n_clusters`` was reached exactly (when given).
    ``adata.uns[key_added]["n_clusters_scores"]``
        ``"gmm"`` without ``n_clusters``: the criterion for each count tried.
    ``adata.uns[key_added]["resolution_search"]``
        Louvain/Leiden with ``n_clusters``: each clustering run of the resolution search (algorithm,
        resolution, clusters found, seconds), in order.
    """
    adata = adata.copy() if copy else adata
    if method not in _METHODS:
        msg = f"method={method!r} is not one of {_METHODS}."
        raise InputError(msg)
    if use_rep not in adata.obsm:
        msg = f"adata.obsm[{use_rep!r}] is missing (have {list(adata.obsm)})."
        raise InputError(msg)
    X = np.asarray(adata.obsm[use_rep], dtype=np.float64)
    if X.ndim != 2 or X.shape[0] == 0:
        msg = f"adata.obsm[{use_rep!r}] must be a non-empty (n_obs, n_dims) array; got shape {X.shape}."
        raise InputError(msg)
    if not np.all(np.isfinite(X)):
        msg = f"adata.obsm[{use_rep!r}] has NaN or infinite values; clustering needs finite coordinates."
        raise InputError(msg)
    n = X.shape[0]
    if n < 3:
        msg = f"{n} spot(s): at least 3 spots are needed to find domains."
        raise InputError(msg)
    if n_clusters is not None:
        try:
            whole = not isinstance(n_clusters, bool) and float(n_clusters).is_integer()
        except (TypeError, ValueError, OverflowError):
            whole = False
        if not whole or not 2 <= int(n_clusters) < n:
            msg = f"must be a whole number from 2 to {n - 1} (the number of spots minus one); got {n_clusters}."
            raise InputError(f"n_clusters {msg}", cli=f"--n-clusters {msg}")
        n_clusters = int(n_clusters)
    if method != "consensus" and (n_runs is not None or spatial_prior is not None):
        msg = f"n_runs/spatial_prior are options of method='consensus'; method={method!r} uses neither."
        raise InputError(msg)
    key_added = key_added or (use_rep[2:] if use_rep.startswith("X_") else use_rep)
    extra: dict = {}
    params: dict = {"use_rep": use_rep, "method": method, "n_clusters": n_clusters, "random_state": random_state}
    runs = None
    if method in MIXTURES:
        if n_clusters is None:
            n_clusters, scores = choose_n_clusters(X, k_range, criterion=k_criterion, random_state=random_state)
            extra["n_clusters_scores"] = {str(k): v for k, v in scores.items()}
            params.update(n_clusters_chosen_by=k_criterion, k_range=[int(k_range[0]), int(k_range[1])])
        if method == "gmm":
            labels, _ = gaussian_mixture(X, n_clusters, n_init=n_init, random_state=random_state)
            params.update(n_init=int(n_init), min_size=MIN_DOMAIN_FRACTION)
        else:
            labels, runs, info = _consensus(adata, X, n_clusters, n_runs, spatial_prior, random_state)
            params.update(consensus=info)
        labels = _relabel(labels)
        matched = True  # checked against the labels below, after any refinement
        params.update(n_clusters=int(n_clusters), covariance_type="tied")
    else:
        try:
            res_ok = bool(np.isfinite(float(resolution)) and float(resolution) > 0)
        except (TypeError, ValueError):
            res_ok = False
        if not res_ok:
            msg = f"resolution={resolution} must be a positive number (stMIC: 1.5-1.9)."
            raise InputError(msg)
        if int(n_neighbors) < 2:
            msg = f"n_neighbors={n_neighbors} must be at least 2."
            raise InputError(msg)
        k_used = int(n_neighbors)
        if k_used >= n:
            k_used = max(2, min(n - 1, int(np.ceil(np.sqrt(n)))))
            warnings.warn(
                f"cluster({use_rep!r}): n_neighbors={n_neighbors} is not below the number of spots ({n}): "
                f"a kNN graph that links every spot to every other has no communities; using {k_used}.",
                stacklevel=2,
            )
        A = knn_graph(X, k_used, weights=weights, random_state=random_state)
        trace = []
        labels, res, matched = cluster_graph(
            A, method=method, resolution=resolution, n_clusters=n_clusters, random_state=random_state, trace=trace
        )
        params.update(n_neighbors=k_used, resolution=float(res), resolution_requested=float(resolution),
                      weights=weights)
        if n_clusters is not None:
            extra["resolution_search"] = {f: [t[f] for t in trace] for f in ("algorithm", "resolution",
                                                                              "n_clusters", "seconds")}
        if k_used != int(n_neighbors):
            params["n_neighbors_requested"] = int(n_neighbors)
        if not matched:
            k = int(labels.max()) + 1
            warnings.warn(
                f"cluster({use_rep!r}): no resolution gave exactly n_clusters={n_clusters}; "
                f"kept {k} clusters at resolution {res:.4g}. Try method='leiden' or another n_neighbors.",
                stacklevel=2,
            )
    if refine:
        from ._neighbors import coordinates_um, refine_labels, refine_radius, spot_spacing

        xy = coordinates_um(adata)
        spacing = spot_spacing(xy)
        radius = float(refine_radius_um) if refine_radius_um is not None else refine_radius(spacing)
        if not np.isfinite(radius) or radius <= 0:
            msg = f"refine_radius_um={refine_radius_um} must be a positive number of micrometres."
            raise InputError(msg)
        labels, n_changed = refine_labels(labels, xy, radius)
        labels = _relabel(labels)
        params["refine"] = {"method": "majority", "radius_um": radius, "n_changed": int(n_changed)}
        if radius < spacing:  # legacy ST under the default cap: say why nothing changed
            params["refine"]["note"] = ("radius below the spot spacing: spots without a neighbour within it keep "
                                        "their label")
    else:
        params["refine"] = None
    n_found = int(labels.max()) + 1
    if n_clusters is not None:
        if matched and n_found != n_clusters:  # a count the search reached, lost afterwards: say so
            why = ("the majority refinement absorbed the others (refine=False keeps them)" if refine else
                   "the mixture left the others empty")
            warnings.warn(f"cluster({use_rep!r}): asked for {n_clusters} domains, {n_found} remain: {why}.",
                          stacklevel=2)
        matched = matched and n_found == n_clusters
    sizes = np.bincount(labels)
    if n_found >= n:
        msg = f"cluster({use_rep!r}) put every spot in a domain of its own ({n_found} domains); not a result."
        raise InputError(msg)
    if n_found == 1:  # e.g. a vanishing modularity resolution: every spot in one domain is no segmentation
        warnings.warn(f"cluster({use_rep!r}): every spot fell in one domain; "
                      + ("raise the resolution or give n_clusters." if method not in MIXTURES else "give n_clusters >= 2."),
                      stacklevel=2)
    single = np.flatnonzero(sizes == 1)
    if single.size:  # a single spot is not a tissue region
        warnings.warn(f"cluster({use_rep!r}): {single.size} of {n_found} domains "
                      f"{'holds' if single.size == 1 else 'hold'} a single spot "
                      f"({', '.join(map(str, single[:5]))}{', ...' if single.size > 5 else ''}); "
                      "try fewer clusters or a lower resolution.", stacklevel=2)
    cats = [str(i) for i in range(n_found)]
    adata.obs[key_added] = pd.Categorical([str(v) for v in labels], categories=cats)
    adata.uns[key_added] = {"params": params, "n_clusters_matched": bool(matched), **extra}
    if runs is not None:
        from ._confidence import add_confidence
        from ._consensus import coassignment_confidence

        add_confidence(adata, key_added, coassignment_confidence(runs, labels), kind="co-assignment",
                       note=f"fraction of the {runs.shape[0]} mixtures of the consensus that put the spot in the "
                            "group matched to its domain")
    return adata if copy else None


def _consensus(adata, X, n_clusters, n_runs, spatial_prior, random_state):
    """:func:`~stmorph.tl._consensus.consensus_clustering` with the spot centres of ``adata`` when it has them."""
    from ._consensus import SPATIAL_PRIOR, consensus_clustering
    from ._neighbors import coordinates_um

    try:
        xy = coordinates_um(adata)
    except (InputError, KeyError):
        xy = None
    prior = SPATIAL_PRIOR if spatial_prior is None else float(spatial_prior)
    return consensus_clustering(X, n_clusters, xy_um=xy, spatial_prior=prior, n_runs=n_runs,
                                random_state=random_state)
