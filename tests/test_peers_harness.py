"""benchmarks/peers/run_peers.py: the CSV it appends to, the rows it skips and the table it prints."""

import importlib.util
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent.parent / "benchmarks" / "peers" / "run_peers.py"


@pytest.fixture(scope="module")
def peers():
    spec = importlib.util.spec_from_file_location("run_peers", HERE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(section, method, seed, ari, error=""):
    return {"section": section, "method": method, "seed": seed, "k": 3, "ari": ari, "nmi": ari, "seconds": 2.0,
            "machine": "m", "stmorph_git": "g", "date": "d", "error": error}


def test_table_is_mean_and_sd_over_seeds(peers, tmp_path):
    out = tmp_path / "r.csv"
    for seed, ari in enumerate([0.1, 0.2, 0.3]):
        peers._append(out, _row("her2st/C1", "banksy", seed, ari))
    peers._append(out, _row("her2st/C1", "stagate", 0, "", error="RuntimeError: boom"))
    table = peers.table(out)
    assert "| her2st/C1 (3) | banksy | 3 | 0.200 ± 0.100 | 0.200 ± 0.100 | 2 |" in table
    assert "stagate" not in table  # a failed run is not averaged in


def test_done_rows_are_skipped_failed_ones_rerun(peers, tmp_path):
    out = tmp_path / "r.csv"
    peers._append(out, _row("dlpfc/151673", "banksy", 0, 0.5))
    peers._append(out, _row("dlpfc/151673", "graphst", 0, "", error="MemoryError: x"))
    assert peers._done(out) == {("dlpfc/151673", "banksy", "0")}
    assert out.read_text().count("section,method") == 1  # one header however many appends


def test_heavy_runs_and_layout_only_methods_are_marked(peers):
    assert ("stagate", "visium") in peers.HEAVY and ("graphst", "visium") in peers.HEAVY
    assert peers.LAYOUTS["banksy_visium"] == {"visium"}
    assert set(peers.PEERS) == set(peers.METHODS)
