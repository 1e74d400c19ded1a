"""Atomic, non-clobbering outputs and h5ad-safe metadata."""

import anndata as ad
import numpy as np
import pytest

from stmorph._outputs import atomic_dir, atomic_write, h5ad_safe, write_domains_csv, write_h5ad
from stmorph.errors import OutputExistsError


def test_atomic_dir_refuses_to_clobber_and_keeps_old_on_failure(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("first")
    assert (out / "a.txt").read_text() == "first"
    with pytest.raises(OutputExistsError, match="force=True") as refused:
        with atomic_dir(out):
            pass
    assert "--force" in refused.value.cli_message()  # as the command line says it
    with pytest.raises(RuntimeError):
        with atomic_dir(out, force=True) as tmp:
            (tmp / "a.txt").write_text("second")
            raise RuntimeError("boom")
    assert (out / "a.txt").read_text() == "first"  # the old output survives a failed run
    with atomic_dir(out, force=True) as tmp:
        (tmp / "b.txt").write_text("second")
    assert not (out / "a.txt").exists() and (out / "b.txt").read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary leftovers


def test_atomic_write_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "x.csv"
    target.write_text("keep")

    def fail(p):
        open(p, "w").write("partial")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(target, fail)
    assert target.read_text() == "keep"
    assert [p.name for p in tmp_path.iterdir()] == ["x.csv"]


def test_h5ad_safe_and_write_h5ad_drop_fullres(tmp_path):
    safe = h5ad_safe({"a": None, "b": (1, 2), "c": ["x", "y"], "d": {"e": np.float32(1.5)}, "f": [1, "x"]})
    assert safe["a"] == "None" and list(safe["b"]) == [1, 2] and list(safe["c"]) == ["x", "y"]
    assert safe["d"]["e"] == 1.5 and safe["f"] == {"0": 1, "1": "x"}
    a = ad.AnnData(np.ones((3, 2), dtype=np.float32))
    a.obs["stmic"] = ["0", "1", "0"]
    a.uns["spatial"] = {"lib": {"images": {"fullres": np.zeros((50, 50, 3), np.uint8),
                                           "hires": np.zeros((5, 5, 3), np.uint8)},
                                "scalefactors": {"spot_diameter_fullres": 3.0},
                                "metadata": {"source_image_path": None}}}
    a.uns["stmic"] = {"params": {"n_clusters": None, "reps": ("A", "B")}}
    write_h5ad(a, tmp_path / "r.h5ad")
    b = ad.read_h5ad(tmp_path / "r.h5ad")
    assert set(b.uns["spatial"]["lib"]["images"]) == {"hires"}
    assert "fullres" in a.uns["spatial"]["lib"]["images"]  # the caller's object is untouched
    write_domains_csv(a, ["stmic"], tmp_path / "d.csv")
    assert (tmp_path / "d.csv").read_text().splitlines() == ["barcode,stmic", "0,0", "1,1", "2,0"]


def test_swap_into_place_keeps_the_old_folder_when_the_rename_fails(tmp_path, monkeypatch):
    import os

    from stmorph import _outputs

    out, new = tmp_path / "out", tmp_path / ".out.tmp"
    out.mkdir()
    (out / "a.txt").write_text("old")
    new.mkdir()
    (new / "b.txt").write_text("new")
    real = os.replace

    def failing(src, dst):
        if str(src) == str(new):
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(_outputs.os, "replace", failing)
    with pytest.raises(OSError, match="No space"):
        _outputs.swap_into_place(new, out)
    assert (out / "a.txt").read_text() == "old"  # moved aside and put back
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.tmp", "out"]
    monkeypatch.setattr(_outputs.os, "replace", real)
    _outputs.swap_into_place(new, out)
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"] and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
