"""`stmorph cohort`: a manifest of sections run as dask.distributed tasks, failures kept apart, resume."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from stmorph import datasets
from stmorph.cli import main

pytest.importorskip("distributed")

RUN_OUTPUTS = {"result.h5ad", "domains.csv", "run.json", ".stmorph"}


@pytest.fixture(scope="module")
def cohort_inputs(tmp_path_factory):
    """Three small synthetic Visium sections (no image: expression only) and a manifest naming a fourth,
    missing one; relative paths, as a manifest beside its data would have them."""
    root = tmp_path_factory.mktemp("cohort")
    for i, name in enumerate(("s1", "s2", "s3")):
        tissue = datasets.synthetic(220, n_genes=300, image=False, random_state=i)
        datasets.write_visium(tissue, root / name / "outs", fullres=None)
    (root / "nowhere" / "outs").mkdir(parents=True)  # a section folder without its files: fails when run
    return root


def _manifest(root: Path, rows: list[str], name="manifest.csv") -> Path:
    path = root / name
    path.write_text("section,input,method,n_clusters,seed,no_plot\n" + "\n".join(rows) + "\n")
    return path


ROWS = ["A,s1/outs,expression,4,0,true", "B,s2/outs,expression,4,1,true", "broken,nowhere/outs,expression,4,0,true"]


def _table(out: Path) -> pd.DataFrame:
    table = pd.read_csv(out / "cohort.csv", index_col="section")
    return table.assign(error=table["error"].fillna("").astype(str))


def test_manifest_is_validated_up_front(tmp_path, capsys):
    out = tmp_path / "o"
    cases = {
        "section,input,colour\nA,x,red\n": "row 1, column colour: unknown column",
        "section,input\nA,x\nA,y\n": "row 3, column section: duplicate section 'A'",
        "section,input,n_clusters\nA,x,four\n": "row 2, column n_clusters: argument --n-clusters: expected a whole number",
        "section,input,method\nA,x,expression+pixels\n": "row 2, column method",
        "section,input,out\nA,x,y\n": "row 1, column out: not allowed",
        "section,image\nA,x\n": "no 'input' column",
        "section,input\n../up,x\n": "row 2, column section",
        "section,input,refine\nA,x,maybe\n": "row 2, column refine: expected true or false",
    }
    for i, (text, expected) in enumerate(cases.items()):
        m = tmp_path / f"m{i}.csv"
        m.write_text(text)
        assert main(["cohort", str(m), "--out", str(out)]) == 2, text
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(m) in err[0] and expected in err[0], (text, err)
    assert not out.exists()  # nothing is made before the manifest is valid

    from stmorph.cohort import Section, needs_gpu, read_manifest

    m = tmp_path / "ok.csv"
    m.write_text("section,input,pixel-scale,labels,method,refine\nA,data/x.tsv,0.5,lab.tsv,expression+stmorph,no\n")
    for missing, column in (("data/x.tsv", "input"), ("lab.tsv", "labels")):  # every path cell must exist
        assert main(["cohort", str(m), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{m}: row 2, column {column}: no such file or folder: {missing}" in err[0], err
        (tmp_path / missing).parent.mkdir(exist_ok=True)
        (tmp_path / missing).write_text("")
    assert not out.exists()
    (s,) = read_manifest(m)
    assert s.name == "A" and s.argv == [str(tmp_path / "data/x.tsv"), "--pixel-scale", "0.5",
                                        "--labels", str(tmp_path / "lab.tsv"), "--method", "expression",
                                        "--method", "stmorph", "--no-refine"]
    # which sections ask for --gpu-resource: methods reading image patches, on a device other than cpu
    assert needs_gpu(s)
    assert not needs_gpu(Section("B", [s.argv[0], "--method", "stmorph", "--device", "cpu"], 3))
    assert not needs_gpu(Section("C", [s.argv[0], "--method", "expression"], 4))


@pytest.mark.slow
def test_cohort_on_a_local_cluster_keeps_failures_apart_and_resumes(cohort_inputs, tmp_path, capsys):
    manifest = _manifest(cohort_inputs, ROWS)
    out = tmp_path / "cohort"
    assert main(["cohort", str(manifest), "--out", str(out), "--workers", "2"]) == 1  # a section failed
    table = _table(out)
    assert list(table.index) == ["A", "B", "broken"]
    assert list(table["status"]) == ["ok", "ok", "failed"]
    assert "not found" in table.loc["broken", "error"] and "nowhere" in table.loc["broken", "error"]
    assert (table.loc[["A", "B"], "n_domains_expression"] == 4).all()
    assert (table.loc[["A", "B"], "ari_expression"].astype(float) > 0.3).all()  # synthetic sections are labelled
    assert not (out / "broken").exists()
    for name, seed in (("A", "0"), ("B", "1")):
        assert {p.name for p in (out / name).iterdir()} == RUN_OUTPUTS  # what `stmorph run --no-plot` writes
        info = json.loads((out / name / "run.json").read_text())
        assert info["parameters"]["random_state"] == int(seed) and info["n_domains"] == {"expression": 4}
    report = (out / "cohort.md").read_text()
    assert "LocalCluster of 2 processes" in report and "`broken`:" in report
    progress = capsys.readouterr()
    assert "2 ok, 0 skipped, 1 failed" in progress.out and "broken: failed" in progress.err

    # the same section through `stmorph run` gives the same domains
    single = tmp_path / "single"
    assert main(["run", str(cohort_inputs / "s2" / "outs"), "--method", "expression", "--n-clusters", "4",
                 "--seed", "1", "--no-plot", "--quiet", "--out", str(single)]) == 0
    assert (single / "domains.csv").read_bytes() == (out / "B" / "domains.csv").read_bytes()

    # re-running skips complete sections; the broken one is tried again
    before = (out / "A" / "domains.csv").stat().st_mtime_ns
    assert main(["cohort", str(manifest), "--out", str(out), "--workers", "2", "--quiet"]) == 1
    assert list(_table(out)["status"]) == ["skipped", "skipped", "failed"]
    assert (out / "A" / "domains.csv").stat().st_mtime_ns == before
    assert _table(out).loc["A", "ari_expression"] == table.loc["A", "ari_expression"]  # from run.json

    # a lost section folder is run again, alone; the manifest's fixed row now succeeds
    shutil.rmtree(out / "A")
    fixed = _manifest(cohort_inputs, [*ROWS[:2], "broken,s3/outs,expression,4,0,true"], name="fixed.csv")
    assert main(["cohort", str(fixed), "--out", str(out), "--workers", "2", "--quiet"]) == 0
    assert list(_table(out)["status"]) == ["ok", "skipped", "ok"]
    assert {p.name for p in (out / "A").iterdir()} == RUN_OUTPUTS

    # a section folder made with other options is neither skipped nor replaced without --force
    other = _manifest(cohort_inputs, ["A,s1/outs,expression,5,0,true"], name="other.csv")
    assert main(["cohort", str(other), "--out", str(out), "--workers", "1", "--quiet"]) == 1
    assert "other options" in _table(out).loc["A", "error"]
    assert json.loads((out / "A" / "run.json").read_text())["n_domains"] == {"expression": 4}
    assert main(["cohort", str(other), "--out", str(out), "--workers", "1", "--quiet", "--force"]) == 0
    assert json.loads((out / "A" / "run.json").read_text())["n_domains"] == {"expression": 5}


def test_cohort_refuses_a_folder_it_did_not_make(cohort_inputs, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    assert main(["cohort", str(_manifest(cohort_inputs, ROWS[:1])), "--out", str(out)]) == 2
    assert "not made by stmorph cohort" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


@pytest.mark.slow
def test_cohort_refuses_an_out_that_links_to_an_input(cohort_inputs, tmp_path, capsys):
    """--out given as a symbolic link to (or into) an input folder is the input folder: refused, nothing written."""
    from stmorph._outputs import record_entries

    data = tmp_path / "data"
    shutil.copytree(cohort_inputs / "s1", data / "s1")
    record_entries(data / "s1")  # an input folder that an earlier stmorph run made
    before = {p.relative_to(data): p.stat().st_mtime_ns for p in data.rglob("*")}
    manifest = _manifest(tmp_path, [f"A,{data / 's1' / 'outs'},expression,4,0,true"])
    for target in (data / "s1" / "outs", data / "s1"):
        link = tmp_path / f"link-{target.name}"
        link.symlink_to(target)
        assert main(["cohort", str(manifest), "--out", str(link)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "overlaps the input" in err[0], err
    assert {p.relative_to(data): p.stat().st_mtime_ns for p in data.rglob("*")} == before


def test_cohort_resumes_after_a_killed_run(cohort_inputs, tmp_path):
    manifest = _manifest(cohort_inputs, ["A,s1/outs,expression,4,0,true", "B,s2/outs,expression,4,1,true",
                                         "C,s3/outs,expression,4,2,true"], name="kill.csv")
    out = tmp_path / "cohort"
    cmd = [sys.executable, "-m", "stmorph", "cohort", str(manifest), "--out", str(out), "--workers", "1", "--quiet"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not ((out / "cohort.csv").exists() and "ok" in (out / "cohort.csv").read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, "the first section never finished"
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the command and its worker processes, mid-run
        proc.wait()
    done = set(_table(out).index[_table(out)["status"] == "ok"])
    assert 1 <= len(done) < 3
    assert main(["cohort", str(manifest), "--out", str(out), "--workers", "2", "--quiet"]) == 0
    table = _table(out)
    assert all(table.loc[s, "status"] == ("skipped" if s in done else "ok") for s in "ABC")
    assert sorted(p.name for p in out.iterdir()) == [".stmorph", "A", "B", "C", "cohort.csv", "cohort.md"]


def _dask_command(role: str) -> list[str] | None:
    """``dask-scheduler``/``dask-worker``, or ``dask scheduler``/``dask worker`` of newer distributed."""
    bindir = Path(sys.executable).parent
    path = os.pathsep.join([str(bindir), os.environ.get("PATH", "")])
    exe = shutil.which(f"dask-{role}", path=path)
    if exe:
        return [exe]
    exe = shutil.which("dask", path=path)
    return [exe, role] if exe else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_cohort_on_a_separately_started_scheduler(cohort_inputs, tmp_path, monkeypatch):
    scheduler_cmd, worker_cmd = _dask_command("scheduler"), _dask_command("worker")
    if scheduler_cmd is None or worker_cmd is None:
        pytest.skip("dask-scheduler / dask-worker executables not found")
    import distributed

    address = f"tcp://127.0.0.1:{_free_port()}"
    procs = [subprocess.Popen([*scheduler_cmd, "--host", "127.0.0.1", "--port", address.rsplit(":", 1)[1],
                               "--no-dashboard"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        for i in range(2):  # the first one stands for a GPU worker
            gpu = ["--resources", "GPU=1"] if i == 0 else []
            procs.append(subprocess.Popen([*worker_cmd, address, "--nthreads", "1", "--no-dashboard", *gpu,
                                           "--local-directory", str(tmp_path / f"w{i}")],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        with distributed.Client(address, timeout="30s") as client:
            client.wait_for_workers(2, timeout=60)
            workers = client.scheduler_info()["workers"]
            (gpu_worker,) = [a for a, w in workers.items() if w.get("resources", {}).get("GPU")]

        def no_local_cluster(*a, **k):
            raise AssertionError("a LocalCluster was started although --scheduler was given")

        monkeypatch.setattr(distributed, "LocalCluster", no_local_cluster)
        out = tmp_path / "cohort"
        # G's method reads image patches (when an image is given) on the default device: it asks for the GPU
        manifest = _manifest(cohort_inputs, [*ROWS, "G,s3/outs,stmorph,4,0,true"], name="gpu.csv")
        assert main(["cohort", str(manifest), "--out", str(out), "--scheduler", address, "--gpu-resource", "GPU",
                     "--quiet"]) == 1
        table = _table(out)
        assert list(table["status"]) == ["ok", "ok", "failed", "ok"]
        assert table.loc["G", "worker"] == gpu_worker and set(table["worker"]) <= set(workers)
        assert f"dask scheduler {address}" in (out / "cohort.md").read_text()
        assert {p.name for p in (out / "A").iterdir()} == RUN_OUTPUTS
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in reversed(procs):
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
