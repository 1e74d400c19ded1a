"""stMIC's embedding steps: expression PCA, image PCA, integration."""

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from stmorph import tl
from stmorph.errors import InputError


def _counts(n=300, g=120, seed=0):
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(3), n // 3)
    mu = rng.gamma(2.0, 1.0, size=(3, g))
    mu[:, :10] *= np.array([[6], [1], [1]])
    X = rng.poisson(mu[groups] * rng.uniform(0.5, 2.0, size=(n, 1)))
    X[:, -1] = 0  # a gene never expressed: dropped, never a division by zero
    return ad.AnnData(sp.csr_matrix(X.astype(np.float32))), groups


def test_expression_embedding_matches_scanpy_pipeline():
    import scanpy as sc

    a, _ = _counts()
    tl.expression_embedding(a, n_comps=5)
    Z = a.obsm["X_expr_pca"]
    assert Z.shape == (300, 5) and Z.dtype == np.float32

    b = a.copy()
    b.X = b.X.toarray()
    sc.pp.filter_genes(b, min_cells=1)
    sc.pp.normalize_total(b, target_sum=1e4)
    sc.pp.log1p(b)
    sc.pp.scale(b)
    sc.pp.pca(b, n_comps=5, svd_solver="full")
    ref = b.obsm["X_pca"]
    for i in range(5):
        r = np.corrcoef(Z[:, i], ref[:, i])[0, 1]
        assert abs(r) > 0.999, (i, r)
    assert a.uns["X_expr_pca"]["params"]["n_comps"] == 5
    assert a.uns["X_expr_pca"]["params"]["n_genes_used"] == 119


def test_expression_embedding_is_deterministic_and_copy_leaves_input():
    a, _ = _counts()
    X0 = a.X.copy()
    b = tl.expression_embedding(a, copy=True)
    c = tl.expression_embedding(a, copy=True)
    assert "X_expr_pca" not in a.obsm
    assert (a.X != X0).nnz == 0
    np.testing.assert_array_equal(b.obsm["X_expr_pca"], c.obsm["X_expr_pca"])


def test_expression_embedding_top_genes_and_errors():
    a, _ = _counts()
    tl.expression_embedding(a, n_top_genes=30)
    assert a.uns["X_expr_pca"]["params"]["n_genes_used"] == 30
    with pytest.raises(InputError, match="layer"):
        tl.expression_embedding(a, layer="counts")
    empty = ad.AnnData(sp.csr_matrix((5, 0), dtype=np.float32))
    with pytest.raises(InputError, match="empty"):
        tl.expression_embedding(empty)
    X = a.X.tolil()
    X[0, :] = 0
    a.X = X.tocsr()
    with pytest.raises(InputError, match="zero total counts"):
        tl.expression_embedding(a)


def test_image_embedding_standardises_and_handles_missing_rows():
    rng = np.random.default_rng(1)
    F = rng.normal(size=(200, 64)).astype(np.float32)
    F[:, 0] *= 1000.0  # without standardisation this column would dominate PC1
    a = ad.AnnData(np.zeros((200, 1), dtype=np.float32), obsm={"X_image": F})
    tl.image_embedding(a, n_comps=4)
    Z = a.obsm["X_image_pca"]
    assert Z.shape == (200, 4)
    assert abs(np.corrcoef(Z[:, 0], F[:, 0])[0, 1]) < 0.5
    F[3] = np.nan
    with pytest.warns(UserWarning, match="no image features"):
        tl.image_embedding(a, n_comps=4)
    np.testing.assert_array_equal(a.obsm["X_image_pca"][3], 0)
    assert a.uns["X_image_pca"]["params"]["n_missing"] == 1
    with pytest.raises(InputError, match="stmorph.im.features"):
        tl.image_embedding(a, use_rep="X_nope")


def test_integrate_concatenates_with_weights():
    a = ad.AnnData(np.zeros((4, 1), dtype=np.float32))
    a.obsm["A"] = np.ones((4, 2), dtype=np.float32)
    a.obsm["B"] = np.full((4, 3), 2.0, dtype=np.float32)
    tl.integrate(a, ("A", "B"), key_added="X_ab")
    np.testing.assert_array_equal(a.obsm["X_ab"], np.array([[1, 1, 2, 2, 2]] * 4, dtype=np.float32))
    tl.integrate(a, ("A", "B"), weights=(2.0, 0.5), key_added="X_ab")
    np.testing.assert_array_equal(a.obsm["X_ab"][0], [2, 2, 1, 1, 1])
    with pytest.raises(InputError, match="lacks"):
        tl.integrate(a, ("A", "C"))
    with pytest.raises(InputError, match="weights"):
        tl.integrate(a, ("A", "B"), weights=(1.0,))


def test_fewer_spots_than_components_uses_what_the_data_allow():
    a, _ = _counts(n=6, g=40, seed=1)
    with pytest.warns(UserWarning, match="n_comps=10 is more than 6 spot"):
        tl.expression_embedding(a, n_comps=10)
    assert a.obsm["X_expr_pca"].shape == (6, 5) and a.uns["X_expr_pca"]["params"]["n_comps"] == 5
    one, _ = _counts(n=3, g=40, seed=2)
    one = one[:1].copy()
    with pytest.raises(InputError, match="too few for a PCA embedding") as err:
        tl.expression_embedding(one)
    assert "-1" not in str(err.value)
