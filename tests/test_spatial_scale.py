"""The pixel size: on Visium calibrated on the array's 100 um pitch, not on Space Ranger's
spot_diameter_fullres (a 65 um spot by 10x's definition, 70 um of the grid on DLPFC); on legacy ST on the
spot diameter its reader derives from the array step."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest

from stmorph import _spatial


def _section(xy, technology, diameter_px, **meta):
    a = ad.AnnData(np.zeros((len(xy), 1), np.float32))
    a.obsm["spatial"] = np.asarray(xy, np.float64)
    a.uns["spatial"] = {"s": {"scalefactors": {"spot_diameter_fullres": diameter_px},
                              "metadata": {"technology": technology,
                                           "spot_diameter_um": _spatial.SPOT_DIAMETER_UM.get(technology, 55.0),
                                           **meta}}}
    return a


def _hex(pitch, n=12):
    rows, cols = np.mgrid[0:n, 0:n]
    x = cols * pitch + (rows % 2) * pitch / 2
    y = rows * pitch * np.sqrt(3) / 2
    return np.column_stack([x.ravel(), y.ravel()]) + 500.0


def _square(pitch, n=12):
    rows, cols = np.mgrid[0:n, 0:n]
    return np.column_stack([cols.ravel(), rows.ravel()]) * pitch + 500.0


def test_visium_calibrated_on_the_100um_grid():
    a = _section(_hex(137.0), "visium", 96.4)  # DLPFC 151673's figures
    assert _spatial.microns_per_pixel(a) == pytest.approx(100 / 137.0)
    assert _spatial.spot_spacing(_spatial.coordinates(a)) * _spatial.microns_per_pixel(a) == pytest.approx(100.0)


def test_legacy_st_keeps_the_readers_spot_diameter():
    # detected legacy ST positions scatter around the lattice, so their nearest-neighbour distance (270 px on
    # HER2ST B1) falls short of the array step (291 px) from which the reader sets the 100 um diameter
    a = _section(_square(270.0), "legacy_st", 145.4)
    assert _spatial.microns_per_pixel(a) == pytest.approx(100 / 145.4)


def test_given_pixel_size_wins():
    a = _section(_hex(137.0), "visium", 96.4, microns_per_pixel=0.5)
    assert _spatial.microns_per_pixel(a) == 0.5


@pytest.mark.parametrize("xy", [np.array([[10.0, 10.0]]), _hex(137.0)[::9] * 4.0, np.zeros((5, 2))],
                         ids=["one spot", "too sparse for the grid", "one shared position"])
def test_spot_diameter_when_the_grid_cannot_be_seen(xy):
    a = _section(xy, "visium", 96.4)
    assert _spatial.microns_per_pixel(a) == pytest.approx(55.0 / 96.4)


def test_unknown_technology_keeps_the_spot_diameter():
    a = _section(_hex(137.0), "slide_seq", 20.0, spot_diameter_um=10.0)
    assert _spatial.microns_per_pixel(a) == pytest.approx(10.0 / 20.0)


def _with_array(a, n=12):
    rows, cols = np.mgrid[0:n, 0:n]
    a.obs["array_row"] = rows.ravel()
    a.obs["array_col"] = (2 * cols + (rows % 2)).ravel()  # Visium: neighbours in a row are two columns apart
    return a


def test_a_subset_of_visium_spots_keeps_the_scale():
    a = _with_array(_section(_hex(137.0, n=30), "visium", 96.4), n=30)
    assert _spatial.visium_array_pitch(a) == pytest.approx(137.0)
    sub = a[np.random.default_rng(0).random(a.n_obs) < 0.08].copy()  # a sparse subset: neighbours pushed apart
    assert _spatial.spot_spacing(_spatial.coordinates(sub)) > 1.1 * 137.0
    assert _spatial.microns_per_pixel(sub) == pytest.approx(100 / 137.0)
    # array coordinates of another convention (not the hexagonal grid's): ignored
    other = _section(_hex(137.0, n=30), "visium", 96.4)
    other.obs["array_row"], other.obs["array_col"] = a.obs["array_row"].to_numpy(), a.obs["array_row"].to_numpy()
    assert np.isnan(_spatial.visium_array_pitch(other))
    assert _spatial.microns_per_pixel(other) == pytest.approx(100 / 137.0)


def test_required_spot_spacing_says_what_needs_it():
    from stmorph.errors import InputError
    from stmorph.im._patches import spot_spacing as patch_spacing
    from stmorph.tl.senca._preprocess import spot_spacing as graph_spacing

    xy = np.array([[0.0, 0.0], [0.0, 10.0], [10.0, 0.0]])
    assert patch_spacing(xy) == graph_spacing(xy) == _spatial.spot_spacing(xy) == 10.0
    with pytest.raises(InputError, match="a patch in spot spacings needs at least two spots"):
        patch_spacing(xy[:1])
    with pytest.raises(InputError, match="share one position.*the spatial graph is undefined"):
        graph_spacing(np.zeros((3, 2)))
