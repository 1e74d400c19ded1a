"""Property-based tests of tl.cluster: random small matrices and parameter values give a labelling or a
one-line StmorphError, never another exception."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as hs  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

from stmorph import tl  # noqa: E402
from stmorph.errors import StmorphError  # noqa: E402

numbers = hs.one_of(hs.floats(-1e3, 1e3, width=32), hs.just(0.0),
                    hs.floats(allow_nan=True, allow_infinity=True, width=32))


@hs.composite
def matrices(draw):
    n = draw(hs.integers(1, 40))
    d = draw(hs.integers(1, 5))
    kind = draw(hs.sampled_from(["random", "constant", "duplicates"]))
    if kind == "random":
        return draw(hnp.arrays(np.float32, (n, d), elements=numbers))
    if kind == "constant":
        return np.full((n, d), draw(hs.floats(-5, 5)), np.float32)
    base = draw(hnp.arrays(np.float32, (max(1, n // 4), d), elements=hs.floats(-5, 5, width=32)))
    return np.resize(base, (n, d))


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(X=matrices(),
       method=hs.sampled_from(["louvain", "leiden", "gmm", "kmeans"]),
       n_neighbors=hs.one_of(hs.integers(-2, 60), hs.just(39), hs.just(1000)),
       resolution=hs.one_of(hs.floats(-2, 5), hs.just(1.7), hs.floats(allow_nan=True, allow_infinity=True)),
       n_clusters=hs.one_of(hs.none(), hs.integers(-1, 45), hs.floats(0, 10)),
       weights=hs.sampled_from(["jaccard", "binary", "gaussian", "cosine"]),
       seed=hs.integers(0, 3))
def test_cluster_gives_labels_or_stmorph_error(X, method, n_neighbors, resolution, n_clusters, weights, seed):
    a = ad.AnnData(np.zeros((X.shape[0], 1), np.float32))
    a.obsm["X_rep"] = X
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            tl.cluster(a, "X_rep", method=method, n_neighbors=n_neighbors, resolution=resolution,
                       n_clusters=n_clusters, weights=weights, random_state=seed, k_range=(2, 4), n_init=2)
        except StmorphError as exc:
            assert "\n" not in str(exc), str(exc)
            return
    labels = a.obs["rep"]
    assert len(labels) == X.shape[0] and labels.notna().all()
    k = labels.nunique()
    assert 1 <= k < X.shape[0] or X.shape[0] <= 2  # one spot per domain is no result
    if n_clusters is not None and method != "gmm" and a.uns["rep"]["n_clusters_matched"]:
        assert k == int(n_clusters)
