"""Readers: normalised counts are flagged, zero-count spots left out (and counted), no image stays no image,
and the CLI records what the readers warned about in run.json."""

from __future__ import annotations

import json
import warnings

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

import stmorph as st
from stmorph import datasets
from stmorph._outputs import write_h5ad
from stmorph.cli import main
from test_read_h5ad import scanpy_like


def _write(adata, path):
    adata = adata.copy()
    adata.write_h5ad(path)
    return path


def test_log_normalised_counts_are_flagged_with_the_way_out(tmp_path):
    a = scanpy_like(n=40, g=12)
    a.layers["counts"] = a.X.copy()
    a.X = np.log1p(a.X / a.X.sum(1, keepdims=True) * 1e4)
    with pytest.warns(UserWarning, match=r"non-integer.*log-normalised.*layers\['counts'\]"):
        st.read.h5ad(_write(a, tmp_path / "lognorm.h5ad"))


def test_raw_counts_give_no_warning(tmp_path):
    path = _write(scanpy_like(n=40, g=12), tmp_path / "raw.h5ad")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        st.read.h5ad(path)


def test_zero_count_spots_are_left_out_and_counted(tmp_path):
    a = scanpy_like(n=40, g=12)
    X = np.asarray(a.X)
    X[[3, 17]] = 0
    a.X = X
    path = _write(a, tmp_path / "zeros.h5ad")
    with pytest.warns(UserWarning, match=r"zeros.h5ad: left out 2 of 40 spot\(s\) with zero counts.*AAAC0003-1"):
        b = st.read.h5ad(path)
    assert b.n_obs == 38 and "AAAC0003-1" not in b.obs_names
    # an in-memory AnnData is subset in place
    c = scanpy_like(n=40, g=12)
    c.X = X.copy()
    with pytest.warns(UserWarning, match="left out 2"):
        out = st.read.h5ad(c)
    assert out is c and c.n_obs == 38


def test_zero_count_spot_in_a_space_ranger_folder(tmp_path):
    tissue = datasets.synthetic(120, n_genes=300, random_state=2)
    X = tissue.X.tolil()
    X[5, :] = 0
    tissue.X = sp.csr_matrix(X)
    outs = datasets.write_visium(tissue, tmp_path / "outs")
    with pytest.warns(UserWarning, match=r"filtered_feature_bc_matrix.h5: left out 1 of 120 spot"):
        a = st.read.visium(outs)
    assert a.n_obs == 119


def test_no_image_is_not_stored_as_the_string_none(tmp_path, monkeypatch):
    a = scanpy_like(n=40, g=12)
    lib = a.uns["spatial"]["V1_Sample"]
    lib["metadata"]["source_image_path"] = None
    write_h5ad(st.read.h5ad(a), tmp_path / "result.h5ad")
    meta = ad.read_h5ad(tmp_path / "result.h5ad").uns["spatial"]["V1_Sample"]["metadata"]
    assert "source_image_path" not in meta
    # a result of older stmorph, with "None" stored, does not pick up a file called None
    lib["metadata"]["source_image_path"] = "None"
    _write(a, tmp_path / "old.h5ad")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "None").write_bytes(b"not an image")
    b = st.read.h5ad(tmp_path / "old.h5ad")
    assert "source_image_path" not in b.uns["spatial"]["V1_Sample"]["metadata"]
    with pytest.raises(st.InputError, match="no full-resolution image"):
        st.read.h5ad(tmp_path / "old.h5ad", require_image=True)


def test_run_json_records_reader_warnings(tmp_path, capsys):
    a = scanpy_like(n=60, g=40, seed=3)
    X = np.asarray(a.X)
    X[7] = 0
    a.X = X
    path = _write(a, tmp_path / "in.h5ad")
    out = tmp_path / "res"
    rc = main(["run", str(path), "--method", "expression", "--n-clusters", "3", "--out", str(out), "--quiet",
               "--no-plot"])
    assert rc == 0 and "left out" not in capsys.readouterr().err  # --quiet hides it; run.json keeps it
    info = json.loads((out / "run.json").read_text())
    assert any("left out 1 of 60 spot(s) with zero counts" in w for w in info["warnings"])
    assert info["n_spots"] == 59
