"""A new method is one module: registered with its option, it runs from `stmorph run`, a cohort manifest and
`stmorph benchmark` with that option, and is refused its option where it is not chosen, with no other file edited.

The module is found through an entry point of the group ``stmorph.methods`` (a ``.dist-info`` folder on
``PYTHONPATH``, as an installed plugin package has), so every process sees it: the command line, the cohort's
dask workers, the benchmark.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from stmorph import datasets

PLUGIN = '''
import numpy as np
import pandas as pd

from stmorph.tl import Option, register_method
from stmorph.tl._options import between


def bands(adata, *, n_clusters=None, tilt=0.5, random_state=0):
    """Domains as bands across the section, along a direction tilted from x (0) to y (1)."""
    xy = np.asarray(adata.obsm["spatial"], dtype=float)
    t = (1 - tilt) * xy[:, 0] + tilt * xy[:, 1]
    k = 3 if n_clusters is None else int(n_clusters)
    labels = np.searchsorted(np.quantile(t, np.linspace(0, 1, k + 1)[1:-1]), t)
    adata.obs["bands"] = pd.Categorical(labels.astype(str), categories=[str(i) for i in range(k)])
    adata.uns["bands"] = {"params": {"tilt": float(tilt), "n_clusters": k, "random_state": random_state}}


register_method("bands", bands, options=("n_clusters", "tilt"), summary="bands across the section",
                declare=(Option("tilt", "direction of the bands, from x (0) to y (1)", between(0, 1)),))
'''


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    root = tmp_path_factory.mktemp("plugin")
    (root / "bands_method.py").write_text(PLUGIN)
    info = root / "bands_method-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: bands-method\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[stmorph.methods]\nbands = bands_method\n")
    data = root / "data"
    tissue = datasets.synthetic(200, n_genes=300, image=False, random_state=0)
    datasets.write_visium(tissue, data / "s1" / "outs", fullres=None)
    return root


def _stmorph(plugin, *argv, cwd=None):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "stmorph", *map(str, argv)], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_a_method_in_one_module_runs_everywhere_with_its_option(plugin, tmp_path):
    section = plugin / "data" / "s1" / "outs"
    # stmorph run: the option reaches the method and run.json says so
    r = _stmorph(plugin, "run", section, "--method", "bands", "--tilt", "0.25", "--n-clusters", "4",
                 "--out", tmp_path / "run", "--quiet", "--no-plot")
    assert r.returncode == 0, r.stderr
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["parameters"]["tilt"] == 0.25 and info["method_params"]["bands"]["tilt"] == 0.25
    assert "--tilt" in _stmorph(plugin, "run", "--help").stdout
    # refused where the chosen methods do not use it, and out of its declared range, before any work
    for argv, expected in ((["--method", "expression", "--tilt", "0.2"], "--tilt is not used"),
                           (["--method", "bands", "--tilt", "2"], "at most 1")):
        r = _stmorph(plugin, "run", section, *argv, "--out", tmp_path / "refused")
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and expected in r.stderr, r.stderr
        assert not (tmp_path / "refused").exists()
    # a cohort manifest: the option is a column, run on a dask worker process
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(f"section,input,method,tilt,n_clusters,no_plot\nA,{section},bands,0.75,3,true\n")
    r = _stmorph(plugin, "cohort", manifest, "--out", tmp_path / "cohort", "--workers", "1", "--quiet")
    assert r.returncode == 0, r.stderr
    done = json.loads((tmp_path / "cohort" / "A" / "run.json").read_text())["method_params"]["bands"]
    assert done == {"tilt": 0.75, "n_clusters": 3, "random_state": 0}
    # stmorph benchmark: scored on an annotated section with its option
    labels = datasets.synthetic(200, n_genes=300, image=False, random_state=0).obs["annotation"]
    labels.rename("label").to_frame().rename_axis("barcode").to_csv(section / "labels.tsv", sep="\t")
    r = _stmorph(plugin, "benchmark", "--data", plugin / "data", "--methods", "bands", "--tilt", "1",
                 "--seeds", "1", "--out", tmp_path / "bench")
    assert r.returncode == 0, r.stderr
    rows = pd.read_csv(tmp_path / "bench" / "benchmark.csv")
    assert list(rows["method"]) == ["bands"] and list(rows["status"]) == ["ok"]
