"""Tests of stmorph.report / `stmorph report`: a self-contained report.html parsed back."""

from __future__ import annotations

import base64
import json
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest
from test_ev import REGIONS, _write_gmt, no_network, toy_tissue  # noqa: F401 - fixture re-used

from stmorph import report
from stmorph.errors import InputError, OutputExistsError


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.links, self.scripts, self.ids = [], [], [], []
        self.tables, self._in_cell, self.cells, self.text = 0, False, [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        if tag in ("link", "script", "iframe"):
            self.scripts.append((tag, a))
        if tag == "a" and a.get("href"):
            self.links.append(a["href"])
        if "id" in a:
            self.ids.append(a["id"])
        if tag == "table":
            self.tables += 1
        if tag in ("td", "th"):
            self._in_cell = True
            self.cells.append("")

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self._in_cell = False

    def handle_data(self, data):
        self.text.append(data)
        if self._in_cell:
            self.cells[-1] += data


def _run_dir(tmp_path, *, annotation=True):
    adata = toy_tissue(n_side=16)
    rng = np.random.default_rng(0)
    codes = {"tumour": "1", "stroma": "2", "immune": "0"}
    adata.obs["stmic"] = pd.Categorical(adata.obs["annotation"].map(codes).astype(str))
    e = adata.obs["stmic"].astype(str).to_numpy().copy()
    e[rng.random(adata.n_obs) < 0.25] = "3"
    adata.obs["expression"] = pd.Categorical(e)
    if not annotation:
        del adata.obs["annotation"]
    del adata.uns["toy"]
    out = tmp_path / "out"
    out.mkdir()
    adata.write_h5ad(out / "result.h5ad")
    info = {"stmorph_version": "0.1.0", "command": "stmorph run toy --out out <&>", "input": "/data/toy",
            "methods": ["expression", "stmic"], "parameters": {"n_clusters": 3, "resolution": 1.7},
            "timings_s": {"read": 0.5}, "packages": {"numpy": np.__version__}, "encoder": {"name": "efficientnet_lite2"}}
    (out / "run.json").write_text(json.dumps(info))
    return out


def _parse(path):
    p = _Page()
    p.feed(path.read_text(encoding="utf-8"))
    return p


def test_report_self_contained_with_gsea(tmp_path, no_network):  # noqa: F811
    out = _run_dir(tmp_path)
    gmt = _write_gmt(tmp_path / "sets.gmt", _toy_planted())
    path = report.write_report(out, gene_sets=gmt, permutation_num=100)
    assert path == out / "report.html"
    page = _parse(path)
    # self-contained: every image is an embedded PNG, no external resource or script
    assert len(page.imgs) >= 4
    for src in page.imgs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert page.scripts == []
    assert all(h.startswith("#") for h in page.links)
    assert {"run", "domains", "agreement", "markers", "gsea"} <= set(page.ids)
    text = " ".join(page.text)
    assert "stmorph run toy --out out <&>" in text  # escaped in the file, intact once parsed
    assert "resolution" in text and "efficientnet_lite2" in text
    # ARI table: stmic is a relabelled copy of the truth
    cells = page.cells
    i = cells.index("stmic", cells.index("ARI"))
    assert cells[i + 1] == "1"
    # top markers of each domain are planted genes; planted tumour set is significant
    planted = _toy_planted().uns["toy"]["planted"]
    assert planted["tumour"][0] in text or any(g in cells for g in planted["tumour"])
    assert "HALLMARK_TUMOUR" in cells
    with pytest.raises(OutputExistsError):
        report.write_report(out)
    report.write_report(out, force=True)  # no gene sets: no GSEA section
    assert "gsea" not in _parse(out / "report.html").ids
    assert not [p for p in out.iterdir() if p.name.startswith(".report")]


def _toy_planted():
    return toy_tissue(n_side=16)


def test_report_without_annotation_and_errors(tmp_path):
    out = _run_dir(tmp_path, annotation=False)
    (out / "run.json").unlink()
    page = _parse(report.write_report(out, method="expression"))
    assert "agreement" not in page.ids and "domains" in page.ids
    assert "run.json not found" in " ".join(page.text)
    with pytest.raises(InputError, match="result.h5ad not found"):
        report.write_report(tmp_path)
    with pytest.raises(InputError, match="not a file"):
        report.write_report(out, gene_sets="MSigDB_Hallmark_2020", force=True)
    with pytest.raises(InputError, match="no domains"):
        report.write_report(out, method="senca", force=True)


def test_cli_report(tmp_path, capsys):
    from stmorph.cli import main

    out = _run_dir(tmp_path)
    assert main(["report", str(out), "--quiet"]) == 0
    assert (out / "report.html").is_file()
    assert main(["report", str(out), "--quiet"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "missing")]) == 2
