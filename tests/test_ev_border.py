"""Tests of stmorph.ev.border_distance / border_domains: distances to the section's outline on known grids."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from test_ev import toy_tissue

from stmorph import ev
from stmorph.errors import InputError


def _grid(adata, keep):
    return adata[keep].copy()


def test_square_grid_distances_rows_and_holes():
    adata = toy_tissue(n_side=16, image=False)
    r, c = adata.obs["array_row"].to_numpy(), adata.obs["array_col"].to_numpy()
    depth = np.minimum.reduce([r, c, 15 - r, 15 - c])  # rows from the outermost one
    d = ev.border_distance(adata)
    assert np.all(np.abs(d - depth) <= 0.3), np.c_[depth, d][np.abs(d - depth) > 0.3][:5]
    # a hole of 3 x 3 missing spots inside the section is not border: its neighbours keep their depth
    hole = (np.abs(r - 8) <= 1) & (np.abs(c - 8) <= 1)
    holed = _grid(adata, ~hole)
    dh = ev.border_distance(holed)
    assert np.all(np.abs(dh - depth[~hole]) <= 0.3)
    # ... while a notch cut into the edge is: the spots around it come closer to the outline
    notch = (c >= 6) & (c <= 9) & (r <= 5)
    dn = ev.border_distance(_grid(adata, ~notch))
    beside = (r[~notch] >= 4) & (r[~notch] <= 5) & (c[~notch] == 5)  # 4-5 rows deep before the cut
    assert np.all(dn[beside] <= 0.3) and np.all(depth[~notch][beside] >= 4)


def test_hexagonal_grid_and_units_do_not_matter():
    adata = toy_tissue(n_side=16, image=False)
    r, c = adata.obs["array_row"].to_numpy(), adata.obs["array_col"].to_numpy()
    hexa = adata.copy()
    hexa.obsm["spatial"] = np.c_[(c + 0.5 * (r % 2)) * 137.0, r * 137.0 * np.sqrt(3) / 2] + 1000.0  # Visium-like
    d = ev.border_distance(hexa)
    inner = (r >= 2) & (r <= 13) & (c >= 2) & (c <= 13)
    assert d[~inner].min() < 0.3 and d[inner].min() > 1.2
    assert d.max() > 5
    scaled = hexa.copy()
    scaled.obsm["spatial"] = hexa.obsm["spatial"] * 7.3
    np.testing.assert_allclose(ev.border_distance(scaled), d, atol=0.3)


def test_border_domains_flags_a_band_along_the_outline_only():
    adata = toy_tissue(n_side=16, image=False)
    r, c = adata.obs["array_row"].to_numpy(), adata.obs["array_col"].to_numpy()
    outer = np.minimum.reduce([r, c, 15 - r, 15 - c]) == 0
    lab = np.where(outer, "edge", adata.obs["annotation"].astype(str))
    adata.obs["dom"] = pd.Categorical(lab)
    tab = ev.border_domains(adata, "dom")
    assert tab.loc["edge", "along_border"] and tab.loc["edge", "share_in_band"] == 1.0
    assert not tab.drop(index="edge")["along_border"].any()  # three bands across the section: inside
    assert tab["section_share_in_band"].iloc[0] == pytest.approx(outer.mean())
    assert tab["n_spots"].sum() == adata.n_obs and tab.index.name == "dom"
    # the bands themselves touch the border but mostly lie inside it
    assert not ev.border_domains(adata, "annotation")["along_border"].any()
    # a section a few rows wide is all border: nothing is flagged
    small = adata[(r < 4) & (c < 4)].copy()
    small.obs["dom"] = pd.Categorical(np.where(outer[(r < 4) & (c < 4)], "edge", "in"))
    assert not ev.border_domains(small, "dom")["along_border"].any()


def test_border_errors_are_one_line():
    adata = toy_tissue(n_side=4, image=False)
    with pytest.raises(InputError, match="not a column"):
        ev.border_domains(adata, "missing")
    with pytest.raises(InputError, match="at least 3 spots"):
        ev.border_distance(adata[:2].copy())
    same = adata.copy()
    same.obsm["spatial"] = np.zeros((adata.n_obs, 2))
    with pytest.raises(InputError, match="distinct spot positions"):
        ev.border_distance(same)


def test_a_large_bin_grid_is_drawn_coarser_and_still_finds_its_outline():
    import anndata as ad

    n = 1500  # 1,500 x 1,500 bins: too many raster pixels at 4 per spacing, drawn at 2
    r, c = np.divmod(np.arange(n * n), n)
    keep = (r % 7 == 0) | (c < 3) | (c >= n - 3) | (r < 3) | (r >= n - 3)  # a sparse subset: fast, same outline
    a = ad.AnnData(obs=pd.DataFrame(index=[str(i) for i in np.flatnonzero(keep)]))
    a.obsm["spatial"] = np.c_[c[keep], r[keep]].astype(float) * 16.0
    a.uns["spatial"] = {"hd": {"scalefactors": {"spot_diameter_fullres": 16.0}, "images": {},
                               "metadata": {"spot_diameter_um": 16.0}}}
    d = ev.border_distance(a)
    rk, ck = r[keep], c[keep]
    outer = (rk == 0) | (ck == 0) | (rk == n - 1) | (ck == n - 1)
    assert d[outer].max() <= 0.6 and np.median(d[~outer]) > 100
