"""What can be checked before any work is: names that cannot be stored, names too long, unwritable folders."""

import os
import shutil
import subprocess

import numpy as np
import pytest

from stmorph import _outputs, datasets
from stmorph.cli import main


@pytest.fixture(scope="module")
def visium(tmp_path_factory):
    adata = datasets.synthetic(200, n_genes=300, random_state=0)
    return datasets.write_visium(adata, tmp_path_factory.mktemp("vis") / "outs", fullres="image.tif")


@pytest.fixture
def no_work(monkeypatch):
    """Fails the test if a method runs."""
    import stmorph.tl

    def run_methods(*args, **kwargs):
        raise AssertionError("the methods ran before the check")

    monkeypatch.setattr(stmorph.tl, "run_methods", run_methods)


def _run(argv, capsys):
    rc = main(argv)
    return rc, capsys.readouterr().err.strip().splitlines()


def test_input_names_that_are_not_utf8_are_refused_before_any_work(visium, tmp_path, capsys, no_work):
    """Before: UnicodeEncodeError while writing result.h5ad, after all the work."""
    folder = tmp_path / os.fsdecode(b"section\xff")
    shutil.copytree(visium, folder)
    image = tmp_path / os.fsdecode(b"h\xe9.tif")
    shutil.copy(visium / "image.tif", image)
    out = str(tmp_path / "out")
    for argv in (["run", str(folder)], ["run", str(visium), "--image", str(image)],
                 ["run", str(visium), "--labels", str(folder / "labels.tsv")]):
        rc, err = _run([*argv, "--method", "expression", "--out", out, "--quiet"], capsys)
        assert rc == 2 and len(err) == 1, err
        assert "not valid UTF-8" in err[0] and ("section\\xff" in err[0] or "h\\xe9.tif" in err[0]), err
        err[0].encode("utf-8")  # printable as it is
    rc, err = _run(["run", str(visium), "--method", "expression", "--out", str(tmp_path / os.fsdecode(b"o\xff")),
                    "--quiet"], capsys)
    assert rc == 2 and len(err) == 1 and "output name is not valid UTF-8" in err[0] and "o\\xff" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([folder.name, image.name])


def test_names_that_are_not_utf8_are_stored_escaped_by_the_python_api(tmp_path):
    import anndata as ad

    adata = ad.AnnData(np.ones((3, 2), np.float32))
    name = os.fsdecode(b"/data/s\xff.tif")
    adata.uns["spatial"] = {os.fsdecode(b"lib\xfe"): {"metadata": {"source_image_path": name}}}
    _outputs.write_h5ad(adata, tmp_path / "r.h5ad")
    back = ad.read_h5ad(tmp_path / "r.h5ad")
    assert back.uns["spatial"]["lib\\xfe"]["metadata"]["source_image_path"] == "/data/s\\xff.tif"


@pytest.mark.parametrize("length", [300, 240])
def test_an_output_name_too_long_is_refused_before_any_work(visium, tmp_path, capsys, no_work, length):
    """300 characters: OSError from mkdtemp; 240: fits the file system, but not its staging folder's name."""
    out = tmp_path / ("o" * length)
    rc, err = _run(["run", str(visium), "--method", "expression", "--out", str(out), "--quiet"], capsys)
    assert rc == 2 and len(err) == 1 and f"output name is {length} bytes long, too long" in err[0], err
    assert "choose a name of at most" in err[0]
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def read_only_copy(tmp_path):
    """``make(src)``: a read-only copy of folder ``src``: chmod for a user, a read-only tmpfs for root."""
    mounted = []

    def make(src):
        dst = tmp_path / "ro"
        if os.geteuid() != 0:
            shutil.copytree(src, dst)
            for p in [dst, *dst.iterdir()]:
                p.chmod(0o555 if p.is_dir() else 0o444)
            return dst
        dst.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(dst)],
                          capture_output=True).returncode != 0:
            pytest.skip("cannot make a read-only folder here (root, and mounting is not permitted)")
        mounted.append(dst)
        for p in src.iterdir():
            (shutil.copytree if p.is_dir() else shutil.copy2)(p, dst / p.name)
        if subprocess.run(["mount", "-o", "remount,ro", str(dst)], capture_output=True).returncode != 0:
            pytest.skip("cannot remount read-only")
        return dst

    yield make
    for m in mounted:
        subprocess.run(["umount", str(m)], capture_output=True)
    for p in tmp_path.rglob("*"):
        if not p.is_symlink():
            p.chmod(0o755 if p.is_dir() else 0o644)


def test_report_into_a_read_only_folder_fails_before_building_it(visium, tmp_path, capsys, read_only_copy,
                                                                   monkeypatch):
    out = tmp_path / "run"
    assert _run(["run", str(visium), "--method", "expression", "--out", str(out), "--quiet", "--no-plot"],
                capsys)[0] == 0
    ro = read_only_copy(out)
    import stmorph.report._html as html

    def build_report(*args, **kwargs):
        raise AssertionError("the report was built before the check")

    monkeypatch.setattr(html, "build_report", build_report)
    rc, err = _run(["report", str(ro), "--quiet"], capsys)
    assert rc == 2 and len(err) == 1 and f"{ro}: cannot write in this folder" in err[0], err
    assert not (ro / "report.html").exists()
