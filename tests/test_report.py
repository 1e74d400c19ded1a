"""Tests of stmorph.report / `stmorph report`: a self-contained report.html parsed back.

Results come first, one card per domain, a zoomable view whose data is embedded, nothing fetched from
the network. An optional check renders the page in headless Chromium (skipped when it is absent).
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest
from test_ev import REGIONS, _write_gmt, no_network, toy_tissue  # noqa: F401 - fixture re-used

from stmorph import report
from stmorph.errors import InputError, OutputExistsError

MAGIC = {"png": b"\x89PNG\r\n\x1a\n", "jpeg": b"\xff\xd8\xff"}


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.links, self.scripts, self.ids, self.sections = [], [], [], [], []
        self.attrs_with_urls, self.details = [], []
        self._in_cell, self.cells, self.text, self._script_id, self.json = False, [], [], None, {}
        self.cards, self._card = [], None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for k, v in attrs:
            if k in ("src", "href", "action", "poster", "srcset") and v is not None:
                self.attrs_with_urls.append(v)
        if tag == "img":
            self.imgs.append(a.get("src", ""))
            if self._card is not None:
                self._card["imgs"].append(a.get("src", ""))
        if tag in ("link", "script", "iframe", "object", "embed"):
            self.scripts.append((tag, a))
        if tag == "script":
            self._script_id = a.get("id", "")
        if tag == "a" and a.get("href"):
            self.links.append(a["href"])
        if "id" in a:
            self.ids.append(a["id"])
        if tag == "section":
            self.sections.append(a.get("id"))
        if tag == "details":
            self.details.append((self.sections[-1] if self.sections else None, "open" in a))
        if tag == "article" and "card" in a.get("class", ""):
            self._card = {"id": a.get("id"), "imgs": [], "text": []}
            self.cards.append(self._card)
        if tag in ("td", "th"):
            self._in_cell = True
            self.cells.append("")

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self._in_cell = False
        if tag == "script":
            self._script_id = None
        if tag == "article":
            self._card = None

    def handle_data(self, data):
        if self._script_id:
            self.json[self._script_id] = self.json.get(self._script_id, "") + data
            return
        if self._script_id is not None:  # inline viewer code
            return
        self.text.append(data)
        if self._card is not None:
            self._card["text"].append(data)
        if self._in_cell:
            self.cells[-1] += data


def _toy(*, fullres: bool = False, annotation: bool = True):
    adata = toy_tissue(n_side=16)
    rng = np.random.default_rng(0)
    codes = {"tumour": "1", "stroma": "2", "immune": "0"}
    adata.obs["stmic"] = pd.Categorical(adata.obs["annotation"].map(codes).astype(str))
    e = adata.obs["stmic"].astype(str).to_numpy().copy()
    e[rng.random(adata.n_obs) < 0.25] = "3"
    adata.obs["expression"] = pd.Categorical(e)
    # the representation stmic clustered: one cluster per band, a spread inside each
    centre = adata.obs["stmic"].astype(int).to_numpy()[:, None] * 10.0
    adata.obsm["X_stmic"] = centre + rng.normal(size=(adata.n_obs, 3))
    adata.uns["stmic"] = {"params": {"use_rep": "X_stmic"}}
    lib = adata.uns["spatial"]["toy"]
    if fullres:
        lib["images"]["fullres"] = np.repeat(np.repeat(lib["images"]["hires"], 2, axis=0), 2, axis=1)
        lib["metadata"]["microns_per_pixel"] = 55.0 / 25.0
    if not annotation:
        del adata.obs["annotation"]
    del adata.uns["toy"]
    return adata


def _run_dir(tmp_path, *, annotation=True, fullres=False, adata=None, methods=("expression", "stmic")):
    adata = _toy(fullres=fullres, annotation=annotation) if adata is None else adata
    out = tmp_path / "out"
    out.mkdir()
    adata.write_h5ad(out / "result.h5ad")
    info = {"stmorph_version": "0.1.0", "command": "stmorph run toy --out out <&>", "input": "/data/toy",
            "methods": list(methods), "parameters": {"n_clusters": 3, "resolution": 1.7},
            "timings_s": {"read": 0.5}, "packages": {"numpy": np.__version__},
            "encoder": {"name": "efficientnet_lite2"}}
    (out / "run.json").write_text(json.dumps(info))
    return out


def _parse(path):
    p = _Page()
    p.feed(path.read_text(encoding="utf-8"))
    return p


def _check_data_uri(src: str, kinds=("png", "jpeg")) -> None:
    m = re.fullmatch(r"data:image/(png|jpeg);base64,([A-Za-z0-9+/=]+)", src)
    assert m and m.group(1) in kinds, src[:60]
    assert base64.b64decode(m.group(2))[:len(MAGIC[m.group(1)])] == MAGIC[m.group(1)]


def _assert_offline(path, page):
    """No external resource: every URL attribute is a fragment or a data URI, no http(s) anywhere."""
    raw = path.read_text(encoding="utf-8")
    assert all(u.startswith(("#", "data:")) for u in page.attrs_with_urls)
    assert "http:" not in raw and "https:" not in raw and "@import" not in raw and "url(" not in raw
    assert [t for t, a in page.scripts if t != "script" or "src" in a] == []  # inline scripts only


def test_report_results_first_cards_viewer_offline(tmp_path, no_network):  # noqa: F811
    out = _run_dir(tmp_path, fullres=True)
    gmt = _write_gmt(tmp_path / "sets.gmt", toy_tissue(n_side=16))
    path = report.write_report(out, gene_sets=gmt, permutation_num=100)
    assert path == out / "report.html"
    page = _parse(path)
    _assert_offline(path, page)
    # results first, run details last and collapsed
    assert page.sections == ["summary", "domains", "viewer", "cards", "markers", "gsea", "run"]
    assert ("run", False) in page.details
    assert "agreement" in page.ids
    for src in page.imgs:
        _check_data_uri(src)
    text = " ".join(page.text)
    assert "stmorph run toy --out out <&>" in text  # escaped in the file, intact once parsed
    assert "resolution" in text and "efficientnet_lite2" in text
    cells = page.cells
    i = cells.index("stmic", cells.index("ARI"))
    assert cells[i + 1] == "1"  # stmic is a relabelled copy of the truth
    assert text.index("Agreement with the annotation") < text.index("Parameters")
    # a card per stmic domain: named by its top markers, a map and an H&E strip, planted genes, GSEA term
    planted = toy_tissue(n_side=16).uns["toy"]["planted"]
    region_of = {"0": "immune", "1": "tumour", "2": "stroma"}
    assert [c["id"] for c in page.cards] == ["domain-0", "domain-1", "domain-2"]
    for card in page.cards:
        lab = card["id"].split("-", 1)[1]
        ctext = " ".join(card["text"])
        assert len(card["imgs"]) == 2
        _check_data_uri(card["imgs"][0], ("png",))
        _check_data_uri(card["imgs"][1], ("jpeg",))
        shown = re.findall(r"G\d{3}", ctext)
        assert shown and set(shown[:3]) <= set(planted[region_of[lab]])
        assert "31.2%" in ctext or "37.5%" in ctext
        assert f"100% {region_of[lab]}" in ctext
    tumour_card = " ".join(page.cards[1]["text"])
    assert "HALLMARK_TUMOUR" in tumour_card
    # the viewer's data: JPEG tiles, every method as a layer, stmic by default, spot ids for hover
    data = json.loads(page.json["stmorph-viewer-data"])
    assert data["default"] == "stmic" and data["image"] == "full-resolution"
    assert [lay["key"] for lay in data["layers"]] == ["annotation", "stmic", "expression"]
    assert data["spots"]["id"][:2] == ["0x0", "0x1"] and len(data["layers"][1]["codes"]) == 256
    tiles = [t for lv in data["levels"] for t in lv["tiles"] if t]
    assert tiles
    for t in tiles:
        _check_data_uri(t, ("jpeg",))
    assert data["shape"] == "circle" and data["levels"][-1]["cols"] == data["levels"][-1]["rows"] == 1
    with pytest.raises(OutputExistsError):
        report.write_report(out)
    report.write_report(out, force=True)  # no gene sets: no GSEA section
    assert "gsea" not in _parse(out / "report.html").sections
    assert not [p for p in out.iterdir() if p.name.startswith(".report")]


def test_report_chosen_method_is_not_hard_coded(tmp_path):
    adata = _toy()
    adata.obs["stmorph"] = adata.obs["expression"].copy()
    adata.obsm["X_stmorph"] = adata.obsm["X_stmic"].copy()
    adata.obs["newmethod"] = adata.obs["stmic"].copy()
    adata.uns["newmethod"] = {"params": {"use_rep": "X_stmic"}}
    assert report.chosen_method(adata, ["stmic", "stmorph"]) == "stmorph"
    assert report.chosen_method(adata, ["expression", "stmic"]) == "stmic"
    assert report.chosen_method(adata, ["newmethod"]) == "newmethod"
    adata.uns["stmorph"] = {"primary": "newmethod", "steps_s": {"read": 1.0}}
    assert report.chosen_method(adata, ["stmic", "stmorph", "newmethod"]) == "newmethod"
    adata.uns["stmorph_run"] = {"primary": "stmic"}  # the run's bookkeeping, beside the method's own uns
    assert report.chosen_method(adata, ["stmic", "stmorph", "newmethod"]) == "stmic"
    del adata.uns["stmorph_run"]
    # without run.json, methods come from obs: known names and columns a clustering tool wrote
    assert report.report_methods(adata) == ["stmic", "expression", "stmorph", "newmethod"]
    assert report.report_methods(adata, {"methods": ["newmethod", "missing"]}) == ["newmethod"]
    out = _run_dir(tmp_path, adata=adata, methods=("expression", "stmic", "stmorph", "newmethod"))
    page = _parse(report.write_report(out, viewer=False))
    assert "viewer" not in page.sections
    text = " ".join(page.text)
    assert "The newmethod domains, one by one" in text
    assert page.cells[page.cells.index("ARI") + 3] == "newmethod"  # chosen method first in the table


def test_representative_spots_nearest_the_centre():
    from stmorph.report import _cards

    adata = _toy()
    rows = _cards.representative_spots(adata, "stmic", "1", 4, rep="X_stmic")
    X = adata.obsm["X_stmic"]
    member = np.flatnonzero(adata.obs["stmic"].astype(str) == "1")
    d = ((X[member] - X[member].mean(axis=0)) ** 2).sum(axis=1)
    assert rows == member[np.argsort(d)[:4]].tolist()
    assert set(adata.obs["stmic"].iloc[rows].astype(str)) == {"1"}
    assert _cards.embedding_key(adata, "stmic") == "X_stmic"
    assert _cards.embedding_key(adata, "expression") is None
    spatial = _cards.representative_spots(adata, "stmic", "0", 1, rep=None)
    xy = adata.obsm["spatial"][member := np.flatnonzero(adata.obs["stmic"].astype(str) == "0")]
    assert spatial == [member[np.argmin(((xy - xy.mean(axis=0)) ** 2).sum(axis=1))]]


def test_viewer_bounded_resolution_and_tiles_near_spots():
    from stmorph.report import _viewer

    adata = _toy(fullres=True)
    lay = [{"key": "stmic", "labels": ["0", "1", "2"], "names": ["a", "b", "c"], "colors": ["#000000"] * 3}]
    full = _viewer.viewer_data(adata, lay, default="stmic")
    assert full["um_per_px"] == pytest.approx(2.2)  # the image's own resolution (coarser than 1 um/px)
    small = _viewer.viewer_data(adata, lay, default="stmic", max_pixels=50_000)
    assert small["width"] * small["height"] <= 50_000 * 1.02
    assert small["um_per_px"] > full["um_per_px"]
    coarse = _viewer.viewer_data(adata, lay, default="stmic", min_um_per_px=4.4)
    assert coarse["um_per_px"] == pytest.approx(4.4, rel=0.02)
    # spots in two opposite corners: tiles far from every spot are left out
    rows, cols = adata.obs["array_row"].to_numpy(), adata.obs["array_col"].to_numpy()
    sub = adata[((rows < 3) & (cols < 3)) | ((rows > 12) & (cols > 12))].copy()
    sub.obsm["spatial"] = sub.obsm["spatial"] * 6.0
    sub.uns["spatial"]["toy"]["images"]["fullres"] = np.full((4000, 4000, 3), 200, np.uint8)
    sub.uns["spatial"]["toy"]["metadata"]["microns_per_pixel"] = 0.5
    sub.uns["spatial"]["toy"]["scalefactors"]["spot_diameter_fullres"] = 110.0
    data = _viewer.viewer_data(sub, lay, default="stmic")
    finest = data["levels"][0]
    assert finest["cols"] * finest["rows"] > 1 and "" in finest["tiles"]
    assert all(lv["tiles"][0] for lv in data["levels"])  # the corner with the first spot is kept
    # no image at all: spots only, no tiles
    del adata.uns["spatial"]["toy"]["images"]["fullres"], adata.uns["spatial"]["toy"]["images"]["hires"]
    assert _viewer.viewer_data(adata, lay, default="stmic")["levels"] == []


def test_report_without_annotation_and_errors(tmp_path):
    out = _run_dir(tmp_path, annotation=False)
    (out / "run.json").unlink()
    page = _parse(report.write_report(out, method="expression"))
    assert "agreement" not in page.ids and "domains" in page.sections
    assert [c["id"] for c in page.cards] == ["domain-0", "domain-1", "domain-2", "domain-3"]
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


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


PROBE = """<script>
window.addEventListener("load", function () {
  setTimeout(function () {
    var top = function (id) { return document.getElementById(id).getBoundingClientRect().top; };
    var cv = document.querySelector("#viewer canvas"), c = cv.getContext("2d");
    var px = c.getImageData(0, 0, cv.width, cv.height).data, painted = 0;
    for (var i = 0; i < px.length; i += 4) { if (px[i + 3] > 0) { painted++; } }
    var v = window.stmorphViewer, hit = v.nearest(v.data.spots.x[5], v.data.spots.y[5]);
    document.title = JSON.stringify({agreement: top("agreement"), run: top("run"), height: window.innerHeight,
      painted: painted / (px.length / 4), hover: hit});
  }, 500);
});
</script>"""


@pytest.mark.skipif(_chromium() is None, reason="headless Chromium (Debian package `chromium`) not installed")
def test_report_renders_in_headless_chromium(tmp_path):
    """At desktop width the agreement table is on the first screen, the run details far below it, and
    the viewer has painted its canvas."""
    out = _run_dir(tmp_path, fullres=True)
    path = report.write_report(out)
    probe = tmp_path / "probe.html"
    probe.write_text(path.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
    profile = tmp_path / "profile"
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", "--window-size=1440,900", "--virtual-time-budget=10000", "--dump-dom",
           probe.as_uri()]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    m = re.search(r"<title>(\{.*?\})</title>", dom)
    assert m, dom[:500]
    res = json.loads(m.group(1).replace("&quot;", '"'))
    assert 0 <= res["agreement"] < res["height"] - 150
    assert res["run"] > res["agreement"] + 2 * res["height"]
    # the square section fills about a third of the wide canvas, its 25 px spots at a 40 px pitch a third of it
    assert res["painted"] > 0.08
    assert res["hover"] == 5


@pytest.mark.slow
def test_cli_run_with_report(tmp_path, capsys):
    """`stmorph run --report`: the report is built in the same command, from the in-memory result."""
    from stmorph.cli import main

    adata = _toy(fullres=True)
    del adata.obs["stmic"], adata.obs["expression"], adata.obsm["X_stmic"], adata.uns["stmic"]
    src = tmp_path / "toy.h5ad"
    adata.write_h5ad(src)
    gmt = _write_gmt(tmp_path / "sets.gmt", toy_tissue(n_side=16))
    assert main(["run", str(src), "-m", "expression", "--gene-sets", str(gmt), "--out", str(tmp_path / "x"),
                 "--quiet"]) == 2
    assert "add --report" in capsys.readouterr().err and not (tmp_path / "x").exists()
    out = tmp_path / "out"
    assert main(["run", str(src), "-m", "expression", "--report", "--out", str(out)]) == 0
    assert capsys.readouterr().out.rstrip("\n").splitlines()[-1] == f"report: {out / 'report.html'}"  # path last
    info = json.loads((out / "run.json").read_text())
    assert "report.html" in info["outputs"] and info["timings_s"]["report"] > 0
    page = _parse(out / "report.html")
    _assert_offline(out / "report.html", page)
    assert page.sections == ["summary", "domains", "confidence", "viewer", "cards", "markers", "run"]
    assert len(page.cards) == 3  # one per expression domain
    data = json.loads(page.json["stmorph-viewer-data"])
    assert data["image"] == "full-resolution" and data["default"] == "expression"
    library = next(iter(adata.uns["spatial"]))  # the title names the section, not the file it came in
    assert f"<h1>Spatial domains: {library}</h1>" in (out / "report.html").read_text()


def test_no_patch_strip_from_a_coarse_image(tmp_path):
    """Without a full-resolution image the cards say why they show no H&E strip (hires too coarse here)."""
    out = _run_dir(tmp_path)
    page = _parse(report.write_report(out, viewer=False))
    assert all(len(c["imgs"]) == 1 for c in page.cards)  # the map only
    assert "No H&E strips: the hires image is too coarse" in " ".join(page.text)


def test_card_notes_a_domain_along_the_section_border(tmp_path):
    adata = _toy()
    r, c = adata.obs["array_row"].to_numpy(), adata.obs["array_col"].to_numpy()
    outer = np.minimum.reduce([r, c, 15 - r, 15 - c]) == 0
    lab = adata.obs["stmic"].astype(str).to_numpy().copy()
    lab[outer] = "3"
    adata.obs["stmic"] = pd.Categorical(lab)
    page = _parse(report.write_report(_run_dir(tmp_path, adata=adata), viewer=False))
    cards = {card["id"]: " ".join(card["text"]) for card in page.cards}
    assert "Along the section's border: 100% of its spots" in cards["domain-3"]
    assert not [k for k, t in cards.items() if k != "domain-3" and "Along the section's border" in t]
    text = " ".join(page.text)  # the caution once, above the cards, not on each card
    assert text.count("edge artefact") == 1 and "1 domain(s) lie along the section's border" in text
    assert "edge artefact" not in cards["domain-3"] and "border-note" in page.ids


HOSTILE = "<!--<script>x</script><b onmouseover=alert(1)>&amp;\u2028'\""


def _hostile_run(tmp_path):
    """A run whose every text field that reaches the page carries markup: barcodes, gene names, labels, the
    section's name, the command and a warning."""
    adata = _toy(fullres=True)
    adata.obs_names = [f"{HOSTILE}{i}" for i in range(adata.n_obs)]
    adata.var_names = [f"{HOSTILE}g{i}" for i in range(adata.n_vars)]
    adata.obs["annotation"] = adata.obs["annotation"].cat.rename_categories(lambda c: f"{HOSTILE}{c}")
    adata.uns["spatial"] = {HOSTILE.replace("/", "") + "lib": adata.uns["spatial"]["toy"]}  # h5 keys: no /
    out = _run_dir(tmp_path, adata=adata)
    info = json.loads((out / "run.json").read_text())
    info.update(command=f"stmorph run {HOSTILE}", warnings=[HOSTILE])
    (out / "run.json").write_text(json.dumps(info))
    return out, adata


def test_report_with_hostile_text_in_every_field_stays_intact(tmp_path):
    out, adata = _hostile_run(tmp_path)
    path = report.write_report(out)
    raw = path.read_text(encoding="utf-8")
    page = _parse(path)
    assert len(page.cards) == adata.obs["stmic"].nunique()  # nothing swallowed the page after the viewer
    assert page.sections[-1] == "run"
    assert [t for t, a in page.scripts if t == "script"] == ["script", "script"]  # the data block and the viewer
    data = json.loads(page.json["stmorph-viewer-data"])
    assert data["spots"]["id"][0] == f"{HOSTILE}0"  # the text itself survives, escaped
    block = raw[raw.index('id="stmorph-viewer-data">'):]
    block = block[:block.index("</script>")]
    assert not set("<&") & set(block.split(">", 1)[1])
    assert "<b onmouseover" not in raw and "<!--<script>" not in raw


@pytest.mark.skipif(_chromium() is None, reason="headless Chromium (Debian package `chromium`) not installed")
def test_report_with_hostile_text_renders_whole_in_chromium(tmp_path):
    out, adata = _hostile_run(tmp_path)
    path = report.write_report(out)
    probe = tmp_path / "probe.html"
    js = """<script>window.addEventListener("load", function () { setTimeout(function () {
      document.title = JSON.stringify({cards: document.querySelectorAll("article.card").length,
        viewer: !!window.stmorphViewer, bold: document.querySelectorAll("b[onmouseover]").length});
    }, 300); });</script>"""
    probe.write_text(path.read_text(encoding="utf-8").replace("</body>", js + "</body>"), encoding="utf-8")
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    m = re.search(r"<title>(\{.*?\})</title>", dom)
    assert m, dom[:500]
    res = json.loads(m.group(1).replace("&quot;", '"'))
    assert res == {"cards": adata.obs["stmic"].nunique(), "viewer": True, "bold": 0}


def test_report_shows_confidence_and_what_the_image_changed(tmp_path):
    """With stmorph and its expression-only run, the report maps the confidence, names the least certain
    boundaries, and shows each region the H&E changed with its patches and genes."""
    adata = _toy(fullres=True)
    lab = adata.obs["stmic"].astype(str).to_numpy()
    r = adata.obs["array_row"].to_numpy()
    adata.obs["stmorph"] = pd.Categorical(lab)
    changed = lab.copy()
    changed[(lab == "1") & (r < 5)] = "2"  # without the image, a block of domain 1 sat in domain 2
    adata.obs["stmorph_expr"] = pd.Categorical(changed)
    conf = np.ones(adata.n_obs, np.float32)
    conf[(lab == "1") & (r < 7)] = 0.3
    for k in ("stmorph", "stmorph_expr"):
        adata.obs[f"{k}_confidence"] = conf
        adata.uns[k] = {"params": {"use_rep": "X_stmic"}, "confidence": {"kind": "co-assignment"}}
    out = _run_dir(tmp_path, adata=adata, methods=("stmorph", "stmorph_expr"))
    path = report.write_report(out, viewer=False)
    page = _parse(path)
    assert page.sections[:4] == ["summary", "domains", "confidence", "changes"]
    text = " ".join(page.text)
    assert "co-assignment" in text or "across the consensus" in text
    assert "The least certain boundaries" in text
    changes = [c for c in page.cards if c["id"].startswith("change-")]
    assert len(changes) == 1 and len(changes[0]["imgs"]) == 1  # one region, its H&E strip
    n = int(((lab == "1") & (r < 5)).sum())
    assert re.search(rf"\b{n}\s+of {adata.n_obs:,} spots", text), text[:200]


def _legacy_st_toy():
    """The toy as a legacy ST section: spots half the pitch across (100 um at 200 um), on a dark H&E."""
    adata = _toy(fullres=True)
    lib = adata.uns["spatial"]["toy"]
    lib["scalefactors"]["spot_diameter_fullres"] = 20.0  # the toy's pitch is 40 px
    lib["metadata"].update(technology="legacy_st", spot_diameter_um=100.0, microns_per_pixel=5.0)
    lib["images"]["fullres"] = np.broadcast_to(np.array([70, 45, 80], np.uint8),
                                               lib["images"]["fullres"].shape).copy()
    return adata


#: Colours the old blend on a dark H&E turned into other hues: yellow beside orange, brown, sky blue.
HUES = ["#F0E442", "#E69F00", "#8C564B", "#56B4E9"]


def test_legacy_st_spots_drawn_at_their_footprint_in_viewer_and_cards():
    from stmorph.report import _cards, _viewer
    from stmorph.report._image import SectionImage

    adata = _legacy_st_toy()
    lay = [{"key": "stmic", "labels": ["0", "1", "2"], "names": ["a", "b", "c"], "colors": HUES[:3]}]
    data = _viewer.viewer_data(adata, lay, default="stmic")
    f = data["size"] / 20.0
    assert data["shape"] == "circle"
    assert data["size"] == pytest.approx(20.0 * f) and 2 * data["size"] == pytest.approx(40.0 * f, rel=1e-6)
    assert np.diff(sorted(set(data["spots"]["x"])))[0] == pytest.approx(2 * data["size"], abs=0.2)
    # the card's map: the domain's colour at its spots, the H&E (not the colour) halfway between two of them
    with SectionImage(adata) as image:
        painter = _cards.MapPainter(adata, image)
        mask = adata.obs["stmic"].astype(str).to_numpy() == "1"
        png = painter.draw(mask, HUES[1])
    from io import BytesIO

    from PIL import Image

    im = np.asarray(Image.open(BytesIO(png)).convert("RGB")).astype(int)
    i = int(np.flatnonzero(mask)[0])
    j = int(np.flatnonzero(mask & (adata.obs["array_row"].to_numpy() == adata.obs["array_row"].iloc[i])
                           & (adata.obs["array_col"].to_numpy() == adata.obs["array_col"].iloc[i] + 1))[0])
    want = np.array([int(HUES[1][k:k + 2], 16) for k in (1, 3, 5)])
    at = lambda p: im[int(round(p[1])), int(round(p[0]))]
    assert np.abs(at(painter.xy[i]) - want).max() <= 2
    assert np.abs(at((painter.xy[i] + painter.xy[j]) / 2) - want).max() > 60


VIEWER_PROBE = """<script>
function probe(tries) {
  var v = window.stmorphViewer, D = v.data, L = D.layers[0], s = v.state;
  var cv = document.querySelector("#viewer canvas"), c = cv.getContext("2d"), dpr = cv.width / cv.clientWidth;
  function px(bx, by) {
    var d = c.getImageData(Math.round((bx * s.zoom + s.tx) * dpr), Math.round((by * s.zoom + s.ty) * dpr), 1, 1).data;
    return [d[0], d[1], d[2]];
  }
  var spots = [], gaps = [];
  for (var i = 0; i < D.spots.x.length; i += 7) {
    var hex = L.colors[L.codes[i]];
    spots.push({want: [1, 3, 5].map(function (k) { return parseInt(hex.substr(k, 2), 16); }),
                got: px(D.spots.x[i], D.spots.y[i])});
    gaps.push(px(D.spots.x[i] + D.size, D.spots.y[i]));  // halfway to the next spot along the row
  }
  if (gaps[0][0] + gaps[0][1] + gaps[0][2] === 0 && tries > 0) {  // H&E tiles still decoding
    setTimeout(function () { v.draw(); probe(tries - 1); }, 200); return;
  }
  document.title = JSON.stringify({spots: spots, gaps: gaps, legend: Array.prototype.map.call(
    document.querySelectorAll(".vlegend i"), function (e) { return getComputedStyle(e).backgroundColor; })});
}
window.addEventListener("load", function () { setTimeout(function () { probe(20); }, 300); });
</script>"""


@pytest.mark.skipif(_chromium() is None, reason="headless Chromium (Debian package `chromium`) not installed")
def test_viewer_overlay_keeps_the_legend_colours_on_a_dark_image(tmp_path):
    """Rendered in headless Chromium over a dark H&E: each spot's drawn colour is its legend colour, and the
    H&E shows between legacy ST spots (100 um circles at a 200 um pitch)."""
    from stmorph.report import _viewer

    adata = _legacy_st_toy()
    labs = sorted(adata.obs["annotation"].astype(str).unique())
    lay = [{"key": "annotation", "labels": labs, "names": labs, "colors": HUES[:len(labs)]}]
    data = _viewer.viewer_data(adata, lay, default="annotation")
    page = tmp_path / "viewer.html"
    page.write_text(f"<!doctype html><html><head><meta charset=utf-8><style>{_viewer.VIEWER_CSS}</style></head>"
                    f"<body>{_viewer.viewer_html(data)}{VIEWER_PROBE}</body></html>", encoding="utf-8")
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,900", "--virtual-time-budget=10000",
           "--dump-dom", page.as_uri()]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    m = re.search(r"<title>(\{.*?\})</title>", dom)
    assert m, dom[:500]
    res = json.loads(m.group(1).replace("&quot;", '"'))
    assert len(res["spots"]) > 20
    for s in res["spots"]:
        assert np.abs(np.subtract(s["got"], s["want"])).max() <= 3, s
    dark = np.array([70, 45, 80])
    for g in res["gaps"]:
        assert np.abs(np.subtract(g, dark)).max() <= 12, res["gaps"]  # the H&E between spots, not a colour
    legend = [tuple(int(v) for v in re.findall(r"\d+", c)[:3]) for c in res["legend"]]
    assert legend == [tuple(int(h[k:k + 2], 16) for k in (1, 3, 5)) for h in HUES[:len(labs)]]


def test_report_shows_gene_symbols_for_ensembl_ids(tmp_path):
    adata = _toy()
    symbols = list(adata.var_names)
    adata.var_names = [f"ENSG{i:011d}" for i in range(adata.n_vars)]
    adata.var["gene_symbols"] = symbols
    page = _parse(report.write_report(_run_dir(tmp_path, adata=adata), viewer=False))
    text = re.sub(r"\s+", " ", "".join(page.text))
    assert 'Gene symbols from var["gene_symbols"]; var_names are Ensembl ids.' in text
    cards = " ".join(" ".join(c["text"]) for c in page.cards)
    assert re.search(r"G\d{3}", cards) and not re.search(r"ENSG\d{11}", cards)
    del adata.var["gene_symbols"]
    (tmp_path / "ids").mkdir()
    page = _parse(report.write_report(_run_dir(tmp_path / "ids", adata=adata), viewer=False))
    assert "Genes are named by their Ensembl ids" in "".join(page.text)
    from stmorph.report._html import gene_symbols

    assert gene_symbols(_toy()) == ({}, None)


def test_domain_the_image_split_off_is_named_as_such(tmp_path):
    """A domain the image set apart from one of the same expression: no distinct markers, defined by the
    image (its spots form one domain with another in the expression-only run)."""
    adata = _toy()
    lab = adata.obs["stmic"].astype(str).to_numpy().copy()
    member = np.flatnonzero(lab == "1")
    expr = lab.copy()
    lab[member[: len(member) // 4]] = "3"  # the image split a quarter off domain 1
    adata.obs["stmorph"] = pd.Categorical(lab)
    adata.obs["stmorph_expr"] = pd.Categorical(expr)
    page = _parse(report.write_report(_run_dir(tmp_path, adata=adata, methods=("stmorph", "stmorph_expr")),
                                      viewer=False))
    cards = {card["id"]: " ".join(card["text"]) for card in page.cards}
    assert "Domain 3: no distinct markers; defined by the image" in cards["domain-3"]
    assert "the H&E, not the expression, sets this domain apart" in cards["domain-3"]
    assert "no distinct markers" not in cards["domain-1"] and "no distinct" not in cards["domain-0"]
