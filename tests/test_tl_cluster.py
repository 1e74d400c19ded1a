"""kNN graph (Jaccard weights as in Orange/stMIC) and Louvain/Leiden clustering."""

import anndata as ad
import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from stmorph import tl
from stmorph.errors import InputError
from stmorph.tl._cluster import knn_graph, knn_indices


def _blobs(n_per=150, k=4, d=10, sep=8.0, seed=0):
    rng = np.random.default_rng(seed)
    X = np.concatenate([rng.normal(c * sep, 1.0, size=(n_per, d)) for c in range(k)])
    return X, np.repeat(np.arange(k), n_per)


def test_jaccard_weights_match_brute_force():
    X, _ = _blobs(n_per=40)
    A = knn_graph(X, 8)
    sets = [set(r) for r in knn_indices(X, 8)]
    i, j = A.nonzero()
    brute = np.array([len(sets[a] & sets[b]) / len(sets[a] | sets[b]) for a, b in zip(i, j)])
    np.testing.assert_allclose(np.asarray(A[i, j]).ravel(), brute)
    assert (A != A.T).nnz == 0 and A.diagonal().sum() == 0


@pytest.mark.parametrize("method", ["louvain", "leiden"])
def test_cluster_finds_blobs_and_exact_count(method):
    X, truth = _blobs()
    a = ad.AnnData(np.zeros((len(X), 1), dtype=np.float32), obsm={"X_b": X})
    tl.cluster(a, "X_b", method=method, n_clusters=4)
    assert a.obs["b"].nunique() == 4
    assert adjusted_rand_score(truth, a.obs["b"]) > 0.99
    assert a.uns["b"]["n_clusters_matched"] is True
    assert list(a.obs["b"].cat.categories) == ["0", "1", "2", "3"]
    tl.cluster(a, "X_b", method=method, n_clusters=6, key_added="six")
    assert a.obs["six"].nunique() == 6
    assert a.uns["six"]["params"]["method"] == method


def test_cluster_is_deterministic_for_a_seed():
    X, _ = _blobs(sep=1.5)  # overlapping blobs: the order of moves matters
    a = ad.AnnData(np.zeros((len(X), 1), dtype=np.float32), obsm={"X_b": X})
    tl.cluster(a, "X_b", resolution=1.7, key_added="r1", random_state=3)
    tl.cluster(a, "X_b", resolution=1.7, key_added="r2", random_state=3)
    assert (a.obs["r1"].astype(str) == a.obs["r2"].astype(str)).all()


def test_cluster_warns_when_count_cannot_be_reached():
    X, _ = _blobs(n_per=5, k=2, sep=100.0)
    a = ad.AnnData(np.zeros((len(X), 1), dtype=np.float32), obsm={"X_b": X})
    with pytest.warns(UserWarning, match="no resolution gave exactly"):
        tl.cluster(a, "X_b", n_neighbors=5, n_clusters=5)
    assert a.uns["b"]["n_clusters_matched"] is False
    # the closest count to 9 of 10 spots puts every spot in a domain of its own: refused, not returned
    with pytest.raises(InputError, match="domain of its own"):
        tl.cluster(a, "X_b", n_neighbors=5, n_clusters=9)


def test_cluster_rejects_bad_input():
    X, _ = _blobs(n_per=10)
    a = ad.AnnData(np.zeros((len(X), 1), dtype=np.float32), obsm={"X_b": X})
    with pytest.raises(InputError, match="missing"):
        tl.cluster(a, "X_nope")
    with pytest.raises(InputError, match="method"):
        tl.cluster(a, "X_b", method="kmeans")
    a.obsm["X_b"][0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        tl.cluster(a, "X_b")


def test_approximate_knn_for_large_sections_agrees_with_exact():
    # above EXACT_KNN_MAX spots the search switches to pynndescent; force it on a small set
    X, _ = _blobs(n_per=200, k=3, sep=3.0)
    exact = knn_indices(X, 15, exact=True)
    approx = knn_indices(X, 15, exact=False, random_state=0)
    assert (approx[:, 0] == np.arange(len(X))).all()  # itself first
    recall = np.mean([len(set(a) & set(b)) / 15 for a, b in zip(exact, approx)])
    assert recall > 0.95
    np.testing.assert_array_equal(approx, knn_indices(X, 15, exact=False, random_state=0))


def test_mixture_on_a_subset_for_large_sections_labels_every_spot():
    """Above fit_subset spots the restarts run on a subset and one EM on all spots finishes: every spot is
    labelled, well-separated groups are found as on all spots, and below the threshold nothing changes."""
    from stmorph.tl._cluster import choose_n_clusters, gaussian_mixture

    rng = np.random.default_rng(1)
    centres = rng.normal(scale=8.0, size=(4, 6))
    truth = rng.integers(0, 4, 3000)
    X = centres[truth] + rng.normal(size=(3000, 6))
    sub, _ = gaussian_mixture(X, 4, random_state=0, fit_subset=300)
    full, _ = gaussian_mixture(X, 4, random_state=0, fit_subset=None)
    assert sub.shape == (3000,) and adjusted_rand_score(truth, sub) > 0.99
    assert adjusted_rand_score(full, sub) > 0.99
    same, _ = gaussian_mixture(X, 4, random_state=0, fit_subset=10_000)  # threshold not reached: unchanged
    assert np.array_equal(same, full)
    k, _ = choose_n_clusters(X, (2, 8), random_state=0)
    assert k == 4


def test_resolution_search_brackets_then_interpolates():
    from stmorph.tl._cluster import search_resolution

    calls = []

    def run(res):  # a noiseless power law, as modularity counts roughly follow
        calls.append(res)
        return np.arange(max(1, round(3 * res**0.8)))

    for target in (2, 7, 25, 60):
        calls.clear()
        labels, res, matched, n_runs = search_resolution(run, target, 1.7)
        assert matched and labels.max() + 1 == target and n_runs == len(calls) <= 6
    # one run off the target: the next steps stay near it, not a tenth of the way to the far bound (1e-3)
    def steep(res):  # 22 clusters at 0.61, 19 at 0.57
        calls.append(res)
        return np.arange(max(1, round(19 * (res / 0.57) ** 2)))

    calls.clear()
    labels, res, matched, n_runs = search_resolution(steep, 19, 0.61)
    assert matched and n_runs <= 3 and all(abs(np.log(c / 0.61)) < 0.25 for c in calls), calls
    # unreachable counts end with the closest one, not an endless loop
    labels, res, matched, n_runs = search_resolution(lambda r: np.arange(3 if r < 1 else 5), 4, 1.7)
    assert not matched and labels.max() + 1 in (3, 5) and n_runs < 40


def test_large_graph_search_returns_louvain_labels(monkeypatch):
    """Above FAST_SEARCH_MIN the resolution is located with igraph's Leiden, but the labels are Louvain's."""
    import igraph
    import scipy.sparse as sp

    from stmorph.tl import _cluster

    X, _ = _blobs(n_per=60, k=6, sep=3.0)
    A = knn_graph(X, 15)
    monkeypatch.setattr(_cluster, "FAST_SEARCH_MIN", 0)
    labels, res, matched = _cluster.cluster_graph(A, n_clusters=9, random_state=2)  # blobs split
    assert matched and labels.max() + 1 == 9
    upper = sp.triu(A, k=1).tocoo()
    g = igraph.Graph(n=A.shape[0], edges=np.column_stack([upper.row, upper.col]).tolist())
    direct = _cluster._relabel(_cluster._partition(g, upper.data.tolist(), "louvain", res, 2))
    np.testing.assert_array_equal(labels, direct)


def test_resolution_search_is_recorded():
    """Every clustering run of an exact-count search is in uns, in order, and the last one is the result."""
    rng = np.random.default_rng(0)
    X = np.vstack([rng.normal(c, 0.3, size=(60, 5)) for c in range(4)])
    a = ad.AnnData(np.zeros((X.shape[0], 1), dtype=np.float32), obsm={"X_pca": X})
    tl.cluster(a, "X_pca", method="louvain", n_clusters=4, n_neighbors=10, resolution=5.0, key_added="dom")
    trace = a.uns["dom"]["resolution_search"]
    assert len(trace["resolution"]) >= 1 and set(trace["algorithm"]) == {"louvain"}
    assert trace["n_clusters"][-1] == 4 and trace["resolution"][-1] == a.uns["dom"]["params"]["resolution"]


def test_mixture_em_runs_to_convergence(monkeypatch):
    # overlapping domains, a few hundred spots in 20 dimensions (a legacy ST section's embedding): EM stopped at
    # scikit-learn's default tolerance (1e-3) leaves labels that more EM iterations still move; run to EM_TOL,
    # continuing EM much further moves far fewer
    from sklearn.mixture import GaussianMixture

    import stmorph.tl._cluster as C

    def moved():
        n = 0
        for seed in range(5):
            rng = np.random.default_rng(seed)
            truth = rng.integers(0, 5, 300)
            X = rng.normal(0, 1, (5, 20))[truth] + rng.normal(0, 2, (300, 20))
            gm = C._mixture_restarts(X, 5, "tied", 10, np.random.default_rng(seed), 0.01, 300)
            further = GaussianMixture(5, covariance_type="tied", tol=1e-9, max_iter=2000, weights_init=gm.weights_,
                                      means_init=gm.means_, precisions_init=gm.precisions_,
                                      reg_covar=gm.reg_covar).fit(X)
            n += int((further.predict(X) != gm.predict(X)).sum())
        return n

    converged = moved()
    monkeypatch.setattr(C, "EM_TOL", 1e-3)  # scikit-learn's default
    stopped_early = moved()
    assert stopped_early >= 50 and converged * 4 <= stopped_early


@pytest.mark.parametrize("method", ["louvain", "gmm"])
def test_domains_are_named_by_decreasing_size(method):
    """Domain "0" is the largest, "1" the next...: a small cluster met first is not "0"."""
    rng = np.random.default_rng(0)
    sizes = [20, 120, 60]  # the first rows belong to the smallest blob
    X = np.concatenate([rng.normal(c * 10.0, 1.0, size=(s, 4)) for c, s in enumerate(sizes)])
    a = ad.AnnData(np.zeros((X.shape[0], 1), np.float32))
    a.obsm["X_b"] = X
    tl.cluster(a, "X_b", method=method, n_clusters=3, n_neighbors=15, key_added="c")
    counts = a.obs["c"].value_counts()
    assert [counts[str(i)] for i in range(3)] == sorted(sizes, reverse=True)
    assert a.obs["c"].iloc[0] == "2"  # the first spot's blob is the smallest


def test_a_single_domain_is_warned_about():
    """A vanishing resolution puts every spot in one domain: that is said, not returned silently."""
    X = np.random.default_rng(0).normal(size=(300, 10))  # one connected cloud
    adata = ad.AnnData(np.zeros((X.shape[0], 1), dtype=np.float32))
    adata.obsm["X_e"] = X
    with pytest.warns(UserWarning, match="every spot fell in one domain"):
        tl.cluster(adata, "X_e", method="louvain", resolution=1e-300)
    assert adata.obs["e"].nunique() == 1
