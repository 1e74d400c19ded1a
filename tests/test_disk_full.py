"""A full disk is one line naming the folder and the space needed; the previous output stays intact."""

import errno
import os
import shutil
import subprocess
import sys
import textwrap
from collections import namedtuple
from pathlib import Path

import pytest

from stmorph import _outputs, datasets
from stmorph.cli import main

SRC = str(Path(__file__).resolve().parent.parent / "src")


@pytest.fixture(scope="module")
def visium(tmp_path_factory):
    adata = datasets.synthetic(300, n_genes=300, random_state=0)
    return datasets.write_visium(adata, tmp_path_factory.mktemp("vis") / "outs", fullres=None)


def _run(argv, capsys):
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return rc, err


def test_too_little_free_space_is_refused_before_any_work(visium, tmp_path, monkeypatch, capsys):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    called = []
    import stmorph.tl

    monkeypatch.setattr(stmorph.tl, "run_methods", lambda *a, **k: called.append(1))
    rc, err = _run(["run", str(visium), "--method", "expression", "--out", str(tmp_path / "out"), "--quiet"], capsys)
    assert rc == 2 and len(err) == 1 and not called, err
    assert f"{tmp_path}: not enough free space" in err[0] and "need about" in err[0] and "1.0 kB free" in err[0]
    assert not (tmp_path / "out").exists()


def test_disk_full_while_writing_keeps_the_previous_output(visium, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    assert _run(["run", str(visium), "--method", "expression", "--out", str(out), "--quiet"], capsys)[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / ".out.tmp-x" / ".domains.csv.abc"))

    monkeypatch.setattr(_outputs, "write_domains_csv", full)
    rc, err = _run(["run", str(visium), "--method", "expression", "--out", str(out), "--quiet", "--force"], capsys)
    assert rc == 2 and len(err) == 1, err
    assert f"{tmp_path}: no space left on the device while writing domains.csv" in err[0]
    assert "need about" in err[0] and "nothing was replaced" in err[0]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_failed_h5ad_write_is_one_clean_oserror_and_a_clean_exit(tmp_path):
    """HDF5 whose writes fail (the disk fills at any point of result.h5ad) closes cleanly: one OSError naming the
    file, no "Exception ignored" tracebacks, no crash when the interpreter exits (before: SIGSEGV, exit 139)."""
    script = textwrap.dedent(f"""
        import errno, io, os, sys
        sys.path.insert(0, {SRC!r})
        import numpy as np, scipy.sparse as sp, anndata as ad
        from stmorph import _outputs

        class Full(io.FileIO):
            def write(self, b):
                if self.tell() + len(memoryview(b).cast("B")) > LIMIT:
                    raise OSError(errno.ENOSPC, "No space left on device")
                return super().write(b)

        _outputs._RecordingFile._open = staticmethod(lambda p: Full(p, "w+b"))
        X = sp.random(2000, 500, density=0.1, format="csr", dtype=np.float32, random_state=0)
        adata = ad.AnnData(X=X)
        adata.obsm["X_e"] = np.random.default_rng(0).random((2000, 64)).astype(np.float32)
        adata.uns["p"] = {{"a": 1, "b": "x"}}
        for LIMIT in (0, 100, 4096, 50_000, 400_000, 1_000_000):
            try:
                _outputs.write_h5ad(adata, {str(tmp_path)!r} + "/r.h5ad")
                print("written", LIMIT)
            except OSError as e:
                assert e.errno == errno.ENOSPC and ".r.h5ad." in e.filename, e
                print("full", LIMIT)
        LIMIT = 10**12
        _outputs.write_h5ad(adata, {str(tmp_path)!r} + "/r.h5ad")
        back = ad.read_h5ad({str(tmp_path)!r} + "/r.h5ad")
        assert (back.X != X).nnz == 0 and np.array_equal(back.obsm["X_e"], adata.obsm["X_e"])
        assert back.uns["p"]["b"] == "x"
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Exception ignored" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stdout.split().count("full") >= 5 and proc.stdout.strip().endswith("ok")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.h5ad"]


@pytest.fixture
def small_tmpfs(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")

    def mount(size):
        subprocess.run(["umount", str(mnt)], capture_output=True)
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
        return mnt

    yield mount
    subprocess.run(["umount", str(mnt)], capture_output=True)


def test_a_real_full_disk_is_one_line_not_a_crash(visium, tmp_path, small_tmpfs):
    """On a 3 MB tmpfs result.h5ad (about 3.5 MB here) cannot fit: before, ~70 h5py tracebacks and SIGSEGV."""
    env = {**os.environ, "STMORPH_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": SRC}
    cmd = [sys.executable, "-m", "stmorph", "run", str(visium), "--method", "expression", "--quiet", "--no-plot"]
    with_room = [c for c in cmd]
    probe = subprocess.run(with_room + ["--out", str(tmp_path / "probe")], env=env, capture_output=True, text=True)
    assert probe.returncode == 0, probe.stderr
    size = sum(p.stat().st_size for p in (tmp_path / "probe").iterdir())
    # room for the estimate (checked before any work) but not for the files: the failure comes while writing
    need = _outputs.estimate_run_bytes(__import__("anndata").read_h5ad(tmp_path / "probe" / "result.h5ad"))
    assert need < size
    mnt = small_tmpfs(f"{(need + size) // 2 // 1024}k")
    proc = subprocess.run(cmd + ["--out", str(mnt / "out")], env=env, capture_output=True, text=True, timeout=600)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert f"{mnt}: no space left on the device while writing result.h5ad" in lines[0] and "need about" in lines[0]
    assert list(mnt.iterdir()) == []
    # the previous output survives a --force run that cannot be written
    mnt = small_tmpfs(f"{(size * 3 // 2) // 1024}k")
    shutil.copytree(tmp_path / "probe", mnt / "out")
    before = {p.name: p.read_bytes() for p in (mnt / "out").iterdir()}
    proc = subprocess.run(cmd + ["--out", str(mnt / "out"), "--force"], env=env, capture_output=True, text=True)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and f"{mnt}: " in lines[0], proc.stderr[-3000:]
    assert {p.name: p.read_bytes() for p in (mnt / "out").iterdir()} == before
    assert [p.name for p in mnt.iterdir()] == ["out"]
