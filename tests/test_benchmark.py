"""Tests of the benchmark harness: section discovery, runs with an injected runner, tables, CLI."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from stmorph.errors import InputError, OutputExistsError
from stmorph.ev import _benchmark as bm

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
LABELS = ("invasive cancer", "connective tissue", "immune infiltrate")


def _her2st(root: Path, section: str, *, n_side: int = 10, image: bool = False, seed: int = 0) -> None:
    """A tiny section in the published HER2ST layout."""
    rng = np.random.default_rng(seed)
    xs, ys = np.meshgrid(np.arange(1, n_side + 1), np.arange(1, n_side + 1))
    xs, ys = xs.ravel(), ys.ravel()
    region = np.minimum((xs - 1) * 3 // n_side, 2)
    genes = [f"GENE{i}" for i in range(30)]
    lam = np.full((xs.size, 30), 2.0)
    for i in range(3):
        lam[np.ix_(region == i, range(10 * i, 10 * i + 5))] = 12.0
    counts = pd.DataFrame(rng.poisson(lam), columns=genes, index=[f"{x}x{y}" for x, y in zip(xs, ys, strict=True)])
    (root / "ST-cnts").mkdir(parents=True, exist_ok=True)
    with gzip.open(root / "ST-cnts" / f"{section}.tsv.gz", "wt") as fh:
        counts.to_csv(fh, sep="\t")
    (root / "ST-spotfiles").mkdir(exist_ok=True)
    sel = pd.DataFrame({"x": xs, "y": ys, "new_x": xs, "new_y": ys, "pixel_x": xs * 100.0 + 50,
                        "pixel_y": ys * 100.0 + 50, "selected": 1})
    sel.to_csv(root / "ST-spotfiles" / f"{section}_selection.tsv", sep="\t", index=False)
    (root / "ST-pat" / "lbl").mkdir(parents=True, exist_ok=True)
    lab = [LABELS[r] for r in region]
    lab[0] = "undetermined"
    lbl = pd.DataFrame({"Row.names": counts.index, "x": xs + 0.02, "y": ys - 0.01, "pixel_x": 0.0, "pixel_y": 0.0,
                        "label": lab})
    lbl.to_csv(root / "ST-pat" / "lbl" / f"{section}_labeled_coordinates.tsv", sep="\t", index=False)
    if image:
        from PIL import Image

        d = root / "ST-imgs" / section[0] / section
        d.mkdir(parents=True)
        Image.fromarray(np.full((600, 600, 3), 200, np.uint8)).save(d / f"{section}_HE.png")
        (d / "scalefactors.json").write_text(json.dumps({"image": f"{section}_HE.png", "pixel_scale": 0.5}))


def _fake_runner(calls):
    """Stand-in for tl.run_methods: 'oracle' copies the truth, 'noisy' flips labels by seed, 'needs_image'
    refuses sections without an image, 'crash' raises a bug."""

    def runner(adata, methods, *, n_clusters, random_state):
        (m,) = methods
        calls.append((m, n_clusters, random_state))
        truth = adata.obs["annotation"].astype(str).to_numpy()
        if m == "needs_image":
            lib = next(iter(adata.uns["spatial"].values()))
            if not lib.get("metadata", {}).get("source_image_path"):
                raise InputError("method 'needs_image' needs the H&E image: no image")
        if m == "crash":
            raise RuntimeError("bug")
        lab = truth.copy()
        if m == "noisy":
            rng = np.random.default_rng(random_state)
            flip = rng.random(lab.size) < 0.3
            lab[flip] = rng.choice(sorted(set(truth)), flip.sum())
        adata.obs[m] = pd.Categorical(lab)
        return {m: 0.5}

    return runner


def test_find_sections_layouts(tmp_path):
    _her2st(tmp_path / "her2st", "A1", image=True)
    _her2st(tmp_path / "her2st", "B1")
    (tmp_path / "her2st" / "ST-spotfiles" / "Z9_selection.tsv").write_text("x\ty\n")  # no counts, no labels
    vis = tmp_path / "visium" / "s1" / "outs"
    (vis / "spatial").mkdir(parents=True)
    (vis / "filtered_feature_bc_matrix.h5").write_bytes(b"")
    (tmp_path / "visium" / "s1" / "labels.tsv").write_text("barcode\tlayer\n")
    (tmp_path / "visium" / "s1" / "small.png").write_bytes(b"x" * 10)
    (tmp_path / "visium" / "s1" / "fullres.tif").write_bytes(b"x" * 100)
    unl = tmp_path / "visium" / "s2"
    (unl / "spatial").mkdir(parents=True)
    (unl / "filtered_feature_bc_matrix.h5").write_bytes(b"")  # no labels: not a benchmark section
    secs = bm.find_sections(tmp_path)
    assert [s.name for s in secs] == ["her2st/A1", "her2st/B1", "visium/s1"]
    a1, b1, s1 = secs
    assert a1.image.name == "A1_HE.png" and a1.pixel_scale == pytest.approx(0.5)
    assert b1.image is None and s1.layout == "visium" and s1.path == vis
    assert s1.image.name == "fullres.tif"  # the largest image file beside outs/
    with pytest.raises(InputError, match="not found"):
        bm.find_sections(tmp_path / "nope")


def test_run_benchmark_tables_and_skips(tmp_path):
    data = tmp_path / "data"
    _her2st(data, "A1", image=True)
    _her2st(data, "B1", seed=1)
    calls = []
    out = tmp_path / "out"
    df = bm.run_benchmark(data, ["oracle", "noisy", "needs_image", "crash"], seeds=2, out=out,
                          runner=_fake_runner(calls), log=lambda m: None)
    assert len(df) == 2 * 4 * 2
    # n_clusters = number of scored labels (undetermined left out)
    assert {c[1] for c in calls} == {3}
    assert {c[2] for c in calls} == {0, 1}
    ok = df[df["method"] == "oracle"]
    assert (ok["status"] == "ok").all() and np.allclose(ok["ARI"], 1.0) and np.allclose(ok["NMI"], 1.0)
    noisy = df[df["method"] == "noisy"]
    assert (noisy["ARI"] < 1).all() and noisy["ARI"].nunique() > 1
    ni = df[df["method"] == "needs_image"].set_index(["section", "seed"])
    assert ni.loc[("A1", 0), "status"] == "ok"
    assert ni.loc[("B1", 0), "status"] == "skipped"
    assert "needs the H&E image" in ni.loc[("B1", 0), "reason"]
    assert (df[df["method"] == "crash"]["status"] == "failed").all()

    csv = pd.read_csv(out / "benchmark.csv")
    assert list(csv.columns[:6]) == ["section", "method", "seed", "ARI", "NMI", "seconds"]
    assert len(csv) == len(df)
    md = (out / "benchmark.md").read_text()
    for name in ("| A1 |", "| B1 |", "oracle", "noisy", "needs_image", "crash", "Summary per method"):
        assert name in md
    assert "1.000 ± 0.000" in md  # oracle, mean ± sd over 2 seeds
    noisy_a1 = noisy[noisy["section"] == "A1"]["ARI"]
    assert f"{noisy_a1.mean():.3f} ± {noisy_a1.std(ddof=1):.3f}" in md
    assert "skipped [" in md and "needs the H&E image" in md
    summ = bm.summarize(df)
    row = summ.set_index("method").loc["noisy"]
    per_sec = noisy.groupby("section")["ARI"].mean()
    assert row["mean ARI"] == pytest.approx(per_sec.mean())
    assert row["median ARI"] == pytest.approx(per_sec.median())
    assert summ.set_index("method").loc["needs_image", "sections"] == 1
    with pytest.raises(OutputExistsError):
        bm.run_benchmark(data, ["oracle"], seeds=1, out=out, runner=_fake_runner([]), log=lambda m: None)


def test_cli_benchmark_list_and_errors(tmp_path, capsys):
    from stmorph.cli import main

    _her2st(tmp_path / "d", "C1")
    assert main(["benchmark", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "o"), "--list"]) == 0
    assert "C1" in capsys.readouterr().out
    assert main(["benchmark", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "o"), "--methods", "bogus"]) == 2
    assert "unknown method" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["benchmark", "--data", str(empty), "--out", str(tmp_path / "o")]) == 2
    assert "no annotated section" in capsys.readouterr().err


@pytest.mark.realdata
@pytest.mark.skipif(not DATA.exists(), reason="../shared/data not present")
def test_shared_data_sections_found():
    names = [s.name for s in bm.find_sections(DATA)]
    for expected in ("her2st/A1", "her2st/B1", "her2st/C1", "her2st/D1", "dlpfc/151673", "dlpfc/151674"):
        assert expected in names
    assert "her2st/C2" not in names and "her2st/B4" not in names  # not annotated


def test_run_benchmark_with_run_methods(tmp_path):
    """The default runner (stmorph.tl.run_methods) end to end on a tiny HER2ST-layout section without image."""
    _her2st(tmp_path / "d", "B1", n_side=12)
    df = bm.run_benchmark(tmp_path / "d", ["expression", "image"], seeds=[0, 1], out=tmp_path / "o",
                          log=lambda m: None)
    expr = df[df["method"] == "expression"]
    assert (expr["status"] == "ok").all()
    assert (expr["ARI"] > 0.5).all() and (expr["n_clusters"] == 3).all()
    img = df[df["method"] == "image"]
    assert (img["status"] == "skipped").all() and img["reason"].str.contains("image").all()
    md = (tmp_path / "o" / "benchmark.md").read_text()
    assert "| B1 | 144 | 3 |" in md and "skipped [1]" in md
