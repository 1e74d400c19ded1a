"""Property-based tests of the readers: any small matrix, coordinates, positions or label file gives either
an AnnData that follows the data model or a StmorphError (one line, naming the problem), never another
exception, and a reader writes nothing."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as hs  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

import stmorph as st  # noqa: E402
from stmorph import datasets  # noqa: E402
from stmorph.errors import StmorphError  # noqa: E402
from stmorph.read import _legacy_st, _visium  # noqa: E402

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                    derandomize=True)

values = hs.one_of(hs.integers(0, 50).map(float), hs.floats(allow_nan=True, allow_infinity=True, width=32),
                   hs.just(0.0), hs.floats(0, 10, width=32))
tokens = hs.one_of(hs.integers(-5, 10**6).map(str), hs.floats(allow_nan=True, allow_infinity=True).map(str),
                   hs.sampled_from(["", "NA", "nan", "x", "1x2", "AAAC-1", " ", "1e400", "-0", "0.5"]),
                   hs.text(hs.characters(blacklist_categories=("Cs",), blacklist_characters="\t\n\r\x00,"),
                           max_size=6))


def _snapshot(folder: Path):
    return sorted((str(p.relative_to(folder)), p.stat().st_size) for p in folder.rglob("*"))


def _ok_or_stmorph_error(func, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            out = func(*args, **kwargs)
        except StmorphError as exc:
            assert "\n" not in str(exc), str(exc)
            return None
    if isinstance(out, ad.AnnData):
        assert st._validate.problems(out) == []  # a result follows the data model
    return out


@hs.composite
def anndatas(draw):
    n = draw(hs.integers(1, 12))
    g = draw(hs.integers(1, 6))
    X = draw(hnp.arrays(np.float32, (n, g), elements=values))
    xy = draw(hnp.arrays(np.float64, (n, 2), elements=hs.one_of(hs.floats(0, 5000), hs.floats(allow_nan=True))))
    a = ad.AnnData(X=X)
    a.obs_names = draw(hs.one_of(hs.just([f"s{i}" for i in range(n)]),
                                 hs.lists(hs.sampled_from(["a", "b", "c", "d"]), min_size=n, max_size=n)))
    a.obsm["spatial"] = xy
    diameter = draw(hs.one_of(hs.floats(allow_nan=True, allow_infinity=True), hs.just(50.0), hs.none()))
    sf = {} if diameter is None else {"spot_diameter_fullres": diameter}
    meta = draw(hs.sampled_from([{}, {"source_image_path": "None"}, {"source_image_path": ""},
                                 {"source_image_path": "no/such/file.tif"}]))
    if draw(hs.booleans()):
        a.uns["spatial"] = {"lib": {"images": {}, "scalefactors": sf, "metadata": meta}}
    return a


@SETTINGS
@given(a=anndatas(), on_disk=hs.booleans())
def test_h5ad_reader_result_or_stmorph_error(a, on_disk):
    if not on_disk:
        _ok_or_stmorph_error(st.read.h5ad, a)
        return
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "x.h5ad"
        try:
            a.write_h5ad(path)
        except Exception:  # noqa: BLE001 - anndata itself refuses some objects (duplicate names)
            return
        before = _snapshot(Path(d))
        out = _ok_or_stmorph_error(st.read.h5ad, path)
        assert _snapshot(Path(d)) == before
        if out is not None:
            assert np.all(np.asarray(out.X.sum(axis=1)).ravel() > 0)  # zero-count spots are left out


@SETTINGS
@given(rows=hs.lists(hs.lists(tokens, min_size=4, max_size=4), min_size=1, max_size=8),
       genes=hs.lists(tokens, min_size=3, max_size=3),
       sel=hs.lists(hs.lists(tokens, min_size=5, max_size=5), min_size=1, max_size=8),
       lab=hs.lists(hs.lists(tokens, min_size=3, max_size=3), min_size=0, max_size=6),
       use_labels=hs.booleans())
def test_legacy_st_reader_result_or_stmorph_error(rows, genes, sel, lab, use_labels):
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        (d / "c.tsv").write_text("\t" + "\t".join(genes) + "\n" + "".join("\t".join(r) + "\n" for r in rows))
        (d / "s.tsv").write_text("x\ty\tpixel_x\tpixel_y\tselected\n" + "".join("\t".join(r) + "\n" for r in sel))
        (d / "l.tsv").write_text("x\ty\tlabel\n" + "".join("\t".join(r) + "\n" for r in lab))
        before = _snapshot(d)
        _ok_or_stmorph_error(st.read.legacy_st, d / "c.tsv", d / "s.tsv", labels=d / "l.tsv" if use_labels else None)
        _ok_or_stmorph_error(_legacy_st.read_labels, d / "l.tsv")
        assert _snapshot(d) == before


@SETTINGS
@given(rows=hs.lists(hs.lists(tokens, min_size=6, max_size=6), min_size=1, max_size=6),
       labels=hs.lists(hs.lists(tokens, min_size=2, max_size=2), min_size=0, max_size=6))
def test_positions_and_barcode_labels_result_or_stmorph_error(rows, labels):
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        p = d / "tissue_positions.csv"
        p.write_text("barcode,in_tissue,array_row,array_col,pxl_row_in_fullres,pxl_col_in_fullres\n"
                     + "".join(",".join(r) + "\n" for r in rows))
        lab = d / "labels.tsv"
        lab.write_text("barcode\tlabel\n" + "".join("\t".join(r) + "\n" for r in labels))
        for func, path in ((_visium.read_positions, p), (_visium.read_barcode_labels, lab)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    func(path)
                except StmorphError as exc:
                    assert "\n" not in str(exc)


@pytest.fixture(scope="module")
def visium_section(tmp_path_factory):
    tissue = datasets.synthetic(60, n_genes=250, random_state=4)
    return datasets.write_visium(tissue, tmp_path_factory.mktemp("prop") / "outs", fullres=None, positions="csv")


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(edits=hs.lists(hs.tuples(hs.integers(0, 59), hs.integers(1, 5), tokens), min_size=1, max_size=4),
       labels=hs.lists(hs.tuples(hs.integers(0, 80), tokens), max_size=5))
def test_visium_reader_with_damaged_positions_result_or_stmorph_error(visium_section, edits, labels):
    import shutil

    with tempfile.TemporaryDirectory() as d:
        outs = Path(d) / "outs"
        shutil.copytree(visium_section, outs)
        pos = next((outs / "spatial").glob("tissue_positions*.csv"))
        df = pd.read_csv(pos, dtype=str, keep_default_na=False)
        for row, col, value in edits:
            df.iat[row % len(df), col] = value
        df.to_csv(pos, index=False)
        lab = outs / "labels.tsv"
        if labels:
            names = df["barcode"].tolist()
            lab.write_text("barcode\tlabel\n" + "".join(f"{names[i] if i < len(names) else 'x'}\t{t}\n"
                                                       for i, t in labels))
        before = _snapshot(outs)
        _ok_or_stmorph_error(st.read.visium, outs)
        assert _snapshot(outs) == before


@settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(a=anndatas(), out=hs.sampled_from(["res", ".", "", "in.h5ad", "..", "sub/res", "in.h5ad/x", "mine"]),
       force=hs.booleans())
def test_cli_run_writes_nothing_outside_out(a, out, force):
    import os

    from stmorph.cli import main

    with tempfile.TemporaryDirectory() as d:
        root = Path(d) / "work"
        (root / "mine").mkdir(parents=True)
        (root / "mine" / "notes.txt").write_text("mine")
        try:
            a.write_h5ad(root / "in.h5ad")
        except Exception:  # noqa: BLE001 - anndata refuses some objects
            return
        before = _snapshot(Path(d))
        cwd = os.getcwd()
        os.chdir(root)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                rc = main(["run", "in.h5ad", "--method", "expression", "--n-clusters", "2", "--out", out, "--quiet",
                           "--no-plot", *(["--force"] if force else [])])
        finally:
            os.chdir(cwd)
        assert rc in (0, 2)
        target = (root / out).resolve()
        after = [e for e in _snapshot(Path(d)) if not (Path(d) / e[0]).resolve().is_relative_to(target)]
        kept = [e for e in before if not (Path(d) / e[0]).resolve().is_relative_to(target)]
        assert after == kept  # nothing outside --out changed
        assert (root / "in.h5ad").exists() and (root / "mine" / "notes.txt").read_text() == "mine"
