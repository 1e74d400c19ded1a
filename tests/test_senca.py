"""SENCA-st: shapes through every block, training, ablations, determinism, memory."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

torch = pytest.importorskip("torch")

from stmorph.errors import InputError  # noqa: E402
from stmorph.tl.senca import SencaConfig, senca  # noqa: E402

FAST = {"epochs": 3, "steps_per_epoch": 4, "steps_per_epoch_rna_only": 4}


def tissue(nx=14, ny=12, n_genes=80, n_regions=3, seed=0, image_dim=24):
    """Square ST-like grid with vertical bands of region-specific genes and image features."""
    rng = np.random.default_rng(seed)
    ii, jj = np.meshgrid(np.arange(nx), np.arange(ny), indexing="ij")
    xy = np.c_[ii.ravel(), jj.ravel()].astype(float) * 100.0
    n = len(xy)
    region = np.minimum((xy[:, 0] / xy[:, 0].max() * n_regions).astype(int), n_regions - 1)
    mu = np.tile(rng.gamma(2.0, 1.0, size=n_genes), (n_regions, 1))
    for r in range(n_regions):
        mu[r, rng.choice(n_genes, 12, replace=False)] *= 5
    counts = rng.poisson(mu[region] * rng.uniform(1.5, 4.5, n)[:, None]).astype(np.float32)
    a = ad.AnnData(X=sp.csr_matrix(counts))
    a.var_names = [f"g{i}" for i in range(n_genes)]
    a.obs_names = [f"s{i}" for i in range(n)]
    a.obsm["spatial"] = xy
    a.obs["annotation"] = pd.Categorical([f"r{r}" for r in region])
    img = rng.normal(size=(n, image_dim)).astype(np.float32)
    img[:, :n_regions] += 2.0 * np.eye(n_regions, dtype=np.float32)[region]
    a.obsm["X_image_senca"] = img
    return a


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_preprocess_graph_and_genes():
    from stmorph.tl.senca._preprocess import prepare, window_index

    a = tissue()
    x = a.X.toarray()
    x[:, 0] = 0  # a gene with total count < 10 is filtered
    x[:3, 0] = 3
    a.X = sp.csr_matrix(x)
    inp = prepare(a, SencaConfig(n_top_genes=40))
    assert inp.x.shape == (a.n_obs, 40) and inp.x.dtype == np.float32
    assert "g0" not in set(inp.genes)
    assert inp.neighborhood.shape == (a.n_obs, 5)
    assert (inp.neighborhood[:, 0] == np.arange(a.n_obs)).all()  # the spot itself first
    assert inp.spacing == pytest.approx(100.0)
    # away from the border the 4 nearest neighbours on a square grid are at one spacing
    inner = np.flatnonzero((inp.xy.min(1) > 0) & (inp.xy[:, 0] < 1300) & (inp.xy[:, 1] < 1100))
    d = np.linalg.norm(inp.xy[inp.neighborhood[inner, 1:]] - inp.xy[inner, None], axis=2)
    assert len(inner) == 12 * 10 and np.allclose(d, 100.0)
    adj = inp.adjacency
    assert abs(adj - adj.T).max() < 1e-6 and (adj.diagonal() > 0).all()
    idx, n = window_index(inp.xy, 200.0, np.zeros(2))
    assert idx.shape == (a.n_obs,) and n == 7 * 6 and np.bincount(idx).min() == 4


def test_shapes_through_every_block():
    from stmorph.tl.senca._model import SENCA
    from stmorph.tl.senca._preprocess import prepare
    from stmorph.tl.senca._train import Tensors, forward, loss_terms, nt_xent, pool

    a = tissue()
    cfg = SencaConfig(n_top_genes=50, embed_dim=32, hidden_dim=48, shared_hidden_dim=24, shared_dim=8)
    inp = prepare(a, cfg)
    t = Tensors.from_inputs(inp, a.obsm["X_image_senca"], "cpu")
    n, k = a.n_obs, cfg.n_neighbors + 1
    model = SENCA(cfg, n_genes=50, image_dim=24)
    z = model.rna.lin(t.v)
    assert z.shape == (n, 32)
    assert model.rna.block.attn(z).shape == (n, 32)
    assert model.rna.block(z).shape == (n, 32)
    r = model.rna(t.v, t.adj)
    h, f = model.image(t.image)
    assert r.shape == (n, 32) and h.shape == (n, 32) and f.shape == (n, 24)
    a1 = model.shared.attn1(q=h, k=r, v=r, neighborhood=t.neighborhood)
    assert a1.shape == (n, 32) and t.neighborhood.shape == (n, k)
    out = forward(model, t)
    assert out.s.shape == (n, 8)
    assert out.e_in.shape == (n, 64) and out.d.shape == (n, 50)  # concat of A^1_i, A^2_i; D_i ~ V_i
    terms = loss_terms(out, inp, cfg, hierarchical=True, rng=np.random.default_rng(0))
    assert set(terms) == {"mse", "ntxent_w", "ntxent_g"} and all(v.ndim == 0 for v in terms.values())
    capped = loss_terms(out, inp, cfg.replace(ntxent_max_windows=5), hierarchical=True, rng=np.random.default_rng(0))
    assert torch.isfinite(capped["ntxent_w"]) and capped["ntxent_w"] != terms["ntxent_w"]  # 5 windows contrasted
    assert pool(r, torch.zeros(n, dtype=torch.long), 1).shape == (1, 32)
    # NT-Xent is low for matched pairs and high for shuffled ones
    x = torch.randn(50, 16)
    assert nt_xent(x, x, 0.5) < nt_xent(x, torch.randn(50, 16), 0.5)
    # eq 2 variant: sum instead of concat
    m2 = SENCA(cfg.replace(combine="sum"), n_genes=50, image_dim=24)
    assert forward(m2, t).e_in.shape == (n, 32)
    # RNA branch alone: E_i = R_i, the decoder reconstructs the expression V_i
    m3 = SENCA(cfg, n_genes=50, image_dim=None)
    o3 = forward(m3, Tensors.from_inputs(inp, None, "cpu"))
    assert o3.h is None and o3.e_in.shape == (n, 32) and o3.d.shape == (n, 50) and o3.target.shape == (n, 50)
    # local (neighbourhood-restricted) self-attention equals global attention when every spot is a neighbour
    attn = model.rna.block.attn
    every = torch.arange(n).repeat(n, 1)
    assert torch.allclose(attn(z, every), attn(z), atol=1e-5)


def test_training_lowers_loss_and_clusters():
    a = tissue()
    senca(a, 3, progress=False, epochs=6, steps_per_epoch=5, n_top_genes=60)
    loss = a.uns["senca"]["loss"]
    assert loss["total"].shape == (6,)
    assert loss["total"][-1] < loss["total"][0]
    assert a.obsm["X_senca"].shape == (a.n_obs, 64) and a.obsm["X_senca"].dtype == np.float32
    assert list(a.obs["senca"].cat.categories) == ["0", "1", "2"]
    p = a.uns["senca"]["params"]
    assert p["lam"] == 40 and p["image"] == 'obsm["X_image_senca"]' and p["cross_attention"]
    from sklearn.metrics import adjusted_rand_score

    assert adjusted_rand_score(a.obs["annotation"], a.obs["senca"]) > 0.5


@pytest.mark.parametrize("kw", [{"cross_attention": False}, {"hierarchical": False},
                                {"hierarchical": False, "contrastive_without_hierarchy": True}])
def test_ablations_run(kw):
    a = tissue()
    b = senca(a, 3, progress=False, copy=True, **FAST, **kw)
    assert "senca" not in a.obs  # copy=True leaves the input alone
    assert b.obs["senca"].nunique() == 3
    assert np.isfinite(b.uns["senca"]["loss"]["total"]).all()
    if kw.get("hierarchical") is False and not kw.get("contrastive_without_hierarchy"):
        assert (b.uns["senca"]["loss"]["ntxent_g"] == 0).all()


def test_missing_image_rows_are_imputed():
    a = tissue()
    a.obsm["X_image_senca"][:5] = np.nan  # spots whose patch fell outside the image
    senca(a, 3, progress=False, **FAST)
    assert a.uns["senca"]["params"]["n_spots_without_image_features"] == 5
    assert np.isfinite(a.obsm["X_senca"]).all()


def test_rna_branch_alone_without_image():
    a = tissue()
    del a.obsm["X_image_senca"]
    senca(a, 3, progress=False, **FAST)
    assert a.uns["senca"]["params"]["image"].startswith("none")
    assert a.obs["senca"].nunique() == 3


def test_same_seed_same_labels_and_config_errors():
    a, b = tissue(), tissue()
    senca(a, 3, progress=False, random_state=3, **FAST)
    senca(b, 3, progress=False, random_state=3, **FAST)
    assert (a.obs["senca"] == b.obs["senca"]).all()
    np.testing.assert_array_equal(a.obsm["X_senca"], b.obsm["X_senca"])
    senca(b, 3, progress=False, random_state=4, key_added="other", **FAST)
    assert not np.array_equal(a.obsm["X_senca"], b.obsm["X_other"])
    with pytest.raises(TypeError, match="unknown SencaConfig"):
        senca(a, 3, progress=False, epoch=3)
    with pytest.raises(InputError, match="attention"):
        senca(a, 3, progress=False, attention="sparse")
    with pytest.raises(InputError, match="n_clusters"):
        senca(a, 0, progress=False)


_MEM_SCRIPT = textwrap.dedent("""
    import json, resource, sys, torch
    import numpy as np, scipy.sparse as sp
    from stmorph.tl.senca._config import SencaConfig
    from stmorph.tl.senca._model import GraphTransformer
    from stmorph.tl.senca._preprocess import _knn, normalized_adjacency
    torch.set_num_threads(1)
    n, mode = int(sys.argv[1]), sys.argv[2]
    rng = np.random.default_rng(0)
    xy = np.c_[np.arange(n) % 200, np.arange(n) // 200].astype(float)
    cfg = SencaConfig(embed_dim=32, hidden_dim=32, attention=mode, local_attention_neighbors=16)
    adj = normalized_adjacency(_knn(xy, 4)).tocoo()
    adj = torch.sparse_coo_tensor(np.vstack([adj.row, adj.col]).astype(np.int64), adj.data, adj.shape)
    nb = None if mode == "global" else torch.as_tensor(np.c_[np.arange(n), _knn(xy, 16)])
    g = GraphTransformer(cfg, n_genes=8)
    v = torch.as_tensor(rng.normal(size=(n, 8)).astype(np.float32))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    r = g(v, adj, nb)        # forward over all N spots
    r.square().mean().backward()  # and backward
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"delta_bytes": (after - before) * 1024, "shape": list(r.shape)}))
""")


@pytest.mark.parametrize("mode", ["global", "local"])
def test_attention_memory_is_not_quadratic(mode):
    n = 20_000  # N^2 float32 = 1.6 GB
    res = subprocess.run([sys.executable, "-c", _MEM_SCRIPT, str(n), mode], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["shape"] == [n, 32]
    assert out["delta_bytes"] < 0.3 * n * n * 4  # far below one N x N float32 matrix (1.6 GB)


def _with_image(a, seed=0):
    """Add an in-memory full-resolution image whose colour follows the regions."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 60, size=(1300, 1500, 3), dtype=np.uint8)
    for r, col in enumerate(a.obs["annotation"].cat.categories):
        xs = a.obsm["spatial"][a.obs["annotation"] == col, 0]
        img[:, int(xs.min()) + 50:int(xs.max()) + 150, r] += 150
    a.uns["spatial"] = {"lib": {"images": {"fullres": img},
                                "scalefactors": {"spot_diameter_fullres": 50.0, "tissue_hires_scalef": 1.0,
                                                 "tissue_lowres_scalef": 1.0},
                                "metadata": {"technology": "synthetic", "spot_diameter_um": 55.0}}}
    a.obsm["spatial"] = a.obsm["spatial"] + 100.0
    del a.obsm["X_image_senca"]
    return a


def _tiny_encoder():
    from stmorph.im.encoders import get_encoder

    torch.manual_seed(0)
    cnn = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten())
    return get_encoder(cnn, input_size=16, name="tiny")


def test_image_features_computed_with_three_spacing_patches():
    a = _with_image(tissue())
    senca(a, 3, progress=False, encoder=_tiny_encoder(), device="cpu", **FAST)
    p = a.uns["senca"]["params"]
    assert p["patch_size_px"] == 600  # radius 3 spacings of 100 px
    assert a.obsm["X_image_senca"].shape == (a.n_obs, 8)
    assert p["image"] == 'obsm["X_image_senca"]'


def test_finetune_image_end_to_end():
    a = _with_image(tissue(nx=8, ny=6))
    enc = _tiny_encoder()
    w0 = enc.model[0].weight.detach().clone()
    senca(a, 3, progress=False, encoder=enc, finetune_image=True, device="cpu", epochs=2, steps_per_epoch=2)
    assert "fine-tuned" in a.uns["senca"]["params"]["image"]
    assert not torch.equal(w0, enc.model[0].weight.detach())  # the CNN was trained


def test_encoder_weights_reach_the_image_features(tmp_path):
    # a ResNet-50 weights file given to run_methods must be the one SENCA-st's features load
    from stmorph import datasets, tl
    from stmorph.errors import StmorphError

    a = datasets.synthetic(60, n_genes=300, random_state=3)
    missing = tmp_path / "my-resnet50.pth"
    with pytest.raises(StmorphError, match="my-resnet50.pth"):
        tl.run_methods(a, ["senca"], n_clusters=3, encoder="resnet50", encoder_weights=str(missing), progress=False)


def test_presets_and_literal_reading():
    lit = SencaConfig.preset("literal")
    assert lit.recon_target == "encoder_input" and lit.batch_spots is None and not lit.scale
    assert lit.steps_per_epoch == 1 and lit.steps_per_epoch_rna_only == 10 and lit.lr_schedule == "constant"
    assert SencaConfig.preset("default") == SencaConfig()
    assert SencaConfig.preset("literal", epochs=3).epochs == 3
    with pytest.raises(InputError, match="preset"):
        SencaConfig.preset("paper2")
    a = tissue()
    senca(a, 3, progress=False, preset="literal", epochs=2)
    p = a.uns["senca"]["params"]
    assert p["preset"] == "literal" and p["recon_target"] == "encoder_input"
    assert a.uns["senca"]["loss"]["total"].shape == (2,)


def test_mixture_preset_clusters_s_with_the_tied_mixture(monkeypatch):
    import importlib

    import stmorph.tl._cluster as tlc

    calls = []
    real = tlc.gaussian_mixture
    monkeypatch.setattr(tlc, "gaussian_mixture", lambda *a, **k: calls.append(k) or real(*a, **k))

    def no_agglomerative(*a, **k):
        raise AssertionError("the mixture preset must not cluster agglomeratively")

    monkeypatch.setattr(importlib.import_module("stmorph.tl.senca._cluster"), "agglomerative", no_agglomerative)
    mix = SencaConfig.preset("mixture")
    assert mix.epochs == 30 and mix.clustering == "mixture" and SencaConfig().clustering == "agglomerative"
    a = tissue()
    with pytest.raises(InputError, match="clustering"):
        senca(a, 3, progress=False, clustering="kmeans")
    senca(a, 3, progress=False, preset="mixture", epochs=6, steps_per_epoch=5, n_top_genes=60)
    p = a.uns["senca"]["params"]
    assert p["preset"] == "mixture" and p["clustering"] == "mixture" and not p["cluster_knn_connectivity"]
    assert calls == [{"random_state": 0}]
    assert list(a.obs["senca"].cat.categories) == ["0", "1", "2"]
    sizes = a.obs["senca"].value_counts(sort=False).to_numpy()
    assert list(sizes) == sorted(sizes, reverse=True)  # named by decreasing size, as the agglomerative labels
    # the labels are the tied mixture's on S, with the run's seed
    from stmorph.tl._cluster import _relabel

    expected, _ = real(np.asarray(a.obsm["X_senca"], dtype=np.float64), 3, random_state=0)
    assert np.array_equal(a.obs["senca"].astype(int).to_numpy(), _relabel(expected))
    from sklearn.metrics import adjusted_rand_score

    assert adjusted_rand_score(a.obs["annotation"], a.obs["senca"]) > 0.5


def test_spatial_batches_cover_every_spot_once_and_subgraphs():
    from stmorph.tl.senca._preprocess import prepare
    from stmorph.tl.senca._train import Tensors, forward, spatial_batches

    a = tissue()  # 14 x 12 grid, 168 spots
    inp = prepare(a, SencaConfig(n_top_genes=40))
    rng = np.random.default_rng(0)
    for bs in (16, 32, 60):
        batches = spatial_batches(inp.xy, inp.spacing, bs, rng)
        allidx = np.concatenate(batches)
        assert np.array_equal(np.sort(allidx), np.arange(a.n_obs))  # a pass: every spot once
        assert min(len(b) for b in batches) >= bs // 2 and len(batches) >= a.n_obs // (2 * bs)
    assert len(spatial_batches(inp.xy, inp.spacing, None, rng)) == 1
    assert len(spatial_batches(inp.xy, inp.spacing, 200, rng)) == 1  # smaller than 1.5 batches
    t = Tensors.from_inputs(inp, a.obsm["X_image_senca"], "cpu")
    idx = spatial_batches(inp.xy, inp.spacing, 32, rng)[0]
    sub = t.subgraph(inp, idx)
    assert sub.v.shape == (len(idx), 40) and sub.image.shape == (len(idx), 24)
    nb = sub.neighborhood.numpy()
    assert nb.min() >= 0 and nb.max() < len(idx) and (nb[:, 0] == np.arange(len(idx))).all()
    # a neighbour inside the batch keeps its identity
    glob = idx[nb]
    inside = np.isin(inp.neighborhood[idx], idx)
    assert np.array_equal(glob[inside], inp.neighborhood[idx][inside])
    from stmorph.tl.senca._model import SENCA

    m = SENCA(SencaConfig(n_top_genes=40), n_genes=40, image_dim=24)
    assert forward(m, sub).s.shape == (len(idx), 64)


def test_small_sections_with_an_image_train_on_the_whole_section(monkeypatch):
    from stmorph.tl.senca import _train
    from stmorph.tl.senca._train import whole_section_steps

    cfg = SencaConfig()
    assert whole_section_steps(cfg, 346, True) and not whole_section_steps(cfg, 3600, True)
    assert not whole_section_steps(cfg, 346, False)  # RNA alone: nothing to contrast, mini-batches
    assert not whole_section_steps(cfg.replace(full_section_max_spots=None), 346, True)
    assert not whole_section_steps(SencaConfig.preset("literal"), 346, True)  # its own schedule
    with pytest.raises(InputError, match="full_section_max_spots"):
        senca(tissue(), 3, full_section_max_spots=0, progress=False)
    seen = []
    real = _train.loss_terms

    def spy(out, inp, cfg, **kw):
        seen.append((out.s.shape[0], out.h is not None))
        return real(out, inp, cfg, **kw)

    monkeypatch.setattr(_train, "loss_terms", spy)
    a = tissue()  # 168 spots: about 5-10 batches of 32 per pass
    n_batches = len(_train.spatial_batches(np.asarray(a.obsm["spatial"]), 100.0, 32, np.random.default_rng(0)))
    senca(a, 3, epochs=2, progress=False)
    assert {n for n, _ in seen} == {a.n_obs} and all(h for _, h in seen)  # every step on every spot
    assert abs(len(seen) - 2 * n_batches) <= 4  # as many steps as the mini-batches would make
    seen.clear()
    senca(a, 3, epochs=2, progress=False, full_section_max_spots=100, large_section_batch_spots=None)  # mini-batches
    assert max(n for n, _ in seen) < a.n_obs


def test_reconstruction_targets():
    from stmorph.tl.senca._model import SENCA
    from stmorph.tl.senca._preprocess import prepare
    from stmorph.tl.senca._train import Tensors, forward, loss_terms

    a = tissue()
    cfg = SencaConfig(n_top_genes=50, embed_dim=32, hidden_dim=48)
    inp = prepare(a, cfg)
    t = Tensors.from_inputs(inp, a.obsm["X_image_senca"], "cpu")
    n = a.n_obs
    expected = {"expression": 50, "features": 50 + 24, "encoder_input": 64}
    for target, width in expected.items():
        out = forward(SENCA(cfg.replace(recon_target=target), n_genes=50, image_dim=24), t)
        assert out.d.shape == (n, width) and out.target.shape == (n, width)
        assert (out.split == 50) if target == "features" else out.split is None
        terms = loss_terms(out, inp, cfg, hierarchical=True, rng=np.random.default_rng(0))
        assert torch.isfinite(terms["mse"])
    out = forward(SENCA(cfg, n_genes=50, image_dim=24), t)
    assert torch.equal(out.target, t.v)  # default: D_i reconstructs the expression V_i


def test_training_moves_the_embedding_towards_the_truth():
    """Training helps: ARI after 10 epochs beats the untrained model's on a section with clear regions."""
    from sklearn.metrics import adjusted_rand_score

    a, b = tissue(seed=1), tissue(seed=1)
    senca(a, 3, progress=False, epochs=0, n_top_genes=60)
    senca(b, 3, progress=False, n_top_genes=60)
    ari0 = adjusted_rand_score(a.obs["annotation"], a.obs["senca"])
    ari1 = adjusted_rand_score(b.obs["annotation"], b.obs["senca"])
    assert ari1 > 0.8 and ari1 >= ari0


def test_larger_sections_with_an_image_train_on_large_spatial_batches(monkeypatch):
    from stmorph.tl.senca import _train
    from stmorph.tl.senca._train import epoch_plan

    rng = np.random.default_rng(0)
    xy = np.stack(np.meshgrid(np.arange(60.0), np.arange(60.0)), axis=-1).reshape(-1, 2) * 100.0  # 3,600 spots
    cfg = SencaConfig()
    small = epoch_plan(cfg, xy, 100.0, 1, False, rng)  # RNA alone: 32-spot mini-batches
    assert max(map(len, small)) < 100 and sum(map(len, small)) == len(xy)
    big = epoch_plan(cfg, xy, 100.0, 1, True, rng)
    assert abs(len(big) - len(small)) <= 0.1 * len(small)  # as many steps as the mini-batches (offsets differ) ...
    assert min(map(len, big)) >= 250 and np.median([len(b) for b in big]) >= 400  # ... each on ~500 spots
    assert all(np.all(np.diff(b) > 0) for b in big)  # sorted, no repeats within a step
    assert len({len(b) for b in epoch_plan(cfg.replace(large_section_batch_spots=None), xy, 100.0, 1, True, rng)}
               ) > 1 and max(map(len, epoch_plan(cfg.replace(large_section_batch_spots=None), xy, 100.0, 1, True,
                                                 rng))) < 100
    assert [len(b) for b in epoch_plan(cfg, xy[:900], 100.0, 1, True, rng)] == [900] * len(
        epoch_plan(cfg, xy[:900], 100.0, 1, False, np.random.default_rng(1)))  # at most 1,000: whole section
    capped = epoch_plan(cfg.replace(large_section_max_spots=3000), xy, 100.0, 1, True, rng)  # Visium HD scale
    assert max(map(len, capped)) < 100
    with pytest.raises(InputError, match="large_section_batch_spots"):
        senca(tissue(), 3, large_section_batch_spots=2, progress=False)
    seen = []
    real = _train.loss_terms

    def spy(out, inp, cfg, **kw):
        seen.append(out.s.shape[0])
        return real(out, inp, cfg, **kw)

    monkeypatch.setattr(_train, "loss_terms", spy)
    a = tissue()  # 168 spots with image features
    senca(a, 3, epochs=1, progress=False, full_section_max_spots=100, large_section_batch_spots=64)
    assert min(seen) >= 32 and max(seen) < a.n_obs  # above the whole-section limit: large batches
    assert a.uns["senca"]["params"]["schedule_resolved"] == "large batches"
    senca(a, 3, epochs=0, progress=False)
    assert a.uns["senca"]["params"]["schedule_resolved"] == "whole section"
    del a.obsm["X_image_senca"]
    senca(a, 3, epochs=0, progress=False, compute_image_features=False)
    assert a.uns["senca"]["params"]["schedule_resolved"] == "mini-batches"


def test_rna_only_contrasts_two_dropout_views():
    a = tissue()
    del a.obsm["X_image_senca"]
    senca(a, 3, epochs=2, progress=False, compute_image_features=False)
    loss = a.uns["senca"]["loss"]
    assert min(loss["ntxent_g"]) > 0 and min(loss["ntxent_w"]) > 0  # hierarchical learning acts without an image
    assert a.uns["senca"]["params"]["rna_only_contrast"] is True
    senca(a, 3, epochs=2, progress=False, compute_image_features=False, rna_only_contrast=False)
    loss = a.uns["senca"]["loss"]
    assert max(loss["ntxent_g"]) == 0 and max(loss["ntxent_w"]) == 0  # the MSE alone
    senca(a, 3, epochs=2, progress=False, compute_image_features=False, hierarchical=False)
    assert max(a.uns["senca"]["loss"]["ntxent_g"]) == 0  # the Table 4 ablation drops the contrast here too
    assert SencaConfig.preset("literal").rna_only_contrast is False


def test_cross_attention_is_eq3_over_each_spots_neighbourhood():
    """A_i = softmax(q_i k_j / sqrt(E)) v_j over the spot's neighbourhood j (eqs 3, 4): a neighbour's value moves
    spot i's row, a spot outside the neighbourhood does not, and the row is the weighted sum eq 3 writes."""
    from stmorph.tl.senca._model import CrossAttention

    torch.manual_seed(0)
    att = CrossAttention(SencaConfig(embed_dim=8))
    n = 6
    q, k, v = (torch.randn(n, 8) for _ in range(3))
    nb = torch.tensor([[i, (i + 1) % n, (i + 2) % n] for i in range(n)])  # the spot itself first
    with torch.no_grad():
        out = att(q, k, v, nb)
        Q, K, V = att.w_q(q), att.w_k(k), att.w_v(v)
        w = torch.softmax(Q[0] @ K[nb[0]].T / np.sqrt(8), dim=0)
        torch.testing.assert_close(out[0], w @ V[nb[0]])
        assert float(w.min()) > 0.01  # every neighbour weighs: the row is not the spot's own value
        v2 = v.clone()
        v2[2] += 5.0  # spot 2 is in spot 0's neighbourhood, spot 4 is not
        assert not torch.allclose(att(q, k, v2, nb)[0], out[0])
        v4 = v.clone()
        v4[4] += 5.0
        torch.testing.assert_close(att(q, k, v4, nb)[0], out[0])
