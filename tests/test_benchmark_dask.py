"""`stmorph benchmark --workers/--scheduler`: the sections as dask.distributed tasks, same rows as a serial run."""

from __future__ import annotations

import pandas as pd
import pytest

from stmorph.cli import main

pytest.importorskip("distributed")


@pytest.mark.slow
def test_benchmark_on_a_local_cluster_matches_serial(tmp_path, capsys):
    from test_benchmark import _her2st

    data = tmp_path / "d"
    _her2st(data, "B1", n_side=12, seed=0)
    _her2st(data, "C1", n_side=12, seed=1)
    common = ["benchmark", "--data", str(data), "--methods", "expression", "--seeds", "2"]
    assert main([*common, "--out", str(tmp_path / "serial")]) == 0
    assert main([*common, "--out", str(tmp_path / "dask"), "--workers", "2"]) == 0
    capsys.readouterr()
    serial = pd.read_csv(tmp_path / "serial" / "benchmark.csv")
    dask = pd.read_csv(tmp_path / "dask" / "benchmark.csv")
    cols = ["section", "method", "seed", "ARI", "NMI", "status", "n_spots", "n_clusters"]
    pd.testing.assert_frame_equal(serial[cols], dask[cols])
    assert set(dask["section"]) == {"B1", "C1"} and (dask["status"] == "ok").all()
    assert main([*common, "--out", str(tmp_path / "x"), "--workers", "0"]) == 2
    assert "--workers must be at least 1" in capsys.readouterr().err
