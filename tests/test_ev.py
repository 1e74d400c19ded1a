"""Tests of stmorph.ev: ARI/NMI against hand-computed values, markers and GSEA on planted tissue."""

from __future__ import annotations

import math
import socket
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import sparse

import stmorph
from stmorph import ev
from stmorph.errors import InputError

REGIONS = ("tumour", "stroma", "immune")


def toy_tissue(n_side: int = 24, n_genes: int = 120, *, seed: int = 0, image: bool = True):
    """Small spatial tissue: three vertical bands, 10 planted genes per band (6x rate), a coloured image."""
    import anndata as ad

    rng = np.random.default_rng(seed)
    rows, cols = np.meshgrid(np.arange(n_side), np.arange(n_side), indexing="ij")
    rows, cols = rows.ravel(), cols.ravel()
    n = rows.size
    region = np.minimum(cols * 3 // n_side, 2)
    genes = [f"G{i:03d}" for i in range(n_genes)]
    planted = {r: genes[10 * i: 10 * i + 10] for i, r in enumerate(REGIONS)}
    rate = rng.gamma(2.0, 1.0, size=n_genes)
    lam = np.tile(rate, (n, 1))
    for i in range(3):
        lam[np.ix_(region == i, np.arange(10 * i, 10 * i + 10))] *= 6.0
    X = sparse.csr_matrix(rng.poisson(lam).astype(np.float32))
    names = [f"{r}x{c}" for r, c in zip(rows, cols, strict=True)]
    obs = pd.DataFrame(index=names)
    obs["in_tissue"] = 1
    obs["array_row"], obs["array_col"] = rows, cols
    obs["annotation"] = pd.Categorical([REGIONS[i] for i in region])
    adata = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=genes))
    spacing, diameter = 40.0, 25.0
    adata.obsm["spatial"] = np.c_[cols * spacing + 60, rows * spacing + 60].astype(np.float64)
    lib = {
        "scalefactors": {"spot_diameter_fullres": diameter, "tissue_hires_scalef": 0.5, "tissue_lowres_scalef": 0.1},
        "metadata": {"technology": "synthetic", "spot_diameter_um": 55.0},
        "images": {},
    }
    if image:
        side = int((n_side * spacing + 120) * 0.5)
        img = np.full((side, side, 3), 240, np.uint8)
        band = (np.arange(side) / 0.5 - 60) // (spacing * n_side / 3)
        palette = np.array([[200, 120, 170], [230, 170, 200], [120, 90, 160]], np.uint8)
        for i in range(3):
            img[:, band == i] = palette[i]
        lib["images"]["hires"] = img
    adata.uns["spatial"] = {"toy": lib}
    adata.uns["toy"] = {"planted": planted}
    return adata


# ---------------------------------------------------------------------------- metrics

def _labelled(truth, pred, names=None):
    import anndata as ad

    names = names or [f"s{i}" for i in range(len(truth))]
    obs = pd.DataFrame({"annotation": truth, "pred": pred}, index=names)
    return ad.AnnData(obs=obs)


def test_ari_nmi_hand_computed():
    # truth 000111, pred 001122: sum C(n_ij,2) = 2, rows 6, cols 3, C(6,2) = 15
    # ARI = (2 - 6*3/15) / ((6+3)/2 - 6*3/15) = 0.8 / 3.3 = 8/33
    # MI = 2/3 ln 2, H(truth) = ln 2, H(pred) = ln 3 -> NMI = (2/3 ln2) / ((ln2 + ln3)/2)
    a = _labelled(list("aaabbb"), list("001122"))
    assert ev.ari(a, "pred") == pytest.approx(8 / 33)
    assert ev.nmi(a, "pred") == pytest.approx((4 / 3) * math.log(2) / (math.log(2) + math.log(3)))
    perfect = _labelled(list("aabb"), list("1100"))
    assert ev.ari(perfect, "pred") == pytest.approx(1.0)
    assert ev.nmi(perfect, "pred") == pytest.approx(1.0)


def test_ari_ignores_unlabelled_and_undetermined():
    truth = ["a", "a", "a", "b", "b", "b", "undetermined", None, "Undetermined"]
    pred = ["0", "0", "1", "1", "2", "2", "5", "6", "7"]
    a = _labelled(truth, pred)
    assert ev.ari(a, "pred") == pytest.approx(8 / 33)
    # custom ignore set: also drop label "b" -> all-a truth vs (0, 0, 1): ARI 0
    assert ev.ari(a, "pred", ignore=("undetermined", "b")) == pytest.approx(0.0)
    assert len(ev.scored_labels(a).unique()) == 2


def test_ari_joins_series_by_spot_name_not_row_order():
    a = _labelled(list("aaabbb"), list("001122"))
    truth = pd.Series(list("aaabbb"), index=a.obs_names)[::-1]  # reversed order, same names
    assert ev.ari(a, "pred", annotation=truth) == pytest.approx(8 / 33)
    # spots missing from the Series are unlabelled
    part = truth.drop(["s0"])
    pred_rest = _labelled(list("aabbb"), list("01122"), names=["s1", "s2", "s3", "s4", "s5"])
    assert ev.ari(a, "pred", annotation=part) == pytest.approx(ev.ari(pred_rest, "pred"))
    with pytest.raises(InputError, match="spot names"):
        ev.ari(a, "pred", annotation=pd.Series(list("ab"), index=["x", "y"]))
    with pytest.raises(InputError, match="not a column"):
        ev.ari(a, "nope")


# ---------------------------------------------------------------------------- markers

def test_markers_recover_planted_genes_and_leave_x_alone():
    adata = toy_tissue()
    x_before = adata.X.copy()
    df = ev.markers(adata, "annotation", key_added="mk")
    assert list(df.columns)[:5] == ["gene", "domain", "logfoldchange", "score", "pval"]
    assert "pval_adj" in df
    planted = adata.uns["toy"]["planted"]
    for region, genes in planted.items():
        top = df[df["domain"] == region].head(10)
        assert set(top["gene"]) == set(genes), region
        assert (top["pval_adj"] < 1e-6).all()
        assert (top["logfoldchange"] > 1).all()
    assert (adata.X != x_before).nnz == 0
    assert adata.uns["mk"]["params"]["groupby"] == "annotation"
    small = ev.markers(adata, "annotation", n_genes=2)
    assert small.groupby("domain").size().eq(2).all()


def test_marker_fold_change_is_seurats_not_a_pseudo_count_artefact():
    """A gene absent outside a domain: log2(mean_in + 1) - log2(0 + 1) on the normalised scale (Seurat's
    FindMarkers), not scanpy's ~28 from its 1e-9 pseudo-count; table and uns agree."""
    import anndata as ad

    rng = np.random.default_rng(0)
    n = 60
    X = rng.poisson(20, size=(n, 5)).astype(np.float32)
    dom = np.repeat(["a", "b"], n // 2)
    X[:, 4] = 0
    X[dom == "a", 4] = rng.poisson(0.5, n // 2)  # low, and only in "a"
    adata = ad.AnnData(X, obs=pd.DataFrame({"d": pd.Categorical(dom)}, index=[f"s{i}" for i in range(n)]))
    adata.var_names = [f"g{i}" for i in range(5)]
    df = ev.markers(adata, "d", key_added="mk")
    row = df[(df["domain"] == "a") & (df["gene"] == "g4")].iloc[0]
    norm = X[dom == "a"] / X[dom == "a"].sum(axis=1, keepdims=True) * 1e4
    assert row["logfoldchange"] == pytest.approx(np.log2(norm[:, 4].mean() + 1), rel=1e-4)
    assert 0 < row["logfoldchange"] < 10 and row["pct_out"] == 0
    names = list(adata.uns["mk"]["names"]["a"])
    assert adata.uns["mk"]["logfoldchanges"]["a"][names.index("g4")] == pytest.approx(row["logfoldchange"], rel=1e-5)
    adata.var_names = ["g0", "g1", "g2", "g2", "g4"]  # scanpy's table would repeat rows
    with pytest.raises(InputError, match="repeat 1 gene name.*'g2'.*var_names_make_unique"):
        ev.markers(adata, "d")


def test_markers_on_a_sample_of_many_spots_keep_every_domain():
    """Visium HD: above max_spots the test runs on a per-domain sample (>= min(size, 500) each); planted genes
    are still found and the sample size is recorded."""
    adata = toy_tissue(n_side=60, image=False)  # three bands of 1,200 spots
    n = adata.n_obs
    sizes = adata.obs["annotation"].value_counts()
    df = ev.markers(adata, "annotation", max_spots=1200, key_added="mk")
    p = adata.uns["mk"]["params"]
    assert p["n_spots_labelled"] == n and p["n_spots_tested"] == 3 * 500  # 400 each, raised to the 500 floor
    assert set(df["domain"]) == {str(d) for d in sizes.index}
    for region, genes in adata.uns["toy"]["planted"].items():
        assert set(df[df["domain"] == region].head(10)["gene"]) == set(genes), region
    full = ev.markers(adata, "annotation", max_spots=None, key_added="mk2")
    assert adata.uns["mk2"]["params"]["n_spots_tested"] == n and len(full) == len(df)


def test_markers_input_errors():
    adata = toy_tissue(n_side=8)
    with pytest.raises(InputError, match="not a column"):
        ev.markers(adata, "nope")
    adata.obs["one"] = "x"
    with pytest.raises(InputError, match="at least two"):
        ev.markers(adata, "one")


# ---------------------------------------------------------------------------- GSEA

@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a socket fails the test."""

    def guard(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", guard)
    monkeypatch.setattr(socket, "create_connection", guard)
    yield


def _write_gmt(path: Path, adata) -> Path:
    planted = adata.uns["toy"]["planted"]
    rng = np.random.default_rng(1)
    background = [g for g in adata.var_names[30:]]
    lines = [
        "HALLMARK_TUMOUR\tplanted in tumour\t" + "\t".join(planted["tumour"]),
        "STROMA_SET\tplanted in stroma\t" + "\t".join(planted["stroma"]),
        "RANDOM_A\tbackground\t" + "\t".join(rng.choice(background, 10, replace=False)),
        "RANDOM_B\tbackground\t" + "\t".join(rng.choice(background, 10, replace=False)),
        "NOT_IN_DATA\tabsent\tFOO1\tFOO2\tFOO3",
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_gsea_planted_set_is_significant_offline(tmp_path, no_network):
    adata = toy_tissue()
    gmt = _write_gmt(tmp_path / "tiny.gmt", adata)
    assert ev.read_gmt(gmt)["STROMA_SET"] == adata.uns["toy"]["planted"]["stroma"]
    ev.markers(adata, "annotation")  # ranking reused from uns
    res = ev.gsea(adata, "annotation", "tumour", gmt, permutation_num=200, random_state=0)
    assert list(res.columns) == ["domain", "term", "es", "nes", "pval", "fdr", "fwer", "size", "lead_genes",
                                 "significant"]
    top = res.iloc[0]
    assert top["term"] == "HALLMARK_TUMOUR"
    assert top["nes"] > 1 and top["fdr"] < 0.05 and bool(top["significant"])
    assert set(top["lead_genes"].split(";")) <= set(adata.uns["toy"]["planted"]["tumour"])
    stroma = res.set_index("term").loc["STROMA_SET"]
    assert stroma["nes"] < 0  # depleted in tumour
    assert "NOT_IN_DATA" not in set(res["term"])
    # same seed, same result; dict gene sets and all domains at once, without cached markers
    del adata.uns["rank_genes_groups"]
    again = ev.gsea(adata, "annotation", None, ev.read_gmt(gmt), permutation_num=200, random_state=0)
    assert set(again["domain"]) == set(REGIONS)
    t = again[again["domain"] == "tumour"].set_index("term")
    assert t.loc["HALLMARK_TUMOUR", "nes"] == pytest.approx(top["nes"])
    assert "rank_genes_groups" not in adata.uns
    strict = ev.gsea(adata, "annotation", "stroma", gmt, permutation_num=200, fdr=0.0)
    assert not strict["significant"].any()
    lax = ev.gsea(adata, "annotation", "stroma", gmt, permutation_num=200, fdr=1.01)
    assert lax["significant"].all()


def test_gsea_refuses_names_and_bad_sets(tmp_path, no_network):
    adata = toy_tissue(n_side=10)
    with pytest.raises(InputError, match="not a file"):
        ev.gsea(adata, "annotation", "tumour", "MSigDB_Hallmark_2020")
    with pytest.raises(InputError, match="GMT file path or a dict"):
        ev.gsea(adata, "annotation", "tumour", ["KEGG_2021_Human"])
    with pytest.raises(InputError, match="no gene set"):
        ev.gsea(adata, "annotation", "tumour", {"X": ["FOO1", "FOO2"]}, permutation_num=10)
    with pytest.raises(InputError, match="not found"):
        ev.gsea(adata, "annotation", "nowhere", {"X": ["G000"]})
    bad = tmp_path / "bad.gmt"
    bad.write_text("only_a_name\n")
    with pytest.raises(InputError, match="not GMT"):
        ev.read_gmt(bad)


def test_import_stmorph_stays_light():
    import subprocess
    import sys

    code = "import sys, stmorph; print(','.join(m for m in ('matplotlib', 'scanpy', 'gseapy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""
    assert stmorph.ev.ari is ev.ari
