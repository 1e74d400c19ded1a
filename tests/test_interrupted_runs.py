"""Interrupted runs: SIGTERM cleans up like Ctrl-C, leftovers of killed runs are removed, stranded results are named."""

import json
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


def _staged(folder, kind="tmp", name="out"):
    """A staging folder as stmorph makes it: the name's owner in the marker inside."""
    owner = _outputs._OWNER.match(folder.name)
    (folder / "input").mkdir(parents=True)
    (folder / "result.h5ad").write_text("partial")
    info = {"written_by": "stmorph", "kind": kind, "for": name,
            "owner": f"{owner['host']}_{owner['pid']}_{owner['ticks']}"}
    (folder / _outputs.STAGING_MARKER).write_text(json.dumps(info))
    return folder


def test_stale_temporary_folders_of_killed_runs_are_removed(tmp_path):
    out = tmp_path / "out"
    host = _outputs._HOST
    dead = _staged(tmp_path / f".out.tmp-{host}_{_dead_pid()}_123-abcd")  # its process has exited
    alive = _staged(tmp_path / f".out.tmp-{_outputs._owner_tag()}zzzz")  # a run still in progress (this process)
    other_host = _staged(tmp_path / ".out.tmp-elsewhere_1_1-qqqq")
    other_out = _staged(tmp_path / f".other.tmp-{host}_{_dead_pid()}_1-abcd", name="other")  # another output's
    with pytest.warns(UserWarning, match="removed .*interrupted stmorph run"):
        with atomic_dir(out) as tmp:
            (tmp / "run.json").write_text("{}")
    left = {p.name for p in tmp_path.iterdir()}
    assert dead.name not in left
    assert {alive.name, other_host.name, other_out.name, "out"} <= left
    assert _outputs.STAGING_MARKER not in {p.name for p in out.iterdir()}


@pytest.mark.parametrize("name", [".out.tmp-mine", ".out.old-mine", ".out.tmp-k3j2h1",
                                  ".out.tmp-{host}_{pid}_123-abcd", ".out.old-{host}_{pid}_123-abcd"])
def test_folders_stmorph_did_not_stage_are_never_removed(tmp_path, name):
    """A user's own hidden folder, an older stmorph's without its owner, or one whose marker is missing or names
    another owner: kept, however old, with or without --force, whether or not the output exists."""
    folder = tmp_path / name.format(host=_outputs._HOST, pid=_dead_pid())
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    if "{" in name:  # the full pattern of a dead run, but the marker names another process
        info = {"written_by": "stmorph", "kind": name[5:8], "for": "out", "owner": f"{_outputs._HOST}_1_1"}
        (folder / _outputs.STAGING_MARKER).write_text(json.dumps(info))
    two_days = time.time() - 2 * 86400
    os.utime(folder, (two_days, two_days))
    out = tmp_path / "out"
    for force in (False, True):
        with atomic_dir(out, force=force) as tmp:
            (tmp / "run.json").write_text("{}")
        assert (folder / "notes.txt").read_text() == "mine"


def test_an_interrupted_replacement_keeps_the_previous_output(tmp_path):
    out = tmp_path / "out"
    old = _staged(tmp_path / f".out.old-{_outputs._HOST}_{_dead_pid()}_1-abcd", kind="old")
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
        folder = _staged(tmp_path / f".out.tmp-{tag}abcd")
        assert _outputs.clean_stale(tmp_path / "out") == []  # its process is running: left alone
        os.kill(child.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _outputs._proc_stat(child.pid)[:1] != ["Z"] and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.warns(UserWarning, match="removed"):
            assert _outputs.clean_stale(tmp_path / "out") == [folder]  # killed, not reaped yet: removed
        assert not folder.exists()
    finally:
        child.kill()
        child.wait()
