"""Interrupted runs: SIGTERM cleans up like Ctrl-C, leftovers of killed runs are removed, stranded results are named."""

import os
import signal
import subprocess
import sys
import time

import pytest

from stmorph import _outputs
from stmorph._outputs import atomic_dir
from stmorph.errors import OutputExistsError


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temporary_folders_of_killed_runs_are_removed(tmp_path):
    out = tmp_path / "out"
    host = _outputs._HOST
    dead = tmp_path / f".out.tmp-{host}_{_dead_pid()}_123-abcd"  # its process has exited
    legacy = tmp_path / ".out.tmp-k3j2h1"  # older stmorph: no process id, older than this process
    alive = tmp_path / f".out.tmp-{_outputs._owner_tag()}zzzz"  # a run still in progress (this process)
    other_host = tmp_path / ".out.tmp-elsewhere_1_1-qqqq"
    other_out = tmp_path / f".other.tmp-{host}_{_dead_pid()}_1-abcd"  # another output's: not ours to judge
    for d in (dead, legacy, alive, other_host, other_out):
        (d / "input").mkdir(parents=True)
        (d / "result.h5ad").write_text("partial")
    old = _outputs._STARTED - 3600
    os.utime(legacy, (old, old))
    with atomic_dir(out) as tmp:
        (tmp / "run.json").write_text("{}")
    left = {p.name for p in tmp_path.iterdir()}
    assert dead.name not in left and legacy.name not in left
    assert {alive.name, other_host.name, other_out.name, "out"} <= left


def test_an_interrupted_replacement_keeps_the_previous_output(tmp_path):
    out = tmp_path / "out"
    old = tmp_path / f".out.old-{_outputs._HOST}_{_dead_pid()}_1-abcd"
    (old / "previous").mkdir(parents=True)
    (old / "previous" / "result.h5ad").write_text("the only copy")
    with pytest.warns(UserWarning, match="previous"):
        with atomic_dir(out) as tmp:
            (tmp / "a").write_text("new")
    assert (old / "previous" / "result.h5ad").read_text() == "the only copy"


def test_results_stranded_by_a_concurrent_run_are_kept_and_named(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(OutputExistsError) as info:
        with atomic_dir(out) as tmp:
            (tmp / "domains.csv").write_text("finished")
            out.mkdir()  # another process creates --out meanwhile
            (out / "theirs.txt").write_text("theirs")
    msg = str(info.value)
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("out.stmorph-")]
    assert len(kept) == 1 and str(kept[0]) in msg and "\n" not in msg
    assert (kept[0] / "domains.csv").read_text() == "finished"
    assert (out / "theirs.txt").read_text() == "theirs"
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_sigterm_removes_the_temporary_folder(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "STMORPH_CACHE_DIR": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}
    # a run of several seconds after its temporary folder appears (it is killed long before it ends): with 3,000
    # spots it ended within ~1 s, and on a loaded machine it once finished before the signal was sent
    proc = subprocess.Popen([sys.executable, "-m", "stmorph", "demo", "--out", str(out), "--n-spots", "8000",
                             "--method", "expression", "--quiet"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not any(".demo.tmp-" in p.name for p in tmp_path.iterdir()):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == "stmorph demo: terminated"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"] or sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_killed_run_not_yet_reaped_counts_as_over(tmp_path):
    """A SIGKILLed worker whose parent is gone stays a zombie where init does not reap: its folder is stale."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        tag = f"{_outputs._HOST}_{child.pid}_{_outputs._proc_start(child.pid) or 0}-"
        folder = tmp_path / f".out.tmp-{tag}abcd"
        folder.mkdir()
        assert _outputs.clean_stale(tmp_path / "out") == []  # its process is running: left alone
        os.kill(child.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _outputs._proc_stat(child.pid)[:1] != ["Z"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _outputs.clean_stale(tmp_path / "out") == [folder]  # killed, not reaped yet: removed
        assert not folder.exists()
    finally:
        child.kill()
        child.wait()
