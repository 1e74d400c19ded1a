"""The `stmorph` method, spatial neighbourhoods, Gaussian-mixture clustering, refinement and the method registry."""

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from stmorph import datasets, ev, tl
from stmorph.errors import InputError
from stmorph.tl._neighbors import gaussian_smoother, radius_graph, refine_labels, spot_spacing


def _grid(n_side=20, pitch=100.0):
    g = np.arange(n_side) * pitch
    return np.array([(x, y) for y in g for x in g], dtype=float)


def test_radius_graph_matches_brute_force():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 1000, size=(300, 2))
    xy[5] = xy[4]  # duplicated coordinates stay neighbours
    G = radius_graph(xy, 120.0)
    D = np.linalg.norm(xy[:, None] - xy[None], axis=2)
    want = (D < 120.0) & ~np.eye(len(xy), dtype=bool)
    assert (G.toarray() > 0).sum() == want.sum()
    np.testing.assert_array_equal(G.toarray() > 0, want)
    assert G[4, 5] > 0


def test_gaussian_smoother_is_row_stochastic_and_local():
    xy = _grid(10)
    W = gaussian_smoother(xy, 100.0)
    np.testing.assert_allclose(np.asarray(W.sum(axis=1)).ravel(), 1.0)
    # nothing beyond 2.5 sigma; the spot itself weighs most
    i, j = W.nonzero()
    assert np.linalg.norm(xy[i] - xy[j], axis=1).max() <= 250.0
    assert all(W[r].toarray().argmax() == r for r in range(0, 100, 17))
    with pytest.raises(InputError, match="sigma_um"):
        gaussian_smoother(xy, -1.0)


def test_refine_labels_removes_speckles_and_keeps_regions():
    xy = _grid(20)
    labels = np.where(xy[:, 0] < 1000, "a", "b").astype(object)
    noisy = labels.copy()
    flip = [45, 123, 250, 333]
    for f in flip:
        noisy[f] = "a" if noisy[f] == "b" else "b"
    out, changed = refine_labels(noisy, xy, 150.0)  # first ring incl. diagonals
    assert changed == len(flip)
    np.testing.assert_array_equal(out, labels)
    # a clean border is left alone
    same, n0 = refine_labels(labels, xy, 150.0)
    assert n0 == 0 and (same == labels).all()
    assert spot_spacing(xy) == pytest.approx(100.0)


def _blobs(n_per=80, k=4, dim=6, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=8.0, size=(k, dim))
    X = np.vstack([c + rng.normal(size=(n_per, dim)) for c in centres])
    truth = np.repeat(np.arange(k), n_per)
    return X, truth


def _adata_from(X, truth, seed=0):
    import anndata as ad

    a = ad.AnnData(sp.csr_matrix(np.ones((X.shape[0], 3), dtype=np.float32)))
    a.obsm["X_rep"] = X.astype(np.float32)
    # each cluster a band of a grid so spatial refinement has neighbours
    n_side = int(np.ceil(np.sqrt(X.shape[0])))
    order = np.argsort(truth, kind="stable")
    xy = np.zeros((X.shape[0], 2))
    xy[order] = np.array([(i % n_side, i // n_side) for i in range(X.shape[0])], dtype=float) * 100.0
    a.obsm["spatial"] = xy
    a.uns["spatial"] = {"lib": {"scalefactors": {"spot_diameter_fullres": 55.0},
                                "metadata": {"technology": "visium", "spot_diameter_um": 55.0}}}
    a.obs["annotation"] = pd.Categorical(truth.astype(str))
    return a


def test_cluster_gmm_exact_k_refine_and_params():
    X, truth = _blobs()
    a = _adata_from(X, truth)
    tl.cluster(a, "X_rep", method="gmm", n_clusters=4, key_added="g", refine=True)
    assert a.obs["g"].nunique() == 4
    assert ev.ari(a, "g") > 0.95
    p = a.uns["g"]["params"]
    assert p["method"] == "gmm" and p["covariance_type"] == "tied" and p["n_clusters"] == 4
    assert p["refine"]["method"] == "majority" and p["refine"]["radius_um"] == pytest.approx(150.0)
    assert "note" not in p["refine"]
    # legacy ST pitch (200 um): the default ring is capped at 150 um, so no spot has a neighbour and none changes
    st_grid = _adata_from(X, truth)
    st_grid.obsm["spatial"] = st_grid.obsm["spatial"] * 2.0
    rng = np.random.default_rng(1)
    st_grid.obsm["X_rep"] = st_grid.obsm["X_rep"] + rng.normal(scale=6.0, size=X.shape).astype(np.float32)
    tl.cluster(st_grid, "X_rep", method="gmm", n_clusters=4, key_added="g", refine=True)
    tl.cluster(st_grid, "X_rep", method="gmm", n_clusters=4, key_added="raw")
    r = st_grid.uns["g"]["params"]["refine"]
    assert r["radius_um"] == pytest.approx(150.0) and r["n_changed"] == 0 and "spacing" in r["note"]
    assert (st_grid.obs["g"] == st_grid.obs["raw"]).all()
    tl.cluster(st_grid, "X_rep", method="gmm", n_clusters=4, key_added="g3", refine=True, refine_radius_um=300.0)
    assert st_grid.uns["g3"]["params"]["refine"]["n_changed"] > 0  # an explicit radius still reaches the ring
    tl.cluster(a, "X_rep", method="louvain", n_clusters=4, key_added="l")
    assert a.uns["l"]["params"]["refine"] is None  # off unless asked, for every method
    b = _adata_from(X, truth)
    tl.cluster(b, "X_rep", method="gmm", n_clusters=4, key_added="g", refine=True)
    assert (a.obs["g"] == b.obs["g"]).all()  # seeded


def test_cluster_warns_when_domains_are_lost_or_single_spots():
    # a fourth expression state in 20 spots scattered over the tissue: the mixture finds it, the refinement
    # absorbs it
    X, truth = _blobs()
    keep = (truth != 3) | (np.cumsum(truth == 3) <= 20)
    X, truth = X[keep], truth[keep]
    rng = np.random.default_rng(1)
    a = _adata_from(X, np.where(truth == 3, 0, truth))
    scattered = np.flatnonzero(truth == 3)
    others = np.flatnonzero(truth != 3)
    xy = a.obsm["spatial"].copy()
    swap = rng.choice(others, scattered.size, replace=False)  # each spot of state 3 among another state's
    xy[scattered], xy[swap] = a.obsm["spatial"][swap], a.obsm["spatial"][scattered]
    a.obsm["spatial"] = xy
    with pytest.warns(UserWarning, match="asked for 4 domains, 3 remain: the majority refinement"):
        tl.cluster(a, "X_rep", method="gmm", n_clusters=4, key_added="g", refine=True)
    assert a.uns["g"]["n_clusters_matched"] is False and a.obs["g"].nunique() == 3
    # one spot far from the rest gets a domain of its own: returned, with a warning
    Y = np.vstack([np.random.default_rng(2).normal(size=(11, 2)), [[1e3, 1e3]]])
    b = _adata_from(Y, np.zeros(12, dtype=int))
    with pytest.warns(UserWarning, match=r"of 3 domains holds? a single spot \(\d"):
        tl.cluster(b, "X_rep", method="gmm", n_clusters=3, key_added="g")


def test_choose_n_clusters_finds_planted_count():
    for k in (3, 5):
        X, truth = _blobs(k=k, seed=k)
        a = _adata_from(X, truth)
        tl.cluster(a, "X_rep", method="gmm", key_added="auto")
        assert a.obs["auto"].nunique() == k
        assert a.uns["auto"]["params"]["n_clusters_chosen_by"] == "louvain"
        tl.cluster(a, "X_rep", method="gmm", key_added="bic", k_criterion="bic")
        assert a.obs["bic"].nunique() == k
        assert len(a.uns["bic"]["n_clusters_scores"]) == 11  # k = 2..12
    with pytest.raises(InputError, match="criterion"):
        tl.choose_n_clusters(X, criterion="aic")


def test_cluster_refuses_or_clamps_impossible_parameters():
    X, truth = _blobs(n_per=10, k=3)
    a = _adata_from(X, truth)
    with pytest.warns(UserWarning, match="n_neighbors=1000 is not below the number of spots"):
        tl.cluster(a, "X_rep", n_neighbors=1000, key_added="c")
    assert a.uns["c"]["params"]["n_neighbors"] < a.n_obs
    assert a.uns["c"]["params"]["n_neighbors_requested"] == 1000
    assert a.obs["c"].nunique() < a.n_obs
    for bad in (float("nan"), -1.0, 0.0):
        with pytest.raises(InputError, match="resolution"):
            tl.cluster(a, "X_rep", resolution=bad)
    for bad in (a.n_obs, a.n_obs + 5, 1, 0):
        with pytest.raises(InputError, match="n_clusters"):
            tl.cluster(a, "X_rep", method="gmm", n_clusters=bad)
    with pytest.raises(InputError, match="method"):
        tl.cluster(a, "X_rep", method="kmeans")


def test_registry_runs_a_new_method_in_one_place():
    def first_gene(adata, *, quantile: float = 0.5, random_state: int = 0):
        x = np.asarray(adata.X[:, 0].todense()).ravel()
        adata.obs["first_gene"] = pd.Categorical((x > np.quantile(x, quantile)).astype(int).astype(str))
        adata.uns["first_gene"] = {"params": {"seed": random_state, "quantile": quantile}}

    from stmorph.tl._options import between

    tl.register_method("first_gene", first_gene, options=("quantile",), summary="test method",
                       declare=(tl.Option("quantile", "where to split", between(0, 1)),))
    try:
        assert "first_gene" in tl.available_methods()
        a = datasets.synthetic(200, random_state=0, image=False)
        secs = tl.run_methods(a, ["first_gene"], random_state=3, quantile=0.25)
        assert "first_gene" in a.obs and a.uns["first_gene"]["params"] == {"seed": 3, "quantile": 0.25}
        assert set(secs) == {"first_gene"}
        assert a.uns["stmorph_run"]["primary"] == "first_gene"
        with pytest.raises(InputError, match="--quantile.*at most 1"):
            tl.run_methods(a, ["first_gene"], quantile=2)
        with pytest.raises(InputError, match="--quantile is not used by the chosen method.*expression"):
            tl.run_methods(a, ["expression"], quantile=0.3)
    finally:
        from stmorph.tl import _methods

        _methods._REGISTRY.pop("first_gene", None)
        _methods.OPTIONS.pop("quantile", None)


@pytest.fixture(scope="module")
def section():
    return datasets.synthetic(600, random_state=1)


def test_stmorph_expression_only_when_no_image(section):
    a = section.copy()
    lib = a.uns["spatial"][next(iter(a.uns["spatial"]))]
    lib["images"].pop("fullres", None)
    lib["metadata"].pop("source_image_path", None)
    k = a.obs["annotation"].nunique()
    with pytest.warns(UserWarning, match="expression alone"):
        tl.stmorph(a, n_clusters=k)
    p = a.uns["stmorph"]["params"]
    assert p["modalities"] == ["expression"] and p["refine"]["method"] == "majority"
    assert a.obs["stmorph"].nunique() == k
    assert "X_image" not in a.obsm and a.obsm["X_stmorph"].shape == (a.n_obs, 20)
    with pytest.raises(InputError, match="use_image=True"):
        tl.stmorph(a, n_clusters=k, use_image=True)


def test_stmorph_image_beats_its_expression_only_variant(section):
    """The synthetic section has a region visible only in the H&E: the image must help (3 seeds)."""
    k = section.obs["annotation"].nunique()
    with_img, expr_only = [], []
    a = section.copy()
    for seed in range(3):
        tl.stmorph(a, n_clusters=k, random_state=seed, progress=False)
        with_img.append(ev.ari(a, "stmorph"))
        tl.stmorph(a, n_clusters=k, use_image=False, random_state=seed, progress=False)
        expr_only.append(ev.ari(a, "stmorph"))
    assert {"X_image", "X_image_ring_section"} <= set(a.obsm)
    assert np.mean(with_img) > np.mean(expr_only) + 0.02, (with_img, expr_only)
    # the registered variant "stmorph_expr" is use_image=False, run beside the method in one call
    seconds = tl.run_methods(a, ["stmorph_expr", "stmorph"], n_clusters=k, random_state=2, progress=False)
    assert list(seconds) == ["stmorph", "stmorph_expr"]
    assert a.uns["stmorph_expr"]["params"]["modalities"] == ["expression"]
    assert (ev.ari(a, "stmorph"), ev.ari(a, "stmorph_expr")) == (with_img[2], expr_only[2])


def test_stmorph_chooses_k_without_n_clusters(section):
    a = section.copy()
    tl.stmorph(a, use_image=False)
    assert not {"X_image", "X_image_ring_section"} & set(a.obsm)  # the image turned off is not read at all
    k = a.obs["stmorph"].nunique()
    assert 2 <= k <= 12 and a.uns["stmorph"]["params"]["n_clusters_chosen_by"] == "louvain"


def test_grid_smoother_equals_sparse_kernel_on_square_bins():
    """Visium HD bins: the grid convolution is the sparse kernel exactly, as an operator with W, W.T and sums."""
    from stmorph.tl._neighbors import GridSmoother, block_diag

    rng = np.random.default_rng(0)
    r, c = np.meshgrid(np.arange(40), np.arange(50), indexing="ij")
    xy = np.c_[c.ravel(), r.ravel()] * 8.0 + 3.0
    xy = xy[rng.random(len(xy)) > 0.3]  # holes, as tissue has
    X = rng.standard_normal((len(xy), 11))
    for include_self in (True, False):
        Ws = gaussian_smoother(xy, 20.0, include_self=include_self, method="sparse")
        Wg = gaussian_smoother(xy, 20.0, include_self=include_self, method="grid")
        assert isinstance(Wg, GridSmoother)
        np.testing.assert_allclose(Wg @ X, Ws @ X, atol=1e-10)
        np.testing.assert_allclose(Wg.T @ X, Ws.T @ X, atol=1e-10)
        np.testing.assert_allclose(np.asarray(Wg.sum(axis=0)).ravel(), np.asarray(Ws.sum(axis=0)).ravel(), atol=1e-10)
    # auto: thousands of bins within a 100 um kernel -> grid; a few Visium spots -> sparse matrix
    assert isinstance(gaussian_smoother(xy, 100.0), GridSmoother)
    assert sp.issparse(gaussian_smoother(xy, 10.0))
    B = block_diag([gaussian_smoother(xy, 20.0, method="grid"), gaussian_smoother(xy[:30], 20.0, method="sparse")])
    Y = rng.standard_normal((B.shape[0], 2))
    top = gaussian_smoother(xy, 20.0, method="sparse") @ Y[: len(xy)]
    np.testing.assert_allclose((B @ Y)[: len(xy)], top, atol=1e-10)
    np.testing.assert_allclose((B.T @ Y)[len(xy):], gaussian_smoother(xy[:30], 20.0, method="sparse").T @ Y[len(xy):],
                               atol=1e-10)


def test_standardised_pca_in_chunks_equals_whole_matrix_pca():
    """Image features of 400k+ bins are reduced in row chunks: the same scores as standardising and
    running the PCA on the whole matrix (rows with NaN score 0)."""
    from stmorph.tl._embedding import _pca
    from stmorph.tl._embedding import standardised_pca

    rng = np.random.default_rng(0)
    F = (rng.standard_normal((3000, 40)) @ rng.standard_normal((40, 40))).astype(np.float32) + 3.0
    F[[5, 900]] = np.nan
    ok = np.isfinite(F).all(axis=1)
    mu, sd = F[ok].astype(np.float64).mean(axis=0), F[ok].astype(np.float64).std(axis=0)
    S = np.zeros(F.shape)
    S[ok] = (F[ok] - mu) / sd
    want, _ = _pca(S, 8, 0)
    got, evr, finite = standardised_pca(F, 8, "X", chunk=701)
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert np.all(got[~ok] == 0) and np.array_equal(finite, ok)
    got64, evr64, _ = standardised_pca(F, 8, "X", chunk=701, dtype=np.float64)  # stMIC's image embedding
    np.testing.assert_allclose(got64, want, atol=1e-8)
    np.testing.assert_allclose(evr64, _pca(S[ok], 8, 0)[1], rtol=1e-10)


def test_stmorph_and_senca_read_their_context_patches_in_one_pass(section, tmp_path, monkeypatch):
    """The stmorph method reads the spot and its first ring (side 3 spacings) averaged over the tissue section,
    SENCA-st its patch of radius 3 spacings averaged whole; run together, every patch goes through the encoder
    in one pass."""
    monkeypatch.setenv("STMORPH_CACHE_DIR", str(tmp_path))  # an empty feature cache: everything is computed here
    a = section.copy()
    tl.run_methods(a, ["stmorph", "senca"], n_clusters=4, senca_epochs=1, progress=False)
    ring, senca = a.uns["X_image_ring_section"]["params"], a.uns["X_image_context"]["params"]
    assert (ring["pool"], senca["pool"]) == ("section", "mean")
    from stmorph import _spatial

    spacing = _spatial.spot_spacing(_spatial.coordinates(a))
    assert ring["patch_size_px"] == round(3 * spacing) and senca["patch_size_px"] == round(6 * spacing)
    assert ring["computed_with"] == senca["computed_with"] and len(ring["computed_with"]) == 3  # one pass, 3 sizes
    assert a.uns["X_stmorph_image"]["params"]["use_reps"] == ["X_image", "X_image_ring_section"]
    assert a.uns["stmorph"]["params"]["context_patch"] == "ring"
    # SENCA-st's radius and the whole-patch average stay available to the stmorph method, as options
    tl.stmorph(a, n_clusters=4, context_pool="mean", progress=False)
    assert a.uns["X_stmorph_image"]["params"]["use_reps"] == ["X_image", "X_image_ring"]
    assert not np.allclose(a.obsm["X_image_ring"], a.obsm["X_image_ring_section"])
    assert a.uns["stmorph"]["params"]["context_pool"] == "mean"
    tl.stmorph(a, n_clusters=4, context_patch="senca", progress=False)
    assert a.uns["X_stmorph_image"]["params"]["use_reps"] == ["X_image", "X_image_context_section"]
    tl.stmorph(a, n_clusters=4, context_patch="senca", context_pool="mean", progress=False)
    assert a.uns["X_stmorph_image"]["params"]["use_reps"] == ["X_image", "X_image_context"]  # SENCA-st's own features
    with pytest.raises(InputError, match="context_pool="):
        tl.stmorph(a, n_clusters=4, context_pool="tissue", progress=False)
    with pytest.raises(InputError, match="context_patch="):
        tl.stmorph(a, n_clusters=4, context_patch="6spacing", progress=False)


def test_variable_genes_ranked_on_counts_by_seurat_v3_or_on_logs_by_seurat(section):
    import anndata as ad
    import scanpy as sc

    from stmorph.tl._stmorph import _log_hvg

    X = sp.csr_matrix(section.X)
    ranked = {}
    for flavor in ("seurat_v3", "seurat"):
        L, genes = _log_hvg(X, 200, 1e4, flavor)
        assert L.shape == (section.n_obs, 200) and genes.size == 200
        ranked[flavor] = set(genes)
    ref = ad.AnnData(X.astype(np.float32))
    sc.pp.highly_variable_genes(ref, n_top_genes=200, flavor="seurat_v3")  # on the counts, as scanpy means it
    assert ranked["seurat_v3"] == set(np.flatnonzero(ref.var["highly_variable"]))
    assert ranked["seurat_v3"] != ranked["seurat"]
    a = section.copy()
    tl.spatial_expression_embedding(a, n_top_genes=200)
    assert a.uns["X_stmorph_expression"]["params"]["hvg_flavor"] == "seurat_v3"
    tl.run_methods(a, ["stmorph_expr"], n_clusters=3, hvg_flavor="seurat", n_top_genes=200)
    assert a.uns["stmorph_expr"]["params"]["hvg_flavor"] == "seurat"
    with pytest.raises(InputError, match="hvg_flavor"):
        tl.spatial_expression_embedding(a, n_top_genes=200, hvg_flavor="cell_ranger")


def test_a_failing_seurat_v3_ranking_falls_back_with_a_warning(section, monkeypatch):
    import scanpy as sc

    from stmorph.tl._stmorph import _log_hvg

    real = sc.pp.highly_variable_genes

    def loess_fails(adata, **kw):
        if kw.get("flavor") == "seurat_v3":
            raise ValueError("span too small")
        return real(adata, **kw)

    monkeypatch.setattr(sc.pp, "highly_variable_genes", loess_fails)
    X = sp.csr_matrix(section.X)
    with pytest.warns(UserWarning, match="seurat_v3 ranking of variable genes failed.*'seurat' .log dispersion"):
        _, genes = _log_hvg(X, 200, 1e4, "seurat_v3")
    detected = np.asarray((X > 0).sum(axis=0)).ravel() >= max(3, np.ceil(0.01 * X.shape[0]))
    ref = _log_hvg(X[:, detected], 200, 1e4, "seurat")[1]
    assert set(genes) == set(np.flatnonzero(detected)[ref])


def test_a_singular_loess_is_fitted_again_without_genes_seen_in_one_spot():
    """Thousands of genes seen once share one mean and variance: scikit-misc's loess fails on them. The ranking
    is made again among the genes detected in at least 1% of the spots, still by seurat_v3."""
    from stmorph.tl._stmorph import _log_hvg

    a = datasets.synthetic(400, n_genes=300, image=False, random_state=0)
    rng = np.random.default_rng(0)
    once = sp.csr_matrix((np.ones(3000, np.float32), (rng.integers(0, a.n_obs, 3000), np.arange(3000))),
                         shape=(a.n_obs, 3000))
    X = sp.hstack([sp.csr_matrix(a.X, dtype=np.float32), once]).tocsr()
    with pytest.warns(UserWarning, match="ranked by seurat_v3 again on the genes detected in at least 1%"):
        _, genes = _log_hvg(X, 200, 1e4, "seurat_v3")
    assert len(genes) == 200 and genes.max() < 300  # none of the genes seen once
    assert set(genes) == set(_log_hvg(X[:, :300], 200, 1e4, "seurat_v3")[1])


def test_image_weight_scales_the_image_block_and_moves_graph_domains(section):
    """X_stmorph is [expression | image_weight x image], each block at unit total variance; with Louvain the
    weight moves the domains."""
    a = section.copy()
    n_expr = 20
    labels = {}
    for w in (0.3, 3.0):
        tl.stmorph(a, n_clusters=4, image_weight=w, cluster_method="louvain", progress=False, key_added=f"w{w}")
        Z = np.asarray(a.obsm[f"X_w{w}"], dtype=np.float64)
        expr, img = Z[:, :n_expr], Z[:, n_expr:]
        np.testing.assert_allclose(expr.var(axis=0).sum(), 1.0, rtol=1e-3)
        np.testing.assert_allclose(img.var(axis=0).sum(), w**2, rtol=1e-3)
        assert a.uns[f"w{w}"]["params"]["image_weight"] == w
        labels[w] = a.obs[f"w{w}"].to_numpy()
    assert ev.ari(a, "w0.3") != ev.ari(a, "w3.0") or (labels[0.3] != labels[3.0]).any()
