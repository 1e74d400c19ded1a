"""`stmorph run` and `stmorph demo` end to end on small synthetic tissue."""

import json
import sys

import anndata as ad
import pandas as pd
import pytest

from conftest import DATA
from stmorph import datasets
from stmorph.cli import build_parser, main
from stmorph.cli._run import method_options


@pytest.fixture(scope="module")
def visium_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    tissue = datasets.synthetic(160, n_genes=300, random_state=1)
    return datasets.write_visium(tissue, root / "outs")


def test_run_writes_every_output_and_refuses_to_clobber(visium_folder, tmp_path, capsys):
    out = tmp_path / "res"
    argv = [str(visium_folder), "--image", str(visium_folder / "image.tif"), "--method", "stmic",
            "--n-clusters", "4", "--out", str(out)]
    assert main(["run", *argv]) == 0
    assert {p.name for p in out.iterdir()} == {"result.h5ad", "domains.csv", "spatial_domains.png", "run.json",
                                           ".stmorph"}
    table = pd.read_csv(out / "domains.csv", index_col="barcode")
    assert list(table.columns) == ["expression", "image", "stmic"]
    assert all(table[c].nunique() == 4 for c in table.columns)
    info = json.loads((out / "run.json").read_text())
    assert info["parameters"] == {"n_clusters": 4, "random_state": 0}  # what was given
    assert info["method_params"]["stmic"]["n_neighbors"] == 39  # what each method used
    assert len(info["encoder"]["weights_sha256"]) == 64 and info["encoder"]["patch_size_px"] > 0
    assert {"read", "expression_embedding", "image_features", "cluster_stmic"} <= set(info["timings_s"])
    assert "torch" in info["packages"] and set(info["ari"]) == {"expression", "image", "stmic"}
    assert info["method_params"]["stmic"]["method"] == "louvain" and set(info["method_params"]) == set(info["ari"])
    res = ad.read_h5ad(out / "result.h5ad")
    assert {"X_expr_pca", "X_image", "X_image_pca", "X_stmic"} <= set(res.obsm)
    assert list(res.obs_names) == list(table.index.astype(str))
    # each method's time is its own: the shared steps (image features, the embeddings the baselines made and
    # stmic reused) are counted once, apart, so the methods' and the shared steps' times add up to the run's
    assert {"image_features", "expression_embedding", "image_embedding"} <= set(info["shared_s"])
    counted = sum(info["methods_s"].values()) + sum(info["shared_s"].values())
    assert counted <= info["timings_s"]["methods_total"] + 0.01
    assert counted == pytest.approx(info["timings_s"]["methods_total"], rel=0.1, abs=0.5)
    summary = capsys.readouterr().out
    assert "stmic" in summary and "ARI" in summary
    assert "shared steps (once, in no method's time): image features" in summary and "  total " in summary
    assert "report:" not in summary  # no --report: no report's path

    before = (out / "domains.csv").read_bytes()
    assert main(["run", *argv]) == 2  # exists, no --force
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--force" in err[0]
    assert (out / "domains.csv").read_bytes() == before
    assert main(["run", *argv, "--force", "--seed", "0", "--quiet"]) == 0
    assert capsys.readouterr().out == ""
    assert (out / "domains.csv").read_bytes() == before  # same input + seed = same labels


def test_run_is_deterministic_across_seeds_and_leiden(visium_folder, tmp_path):
    outs = []
    for i in range(2):
        out = tmp_path / f"r{i}"
        assert main(["run", str(visium_folder), "--method", "expression", "--cluster-method", "leiden",
                     "--seed", "7", "--out", str(out), "--quiet", "--no-plot"]) == 0
        outs.append((out / "domains.csv").read_text())
    assert outs[0] == outs[1]


def test_run_bad_input_is_one_line(tmp_path, capsys):
    assert main(["run", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such file" in err[0]
    (tmp_path / "x.bin").write_text("junk")
    assert main(["run", str(tmp_path / "x.bin"), "--out", str(tmp_path / "o")]) == 2
    assert "unrecognised input" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_image_methods_need_an_image(visium_folder, tmp_path, capsys):
    assert main(["run", str(visium_folder), "--method", "image", "--out", str(tmp_path / "o")]) == 2
    assert "needs the H&E image" in capsys.readouterr().err


def test_demo_runs_writes_its_report_and_prints_its_path_last(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--n-spots", "150", "--method", "stmic", "--n-clusters", "5"]) == 0
    captured = capsys.readouterr()
    text = captured.out
    assert "stmic" in text and "ARI" in text
    info = json.loads((out / "run.json").read_text())
    assert str(out.resolve()) in info["encoder"]["image"]  # final location, not the staging folder
    assert (out / "input" / "filtered_feature_bc_matrix.h5").exists()
    # the report is part of the demo, its section named "demo" (not the staging folder "input")
    assert "report.html" in info["outputs"]
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "<h1>Spatial domains: demo</h1>" in page and "<title>stmorph report: demo</title>" in page
    assert text.rstrip("\n").splitlines()[-1] == f"report: {out / 'report.html'}"
    # the steps around the methods are timed and shown too, and progress lines go to stderr
    assert "other steps: synthetic" in text and "report " in text
    assert "stmic: cluster stmic ..." in captured.err and "image features ..." in captured.err
    assert main(["demo", "--out", str(tmp_path / "q"), "--n-spots", "150", "--method", "expression",
                 "--no-report", "--no-plot", "--quiet"]) == 0
    assert capsys.readouterr().out == "" and not (tmp_path / "q" / "report.html").exists()


def _to_stderr(message, category, filename, lineno, file=None, line=None):
    sys.stderr.write(f"warning: {message}\n")


def test_each_warning_is_printed_once(tmp_path, capsys):
    """A reader's warning is shown when it is given and kept in run.json, not shown again in the summary;
    the same warning given twice is shown once."""
    import warnings

    tissue = datasets.synthetic(120, n_genes=300, random_state=2)
    counts = tissue.X.tolil()
    counts[3, :] = 0  # a spot without counts: the reader leaves it out, with a warning
    tissue.X = counts.tocsr()
    src = tmp_path / "t.h5ad"
    tissue.write_h5ad(src)
    with warnings.catch_warnings():  # shown on stderr, as on the command line, not collected by pytest
        warnings.showwarning = _to_stderr
        assert main(["run", str(src), "--method", "expression", "--n-clusters", "4", "--no-plot",
                     "--out", str(tmp_path / "o")]) == 0
    captured = capsys.readouterr()
    both = captured.out + captured.err
    assert both.count("with zero counts") == 1
    info = json.loads((tmp_path / "o" / "run.json").read_text())
    assert len(info["warnings"]) == 1 and "with zero counts" in info["warnings"][0]
    assert "1 warning, shown above and kept in run.json" in captured.out

    from stmorph.cli._run import warnings_once

    seen = ["already shown"]
    with warnings.catch_warnings():
        warnings.showwarning = _to_stderr
        with warnings_once(seen):
            for _ in range(3):
                warnings.warn("given three times", UserWarning, stacklevel=1)
            warnings.warn("already shown", UserWarning, stacklevel=1)
    assert seen == ["already shown", "given three times"]
    assert capsys.readouterr().err.count("given three times") == 1


def test_help_is_plain_text_and_says_what_the_default_does():
    """No RST markup in any command's help; --n-clusters says how stmorph chooses the count without it."""
    import argparse
    import inspect

    from stmorph import tl

    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subs.choices.items():
        text = sub.format_help()
        assert "``" not in text and ":func:" not in text and ":mod:" not in text, name
    run = subs.choices["run"]
    help_text = next(a.help for a in run._actions if "--n-clusters" in a.option_strings)
    choose = inspect.signature(tl.choose_n_clusters).parameters
    k_range = inspect.signature(tl.stmorph).parameters["k_range"].default
    assert "stmorph and stmorph_expr take the number of Louvain communities" in help_text
    assert f"{choose['n_neighbors'].default} neighbours, resolution {choose['resolution'].default}" in help_text
    assert f"within {k_range[0]}-{k_range[1]}" in help_text
    assert "expression baseline's count" in help_text

    from stmorph.cli import plain

    assert plain("``x``: see :func:`stmorph.tl.stmorph` and :class:`~stmorph.tl.Option`") == (
        "x: see stmorph.tl.stmorph and Option")


@pytest.mark.realdata
@pytest.mark.skipif(not (DATA / "her2st" / "ST-cnts" / "A1.tsv.gz").exists(), reason="../shared/data absent")
def test_run_her2st_a1_produces_all_outputs(tmp_path):
    h = DATA / "her2st"
    out = tmp_path / "a1"
    rc = main(["run", str(h / "ST-cnts/A1.tsv.gz"), "--spots", str(h / "ST-spotfiles/A1_selection.tsv"),
               "--labels", str(h / "ST-pat/lbl/A1_labeled_coordinates.tsv"),
               "--image", str(h / "ST-imgs/A/A1/A1_HE_2000px.png"), "--pixel-scale", "auto",
               "--method", "stmic", "--n-clusters", "6", "--out", str(out), "--quiet"])
    assert rc == 0
    assert {p.name for p in out.iterdir()} == {"result.h5ad", "domains.csv", "spatial_domains.png", "run.json",
                                           ".stmorph"}
    info = json.loads((out / "run.json").read_text())
    assert info["n_spots"] > 300 and set(info["ari"]) == {"expression", "image", "stmic"}


def test_run_passes_the_stmorph_method_options(visium_folder, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["run", str(visium_folder), "--method", "stmorph_expr", "--n-clusters", "4", "--sigma-um", "80", "150",
                 "--n-top-genes", "200", "--hvg-flavor", "seurat", "--out", str(out), "--quiet", "--no-plot"]) == 0
    res = ad.read_h5ad(out / "result.h5ad")
    p = res.uns["X_stmorph_expr_expression"]["params"]
    assert list(p["sigmas_um"]) == [80.0, 150.0] and p["n_top_genes"] == 200 and p["hvg_flavor"] == "seurat"
    assert res.uns["stmorph_expr"]["params"]["hvg_flavor"] == "seurat"
    # run.json says what the method did, not only the run's options (its clustering is the consensus, not Louvain)
    done = json.loads((out / "run.json").read_text())["method_params"]["stmorph_expr"]
    assert done["method"] == "consensus" and done["n_clusters"] == 4 and done["modalities"] == ["expression"]
    args = build_parser().parse_args(["run", str(visium_folder), "--out", str(tmp_path / "y"), "--context-patch", "senca",
                                      "--image-weight", "0.5"])
    assert method_options(args, ["stmorph"]) == {"context_patch": "senca", "image_weight": 0.5, "random_state": 0}
    args = build_parser().parse_args(["run", str(visium_folder), "--out", str(tmp_path / "y"), "--senca-preset",
                                      "mixture", "--senca-epochs", "12"])
    assert method_options(args, ["senca"]) == {"senca_epochs": 12, "senca_preset": "mixture", "random_state": 0}
    from stmorph.tl.senca._config import PRESETS

    assert set(PRESETS) == {"default", "literal", "mixture"}  # the choices of --senca-preset
    for bad in (["--sigma-um", "-5"], ["--n-top-genes", "0"], ["--hvg-flavor", "pearson"], ["--context-patch", "6"],
                ["--senca-preset", "paper"]):
        with pytest.raises(SystemExit):
            main(["run", str(visium_folder), "--out", str(tmp_path / "x"), *bad])
        err = capsys.readouterr().err.strip().splitlines()
        assert err and bad[0] in err[-1]
