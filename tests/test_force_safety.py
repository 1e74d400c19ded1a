"""`--force` replaces only what stmorph wrote: never an input, the working directory or a user's folder."""

import json

import pytest

from stmorph._outputs import MARKER, atomic_dir, check_writable, record_entries, stmorph_entries
from stmorph.cli import main
from stmorph.errors import OutputExistsError


def _tree(root):
    return sorted((str(p.relative_to(root)), p.read_bytes() if p.is_file() else None) for p in root.rglob("*"))


@pytest.fixture
def proj(tmp_path):
    outs = tmp_path / "proj" / "outs"
    (outs / "spatial").mkdir(parents=True)
    (outs / "filtered_feature_bc_matrix.h5").write_bytes(b"not really h5")
    (outs / "spatial" / "tissue_positions.csv").write_text("barcode,in_tissue\n")
    return outs


def _run(argv, capsys):
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return rc, err


def test_force_never_replaces_the_input(proj, capsys):
    before = _tree(proj.parent)
    rc, err = _run(["run", str(proj), "--method", "expression", "--out", str(proj), "--force"], capsys)
    assert rc == 2 and len(err) == 1 and "input" in err[0]
    # a folder holding the input, even one marked as stmorph's, is not replaced either
    record_entries(proj.parent)
    rc, err = _run(["run", str(proj), "--method", "expression", "--out", str(proj.parent), "--force"], capsys)
    assert rc == 2 and len(err) == 1 and "input" in err[0]
    (proj.parent / MARKER).unlink()
    assert _tree(proj.parent) == before


def test_force_never_replaces_the_working_directory(proj, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    for out in (".", "", str(tmp_path)):
        rc, err = _run(["run", str(proj), "--method", "expression", "--out", out, "--force"], capsys)
        assert rc == 2 and len(err) == 1, out
    # even when the working directory is an output stmorph wrote
    (work / "notes.txt").unlink()
    record_entries(work)
    rc, err = _run(["run", str(proj), "--method", "expression", "--out", ".", "--force"], capsys)
    assert rc == 2 and "working directory" in err[0]
    rc, err = _run(["demo", "--out", ".", "--force"], capsys)
    assert rc == 2 and "working directory" in err[0]
    assert work.is_dir() and proj.is_dir()


def test_force_refuses_folders_stmorph_did_not_write(proj, tmp_path, capsys):
    mine = tmp_path / "results"
    mine.mkdir()
    (mine / "thesis.docx").write_text("years of work")
    rc, err = _run(["run", str(proj), "--method", "expression", "--out", str(mine), "--force"], capsys)
    assert rc == 2 and len(err) == 1 and "not written by stmorph" in err[0]
    assert (mine / "thesis.docx").read_text() == "years of work"
    # a run.json that is not stmorph's is no marker
    (mine / "run.json").write_text('{"epochs": 3}')
    with pytest.raises(OutputExistsError, match="not written by stmorph"):
        check_writable(mine, force=True)
    # a file named like the output
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(OutputExistsError, match="not a folder"):
        check_writable(f, force=True)


def test_force_keeps_files_added_to_a_stmorph_folder(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "result.h5ad").write_text("r")
    assert stmorph_entries(out) == {"result.h5ad", MARKER}
    (out / "my_notes.txt").write_text("keep me")
    with pytest.raises(OutputExistsError, match="my_notes.txt"):
        with atomic_dir(out, force=True):
            pass
    (out / "my_notes.txt").unlink()
    with atomic_dir(out, force=True) as tmp:
        (tmp / "domains.csv").write_text("d")
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "domains.csv"]


def test_force_replaces_an_older_stmorph_output(tmp_path):
    out = tmp_path / "old"
    out.mkdir()
    (out / "result.h5ad").write_text("r")
    (out / "run.json").write_text(json.dumps({"stmorph_version": "0.0.9", "outputs": ["result.h5ad", "run.json"]}))
    with atomic_dir(out, force=True) as tmp:
        (tmp / "run.json").write_text("{}")
    assert (out / "run.json").read_text() == "{}"


def test_benchmark_force_keeps_a_users_tables(tmp_path):
    from stmorph.ev import _benchmark as bm

    out = tmp_path / "bench"
    out.mkdir()
    (out / "benchmark.csv").write_text("my,own,table\n1,2,3\n")
    section = bm.Section(name="A1", layout="her2st", path=tmp_path)
    with pytest.raises(OutputExistsError, match="not written by stmorph"):
        bm.run_benchmark(sections=[section], methods=["x"], seeds=1, out=out, force=True,
                         loader=lambda s: None, runner=lambda *a, **k: None, log=lambda m: None)
    assert (out / "benchmark.csv").read_text() == "my,own,table\n1,2,3\n"


def test_report_force_replaces_only_stmorphs_report(tmp_path):
    from stmorph.report import write_report

    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "result.h5ad").write_text("r")
    (out / "report.html").write_text("<p>my own notes</p>")
    with pytest.raises(OutputExistsError, match="not written by stmorph"):
        write_report(out, force=True)
    assert (out / "report.html").read_text() == "<p>my own notes</p>"
