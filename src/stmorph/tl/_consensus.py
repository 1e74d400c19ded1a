"""Consensus clustering: domains that are a property of the data, not of where a mixture's restarts landed.

A tied Gaussian mixture (mclust's EEE) has many local optima on a spatial-transcriptomics embedding; which one
``n_init`` restarts keep changes with the seed. :func:`consensus_clustering` instead

1. fits many mixtures (``n_runs``), each from its own k-means start on its own random subset of the spots
   (at most :data:`FIT_SPOTS`), and lets each label every spot. The number of runs shares one budget of spot
   fits (:data:`RUN_BUDGET`): a few hundred spots get :data:`MAX_RUNS` runs, a Visium section 150;
2. counts how often each pair of spots fell in the same group (the co-assignment matrix, Monti et al. 2003)
   over at most :data:`CONSENSUS_SPOTS` spots, and cuts its average-linkage tree into ``k`` domains of at least
   :func:`min_domain_size` spots (outliers join the domain they share most runs with);
3. settles that cut by majority vote (:func:`vote_labels`): every run's groups are matched to the domains and
   each spot takes the domain most runs put it in, repeated until nothing changes. The tree's cut moves with
   the runs; the vote's fixed point, a majority of all runs, much less;
4. with ``spatial_prior > 0`` (off by default), polishes the consensus with one tied mixture whose labels carry
   a spatial prior (a Potts model over the first ring of neighbours, solved by mean-field EM, the
   hidden-Markov-random-field EM of Zhang et al. 2001 and the role BayesSpace's prior plays): a spot's domain
   follows its embedding but leans towards its neighbours' by ``spatial_prior`` nats per neighbour. That EM
   has several optima and which one it reaches moves with its start, so a polished answer agrees less well
   between seeds than the vote it starts from; it is discarded if it empties a domain or shrinks one below
   the smallest kept (:func:`min_domain_size`).

Each spot's confidence is its co-assignment frequency: the fraction of runs that put it in the group that
stands for its final domain (each run's groups matched to the domains by the Hungarian algorithm).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from ..errors import InputError

#: Spot fits the runs share between them: ``RUN_BUDGET / min(n, FIT_SPOTS)`` runs, within
#: [:data:`MIN_RUNS`, :data:`MAX_RUNS`]. A small section (legacy ST, a few hundred spots) gets the most runs: its
#: co-assignments average over few spots and need more runs to settle.
RUN_BUDGET = 150_000
MIN_RUNS = 50
MAX_RUNS = 500
#: Each run's mixture is fitted on a random subset of at most this many spots (then labels every spot).
FIT_SPOTS = 1000
#: The co-assignment matrix is formed over at most this many spots (dense, ``CONSENSUS_SPOTS**2`` floats).
CONSENSUS_SPOTS = 4000
#: Weight of the spatial prior by default: nats per neighbour of the same domain; 0: no polish.
SPATIAL_PRIOR = 0.0
#: Neighbours of the spatial prior: spots closer than this many spot spacings.
PRIOR_RING = 1.5
#: EM stops when no responsibility changes by more than this.
EM_TOL = 1e-4


def _one_hot(labels: np.ndarray, k: int) -> np.ndarray:
    out = np.zeros((labels.size, k))
    out[np.arange(labels.size), labels] = 1.0
    return out


def mixture_runs(X: np.ndarray, k: int, n_runs: int, rng: np.random.Generator, *, fit_spots: int = FIT_SPOTS,
                 max_iter: int = 300) -> np.ndarray:
    """``(n_runs, n)`` labels: tied mixtures fitted from k-means starts on random subsets, labelling every spot."""
    from ._cluster import fit_mixture

    n = X.shape[0]
    reg = 1e-6 * max(float(np.mean(np.var(X, axis=0))), 1e-12)
    out = np.empty((n_runs, n), dtype=np.int32)
    for r in range(n_runs):
        sub = np.sort(rng.choice(n, fit_spots, replace=False)) if n > fit_spots else slice(None)
        gm = fit_mixture(X[sub], k, reg_covar=reg, random_state=int(rng.integers(2**31)), max_iter=max_iter)
        with threadpool_limits(1):
            out[r] = gm.predict(X)
    return out


def coassignment(runs: np.ndarray) -> np.ndarray:
    """``(n, n)`` fraction of runs (rows of ``runs``) in which two spots share a group."""
    n_runs, n = runs.shape
    k = int(runs.max()) + 1
    cols = (np.arange(n_runs)[None, :] * k + runs.T).ravel()
    H = sp.csr_matrix((np.ones(n * n_runs, dtype=np.float32), (np.repeat(np.arange(n), n_runs), cols)),
                      shape=(n, n_runs * k))
    return (H @ H.T).toarray() / n_runs


def consensus_labels(runs: np.ndarray, k: int, min_size: int = 1) -> np.ndarray:
    """``k`` domains from the average-linkage tree of ``1 - coassignment(runs)``, labelled ``0..``.

    The tree is cut into the fewest groups of which ``k`` hold at least ``min_size`` spots; the spots of the
    smaller groups (outliers the runs could not place) join the large group they are most often co-assigned with.
    """
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    co = coassignment(runs)
    D = 1.0 - co
    np.fill_diagonal(D, 0.0)
    tree = linkage(squareform(D, checks=False), method="average")
    n = co.shape[0]
    for m in range(k, n + 1):
        groups = np.unique(fcluster(tree, m, criterion="maxclust"), return_inverse=True)[1]
        sizes = np.bincount(groups)
        if (sizes >= min_size).sum() >= k:
            break
    big = np.argsort(-sizes, kind="stable")[:k]
    labels = np.full(n, -1)
    for new, g in enumerate(big):
        labels[groups == g] = new
    stray = np.flatnonzero(labels < 0)
    if stray.size:
        affinity = np.stack([co[np.ix_(stray, np.flatnonzero(labels == c))].mean(axis=1) for c in range(k)], axis=1)
        labels[stray] = affinity.argmax(axis=1)
    return labels


def min_domain_size(n_spots: int, k: int) -> int:
    """The smallest domain the consensus keeps: 5 spots or 1% of the section (as the mixture's restarts), 1 when
    ``k`` domains of that size cannot fit."""
    from ._cluster import MIN_DOMAIN_FRACTION

    floor = int(max(5, np.ceil(MIN_DOMAIN_FRACTION * n_spots)))
    return floor if k * floor <= n_spots else 1


def spatial_mixture(X: np.ndarray, labels: np.ndarray, neighbours: sp.csr_matrix | None, *,
                    beta: float = SPATIAL_PRIOR, max_iter: int = 100, sweeps: int = 3) -> np.ndarray:
    """Tied Gaussian mixture started from ``labels`` whose labels carry a Potts prior over ``neighbours``.

    Mean-field EM: each E step updates the responsibilities ``sweeps`` times as
    ``q_ik ~ pi_k N(x_i | mu_k, S) exp(beta * sum_j A_ij q_jk)``; the M step refits weights, means and the shared
    covariance from them. ``beta=0`` (or no neighbours) is the plain tied mixture. Returns ``(n, k)``
    responsibilities.
    """
    X = np.asarray(X, dtype=np.float64)
    n, d = X.shape
    k = int(labels.max()) + 1
    Q = _one_hot(labels, k)
    use_prior = beta > 0 and neighbours is not None and neighbours.nnz > 0
    ridge = 1e-6 * max(float(np.trace(np.cov(X.T)) / d), 1e-12) if n > 1 else 1e-12
    with threadpool_limits(1):
        for _ in range(max_iter):
            Nk = Q.sum(axis=0) + 1e-10
            mu = (Q.T @ X) / Nk[:, None]
            S = X.T @ X - (mu.T * Nk) @ mu
            S = S / n + ridge * np.eye(d)
            L = np.linalg.cholesky(S)
            W = np.linalg.solve(L, X.T).T
            M = np.linalg.solve(L, mu.T).T
            loglik = (W @ M.T - 0.5 * (M**2).sum(axis=1)[None, :]) + np.log(Nk / n)[None, :]
            new = Q
            for _ in range(sweeps if use_prior else 1):
                logp = loglik + beta * np.asarray(neighbours @ new) if use_prior else loglik
                logp -= logp.max(axis=1, keepdims=True)
                new = np.exp(logp)
                new /= new.sum(axis=1, keepdims=True)
            delta = float(np.abs(new - Q).max())
            Q = new
            if delta < EM_TOL:
                break
    return Q


def prior_neighbours(xy_um: np.ndarray) -> sp.csr_matrix:
    """Binary adjacency of spots closer than :data:`PRIOR_RING` spot spacings (the first ring)."""
    from ._neighbors import radius_graph, spot_spacing

    spacing = spot_spacing(xy_um)
    if not np.isfinite(spacing) or spacing <= 0:
        return sp.csr_matrix((xy_um.shape[0], xy_um.shape[0]))
    A = radius_graph(xy_um, PRIOR_RING * spacing)
    A.data[:] = 1.0
    return A


def default_runs(n_spots: int) -> int:
    """Runs of the consensus for a section of ``n_spots`` (:data:`RUN_BUDGET`)."""
    return int(np.clip(np.ceil(RUN_BUDGET / max(min(int(n_spots), FIT_SPOTS), 1)), MIN_RUNS, MAX_RUNS))


def consensus_clustering(X: np.ndarray, n_clusters: int, *, xy_um: np.ndarray | None = None,
                         spatial_prior: float = SPATIAL_PRIOR, n_runs: int | None = None,
                         random_state: int = 0) -> tuple[np.ndarray, np.ndarray, dict]:
    """Domains of ``X`` by consensus (majority vote) of many tied mixtures, optionally polished under a spatial
    prior (see the module).

    Parameters
    ----------
    X
        ``(n, d)`` representation.
    n_clusters
        Number of domains.
    xy_um
        Spot centres in micrometres, for the spatial prior (``None``: no prior).
    spatial_prior
        Nats per neighbour of the same domain of the polish; 0 (:data:`SPATIAL_PRIOR`): no polish.
    n_runs
        Mixtures in the consensus; ``None``: :func:`default_runs`.
    random_state
        Seed of the runs' subsets and starts.

    Returns
    -------
    ``(labels, runs, info)``: labels ``0..``, the runs' labels ``(n_runs, n)`` (for :func:`coassignment_confidence`)
    and what was done (runs, spots in the co-assignment matrix, the prior, whether it was polished).
    """
    X = np.asarray(X, dtype=np.float64)
    n = X.shape[0]
    k = int(n_clusters)
    if not 2 <= k < n:
        msg = f"n_clusters={n_clusters} must be between 2 and the number of spots minus one ({n - 1})."
        raise InputError(msg)
    if not np.isfinite(spatial_prior) or spatial_prior < 0:
        msg = f"spatial_prior={spatial_prior} must be a non-negative number (nats per neighbour)."
        raise InputError(msg)
    if n_runs is not None and int(n_runs) < 2:
        msg = f"n_runs={n_runs} must be at least 2 (or None: as many as the section's size calls for)."
        raise InputError(msg)
    rng = np.random.default_rng(random_state)
    subset = np.sort(rng.choice(n, CONSENSUS_SPOTS, replace=False)) if n > CONSENSUS_SPOTS else np.arange(n)
    runs = mixture_runs(X, k, int(n_runs) if n_runs is not None else default_runs(n), rng)
    labels = _vote_consensus(runs, subset, k)
    A = prior_neighbours(xy_um) if xy_um is not None and spatial_prior > 0 else None
    info = {"n_runs": int(runs.shape[0]), "consensus_spots": int(subset.size),
            "spatial_prior": float(spatial_prior) if A is not None else 0.0,
            "prior_neighbours": float(A.sum() / n) if A is not None else 0.0, "polished": False}
    if A is not None:
        polish = _polish(X, labels, A, spatial_prior, n)
        if polish is not None:  # else it emptied or shrank a domain (a prior stronger than the signal)
            labels = np.unique(polish, return_inverse=True)[1]
            info["polished"] = True
    return labels, runs, info


def _vote_consensus(runs: np.ndarray, subset: np.ndarray, k: int) -> np.ndarray:
    """The runs' consensus: the co-assignment tree's cut over ``subset`` (:func:`consensus_labels`), extended to
    every spot and settled by :func:`vote_labels`."""
    n = runs.shape[1]
    cut = consensus_labels(runs[:, subset], k, min_domain_size(subset.size, k))
    if subset.size < n:
        start = np.zeros(n, dtype=np.int64)
        start[subset] = cut
        start = vote_labels(runs, start, k, max_iter=1, fixed=subset)
    else:
        start = cut
    return vote_labels(runs, start, k)


def vote_labels(runs: np.ndarray, start: np.ndarray, k: int, *, max_iter: int = 50,
                fixed: np.ndarray | None = None) -> np.ndarray:
    """Majority vote of ``runs`` from ``start``, repeated to a fixed point (labels ``0..``).

    Each step matches every run's groups to the current domains (Hungarian, :func:`_mapping`, on the spots of
    ``fixed`` when given, else all) and gives each spot the domain most runs put it in; spots of ``fixed``
    keep their labels. At the fixed point each domain is the majority of the runs matched to it: the
    consensus no longer depends on where the co-assignment tree was cut, only on the runs.
    """
    labels = np.asarray(start).copy()
    n = labels.size
    ref = np.arange(n) if fixed is None else np.asarray(fixed)
    for _ in range(max_iter):
        votes = np.zeros((n, k))
        for r in runs:
            votes[np.arange(n), _mapping(r[ref], labels[ref], k, n_groups=int(r.max()) + 1)[r]] += 1.0
        new = votes.argmax(axis=1)
        if fixed is not None:
            new[ref] = labels[ref]
        if np.array_equal(new, labels) or np.unique(new).size < np.unique(labels).size:
            break  # settled, or a domain would lose every spot: keep the last labels that hold them all
        labels = new
    return np.unique(labels, return_inverse=True)[1]


def _polish(X: np.ndarray, labels: np.ndarray, A: sp.csr_matrix | None, beta: float, n: int) -> np.ndarray | None:
    """:func:`spatial_mixture` from ``labels``; ``None`` if it empties a domain or shrinks one below the smallest
    kept (:func:`min_domain_size`)."""
    k = int(labels.max()) + 1
    final = spatial_mixture(X, labels, A, beta=beta).argmax(axis=1)
    sizes = np.bincount(final, minlength=k)
    return final if sizes.min() >= min(min_domain_size(n, k), np.bincount(labels).min()) else None


def _mapping(run_labels: np.ndarray, reference: np.ndarray, k: int, *, unmatched: int | None = None,
             n_groups: int | None = None) -> np.ndarray:
    """For each group of a run, the ``reference`` domain (``0..k-1``) it is matched to by the Hungarian algorithm on
    their contingency table; a group left unmatched (a run with more groups than ``k``) gets ``unmatched``, or
    the domain it overlaps most when ``None``. ``n_groups``: the run's number of groups, when ``run_labels`` are
    only some of its spots (a group none of them holds is matched like the others, at no overlap)."""
    from scipy.optimize import linear_sum_assignment

    kr = int(run_labels.max()) + 1 if n_groups is None else int(n_groups)
    table = np.zeros((kr, k))
    np.add.at(table, (run_labels, reference), 1.0)
    mapping = table.argmax(axis=1) if unmatched is None else np.full(kr, unmatched)
    rows, cols = linear_sum_assignment(-table)
    mapping[rows] = cols
    return mapping


def coassignment_confidence(runs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each spot's co-assignment frequency: the fraction of ``runs`` that put it in the group matched to its
    domain in ``labels`` (Hungarian matching per run). ``(n,)`` in [0, 1]."""
    labels = np.unique(np.asarray(labels), return_inverse=True)[1]
    k = int(labels.max()) + 1
    hits = np.zeros(labels.size)
    for r in runs:
        hits += _mapping(r, labels, k, unmatched=-1)[r] == labels
    return hits / max(runs.shape[0], 1)
