"""Tests of stmorph.pl: colour matching, domain panels, spatial genes, dot plot, GSEA bars."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from test_ev import REGIONS, toy_tissue

from stmorph import pl
from stmorph.errors import InputError


def _permuted(adata, key, perm):
    """obs[key] = annotation relabelled through ``perm`` (region -> cluster id)."""
    adata.obs[key] = pd.Categorical(adata.obs["annotation"].map(perm).astype(str))


def test_match_labels_hungarian():
    ref = pd.Series(list("aaabbbccc"), index=[f"s{i}" for i in range(9)])
    lab = pd.Series(list("221000111"), index=ref.index)
    # a -> 2 (2 spots), b -> 0 (3 spots), c -> 1 (3 spots); "1" also overlaps "a" once
    assert pl.match_labels(ref, lab) == {"2": "a", "0": "b", "1": "c"}
    # joined by name: shuffled order gives the same answer
    assert pl.match_labels(ref.iloc[::-1], lab.sample(frac=1, random_state=0)) == {"2": "a", "0": "b", "1": "c"}


def test_domain_colors_consistent_across_methods():
    adata = toy_tissue(n_side=12)
    _permuted(adata, "m1", {"tumour": 2, "stroma": 0, "immune": 1})
    _permuted(adata, "m2", {"tumour": 0, "stroma": 1, "immune": 2})
    # m3 splits tumour into two clusters
    m3 = adata.obs["annotation"].map({"tumour": "5", "stroma": "3", "immune": "4"}).astype(str).to_numpy()
    m3[(adata.obs["annotation"] == "tumour").to_numpy() & (adata.obs["array_row"] < 3).to_numpy()] = "9"
    adata.obs["m3"] = pd.Categorical(m3)
    cols = pl.domain_colors(adata, ["annotation", "m1", "m2", "m3"])
    for region, c1, c2, c3 in [("tumour", "2", "0", "5"), ("stroma", "0", "1", "3"), ("immune", "1", "2", "4")]:
        ref = cols["annotation"][region]
        assert cols["m1"][c1] == ref and cols["m2"][c2] == ref and cols["m3"][c3] == ref
    # the extra cluster gets a colour no reference domain uses
    assert cols["m3"]["9"] not in cols["annotation"].values()
    assert len(set(cols["m3"].values())) == 4
    unmatched = pl.domain_colors(adata, ["m1", "m2"], reference=None, match=False)
    assert unmatched["m1"]["0"] == unmatched["m2"]["0"] == pl.PALETTE[0]
    assert len(pl.palette(50)) == len(set(pl.palette(50))) == 50


def _decode(path):
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))


def test_domains_panel_over_image(tmp_path):
    adata = toy_tissue(n_side=14)
    _permuted(adata, "stmic", {"tumour": 2, "stroma": 0, "immune": 1})
    adata.obs.loc[adata.obs_names[:5], "annotation"] = np.nan
    fig = pl.domains(adata, ["annotation", "stmic"], save=tmp_path / "d.png")
    assert len([a for a in fig.axes if a.get_title()]) == 2
    titles = [a.get_title() for a in fig.axes]
    assert titles[1] == "stmic (ARI 1.00)"
    ax = fig.axes[1]
    assert ax.images, "background image missing"
    coll = [c for c in ax.collections if len(c.get_offsets()) == adata.n_obs]
    assert coll, "spots missing"
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["0", "1", "2"]
    img = _decode(tmp_path / "d.png")
    assert img.shape[0] > 200 and img.shape[1] > 400 and img.std() > 10
    # no image available: spots alone
    del adata.uns["spatial"]["toy"]["images"]["hires"]
    fig2 = pl.domains(adata, "stmic", image=True)
    assert not fig2.axes[0].images
    with pytest.raises(InputError, match="not found"):
        pl.domains(adata, ["nope"])
    import matplotlib.pyplot as plt

    plt.close("all")


def test_spot_size_is_true_diameter():
    adata = toy_tissue(n_side=6)
    for spot_shape in ("circle", "auto"):  # auto on a square grid of spots narrower than it: circles too
        fig = pl.domains(adata, "annotation", image=False, spot_shape=spot_shape)
        coll = [c for c in fig.axes[0].collections if len(c.get_offsets()) == adata.n_obs][0]
        assert np.allclose(coll._widths * 2, 25.0) or np.allclose(coll._widths, 25.0)
    # forced tiles: squares as wide as the spacing (40 px), touching
    fig = pl.domains(adata, "annotation", image=False, spot_shape="square")
    coll = [c for c in fig.axes[0].collections if len(c.get_paths()) == adata.n_obs][0]
    v = coll.get_paths()[0].vertices[:4]
    assert np.ptp(v[:, 0]) == pytest.approx(40.0) and np.ptp(v[:, 1]) == pytest.approx(40.0)
    with pytest.raises(InputError, match="spot_shape"):
        pl.domains(adata, "annotation", spot_shape="star")
    import matplotlib.pyplot as plt

    plt.close("all")


def _legacy_st(n_side=8, pitch=160.0):
    """A legacy ST section as read.legacy_st stores it: a square grid, spots half the pitch across."""
    adata = toy_tissue(n_side=n_side)
    rows, cols = adata.obs["array_row"].to_numpy(), adata.obs["array_col"].to_numpy()
    adata.obsm["spatial"] = np.c_[cols * pitch + 300, rows * pitch + 300].astype(np.float64)
    lib = adata.uns["spatial"]["toy"]
    lib["scalefactors"] = {"spot_diameter_fullres": pitch / 2}
    lib["metadata"] = {"technology": "legacy_st", "spot_diameter_um": 100.0}
    lib["images"] = {}
    return adata


def _rendered(fig):
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(int)


def _pixel(fig, ax, img, xy):
    x, y = ax.transData.transform(np.asarray(xy, dtype=float))
    return img[int(round(img.shape[0] - y)), int(round(x))]


def test_legacy_st_spots_at_their_100um_footprint():
    """Legacy ST: circles of the recorded diameter (half the pitch), the background showing between spots;
    the legend's colour is the drawn colour."""
    from matplotlib.colors import to_rgb

    from stmorph.pl import _utils

    adata = _legacy_st()
    xy = adata.obsm["spatial"]
    assert _utils.spot_shape(adata) == ("circle", 80.0, 0.0)
    fig = pl.domains(adata, "annotation", image=False, match_colors=False)
    ax = fig.axes[0]
    coll = [c for c in ax.collections if len(c.get_offsets()) == adata.n_obs][0]
    assert np.allclose(coll._widths * 2, 80.0) or np.allclose(coll._widths, 80.0)
    img = _rendered(fig)
    legend = {t.get_text(): h.get_markerfacecolor() for t, h in
              zip(ax.get_legend().get_texts(), ax.get_legend().legend_handles, strict=True)}
    a, b = 0, int(np.flatnonzero((adata.obs["array_row"] == 0) & (adata.obs["array_col"] == 1))[0])
    mid = (xy[a] + xy[b]) / 2
    assert (_pixel(fig, ax, img, mid) > 245).all()  # background between two neighbours: no square, no seam
    diag = xy[a] + 0.5 * 80.0 * np.array([0.8, 0.8])  # inside the square of the pitch, outside the circle
    assert (_pixel(fig, ax, img, diag) > 245).all()
    for i in (a, b):
        want = np.array(to_rgb(legend[str(adata.obs["annotation"].iloc[i])])) * 255
        assert np.abs(_pixel(fig, ax, img, xy[i]) - want).max() <= 3
    import matplotlib.pyplot as plt

    plt.close("all")


def test_visium_circles_and_hd_bins_squares():
    from stmorph.pl import _utils

    adata = toy_tissue(n_side=6)
    xy = _visium_grid(n=6)
    adata = adata[: len(xy)].copy()
    adata.obsm["spatial"] = xy + 200
    adata.uns["spatial"]["toy"]["scalefactors"]["spot_diameter_fullres"] = 55.0
    assert _utils.spot_shape(adata) == ("circle", 55.0, 0.0)
    # Visium HD bins: squares of the bin side, which is the grid's pitch
    hd = toy_tissue(n_side=6)
    hd.uns["spatial"]["toy"]["scalefactors"]["spot_diameter_fullres"] = 40.0
    hd.uns["spatial"]["toy"]["metadata"]["technology"] = "visium_hd"
    shape, size, _ = _utils.spot_shape(hd)
    assert (shape, size) == ("square", 40.0)
    hd.uns["spatial"]["toy"]["metadata"]["technology"] = "unknown"  # bins as wide as the pitch: squares too
    assert _utils.spot_shape(hd)[:2] == ("square", 40.0)


def _visium_grid(n=12, spacing=100.0, angle_deg=0.0):
    """Spot centres of a Visium-like hexagonal grid (rows offset by half a spacing), rotated."""
    rows, cols = np.meshgrid(np.arange(n), np.arange(2 * n), indexing="ij")
    keep = (rows + cols) % 2 == 0
    xy = np.c_[cols[keep] * spacing / 2, rows[keep] * spacing * np.sqrt(3) / 2]
    t = np.deg2rad(angle_deg)
    return xy @ np.array([[np.cos(t), np.sin(t)], [-np.sin(t), np.cos(t)]])


def test_hexagons_tile_a_visium_grid():
    from stmorph.pl import _utils

    for angle in (0.0, 12.0):
        xy = _visium_grid(angle_deg=angle)
        kind, spacing, theta = _utils.spot_lattice(xy)
        assert kind == "hex" and spacing == pytest.approx(100.0)
        assert (np.rad2deg(theta) - angle + 30) % 60 - 30 == pytest.approx(0.0, abs=1e-6)
        v = _utils.tile_vertices(xy, kind, spacing, theta)
        # neighbouring hexagons share an edge: two corners of each coincide, and they do not overlap
        i, j = 30, int(np.argsort(((xy - xy[30]) ** 2).sum(axis=1))[1])
        d = np.linalg.norm(v[i][:, None, :] - v[j][None, :, :], axis=2)
        assert (d < 1e-6).sum() == 2
    kind, spacing, _ = _utils.spot_lattice(np.random.default_rng(0).uniform(0, 1000, size=(300, 2)))
    assert kind == "irregular"


def test_palette_is_colour_blind_safe():
    """The first 11 colours (and the grey of unlabelled spots) stay >= 15 Delta-E (CIE76) apart under normal
    vision and simulated protanopia, deuteranopia and tritanopia (Machado et al. 2009, severity 1)."""
    machado = [
        np.eye(3),
        [[0.152286, 1.052583, -0.204868], [0.114503, 0.786281, 0.099216], [-0.003882, -0.048116, 1.051998]],
        [[0.367322, 0.860646, -0.227968], [0.280085, 0.672501, 0.047413], [-0.011820, 0.042940, 0.968881]],
        [[1.255528, -0.076749, -0.178779], [-0.078411, 0.930809, 0.147602], [0.004733, 0.691367, 0.303900]],
    ]
    from matplotlib.colors import to_rgb

    from stmorph.pl._colors import MISSING_COLOR

    srgb = np.array([to_rgb(c) for c in [*pl.PALETTE[:11], MISSING_COLOR]])
    lin = np.where(srgb <= 0.04045, srgb / 12.92, ((srgb + 0.055) / 1.055) ** 2.4)
    xyz_m = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    worst = np.inf
    for m in machado:
        xyz = np.clip(lin @ np.asarray(m).T, 0, 1) @ xyz_m.T / [0.95047, 1.0, 1.08883]
        f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16 / 116)
        lab = np.c_[116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])]
        d = np.linalg.norm(lab[:, None] - lab[None], axis=2)
        worst = min(worst, d[np.triu_indices(len(lab), 1)].min())
    assert worst >= 15.0
    # scanpy's default_20, the former palette, fails the same check
    assert pl.palette(3) == pl.PALETTE[:3] and len(set(pl.palette(40))) == 40


def test_legend_names_domains_by_markers():
    adata = toy_tissue(n_side=12)
    _permuted(adata, "stmic", {"tumour": 2, "stroma": 0, "immune": 1})
    planted = adata.uns["toy"]["planted"]
    names = pl.domain_names(adata, "stmic")
    assert set(names) == {"0", "1", "2"} and "rank_genes_groups" not in adata.uns
    for lab, region in (("2", "tumour"), ("0", "stroma"), ("1", "immune")):
        head, genes = names[lab].split(": ")
        assert head == lab and set(genes.split(", ")) <= set(planted[region])
    fig = pl.domains(adata, ["annotation", "stmic"], labels="markers")
    legend = [t.get_text() for t in fig.axes[1].get_legend().get_texts()]
    assert legend == [names["0"], names["1"], names["2"]]
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["immune", "stroma", "tumour"]
    fig = pl.domains(adata, "stmic", labels={"stmic": {"0": "zero"}})
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["zero", "1", "2"]
    import matplotlib.pyplot as plt

    plt.close("all")


def test_outputs_writes_figures_without_importing_pl(tmp_path):
    """Drawing lives in pl, writing in _outputs: importing the writer does not import pl (no cycle)."""
    import ast
    import inspect

    import stmorph._outputs

    tree = ast.parse(inspect.getsource(stmorph._outputs))
    imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module is None for a in n.names]
    assert not [m for m in imported if m in ("pl", "stmorph.pl", "report", "stmorph.report") or m.startswith("pl.")]
    from stmorph._outputs import write_run_outputs

    adata = toy_tissue(n_side=6)
    del adata.uns["toy"]
    fig = pl.domains(adata, "annotation")
    files = write_run_outputs(adata, tmp_path, ["annotation"], {"command": "x"}, figures={"domains.png": fig},
                              pages={"report.html": "<p>r</p>"})
    assert _decode(files["domains"] if files["domains"].suffix == ".png" else tmp_path / "domains.png").std() > 5
    assert (tmp_path / "report.html").read_text() == "<p>r</p>"
    import json

    assert {"domains.png", "report.html", "run.json"} <= set(json.loads((tmp_path / "run.json").read_text())["outputs"])


def test_spatial_dotplot_gsea_bars(tmp_path):
    adata = toy_tissue(n_side=12)
    planted = adata.uns["toy"]["planted"]
    genes = [planted[r][0] for r in REGIONS]
    fig = pl.spatial(adata, genes, save=tmp_path / "g.png")
    assert [a.get_title() for a in fig.axes[:3]] == genes
    assert (tmp_path / "g.png").stat().st_size > 1000
    with pytest.raises(InputError, match="not in adata.var_names"):
        pl.spatial(adata, ["NOPE"])
    fig = pl.dotplot(adata, "annotation", n_genes=2, save=tmp_path / "dot.png")
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert len(labels) == 6 and set(labels) <= {g for r in REGIONS for g in planted[r]}
    res = pd.DataFrame({"domain": ["a", "a", "b"], "term": ["T1", "T2", "T1"], "nes": [2.0, -1.0, 1.5],
                        "fdr": [0.01, 0.5, 0.02]})
    fig = pl.gsea_bars(res, fdr=0.05, save=tmp_path / "gsea.png")
    assert [a.get_title() for a in fig.axes if a.get_title()] == ["domain a", "domain b"]
    with pytest.raises(InputError, match="columns"):
        pl.gsea_bars(pd.DataFrame({"x": [1]}))
    import matplotlib.pyplot as plt

    plt.close("all")


def test_background_falls_back_to_fullres_thumbnail():
    from stmorph.pl import _utils

    adata = toy_tissue(n_side=8)
    lib = adata.uns["spatial"]["toy"]
    hires = lib["images"].pop("hires")
    full = np.repeat(np.repeat(hires, 2, axis=0), 2, axis=1)  # hires scale is 0.5
    lib["images"]["fullres"] = full
    img, scale = _utils.background(adata, max_side=200)
    assert img is not None and max(img.shape[:2]) <= 200
    assert scale == pytest.approx(img.shape[1] / full.shape[1], rel=0.02)
    fig = pl.domains(adata, "annotation")
    assert fig.axes[0].images
    assert _utils.background(adata, image=False) == (None, 1.0)
    import matplotlib.pyplot as plt

    plt.close("all")


def test_domain_without_distinct_markers_is_named_as_such():
    """A domain the image split off another (same expression) is not named by the other domain's genes."""
    adata = toy_tissue(n_side=16)
    planted = adata.uns["toy"]["planted"]
    lab = adata.obs["annotation"].astype(str).to_numpy().copy()
    tumour = np.flatnonzero(lab == "tumour")
    lab[tumour[: len(tumour) // 4]] = "tumour_edge"
    adata.obs["split"] = pd.Categorical(lab)
    names = pl.domain_names(adata, "split")
    assert names["tumour_edge"] == "tumour_edge: no distinct markers"
    assert set(names["tumour"].split(": ")[1].split(", ")) <= set(planted["tumour"])
    assert set(pl.domain_names(adata, "split", distinct=False)["tumour_edge"].split(": ")[1].split(", ")) \
        <= set(planted["tumour"])  # what it used to be called: the tumour's genes
