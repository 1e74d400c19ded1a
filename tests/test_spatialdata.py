"""SpatialData in and out, on objects spatialdata-io makes from a Space Ranger folder."""

from __future__ import annotations

import json
import os
import shutil
import warnings

import numpy as np
import pandas as pd
import pytest

sd = pytest.importorskip("spatialdata")
sdio = pytest.importorskip("spatialdata_io")

import stmorph as st  # noqa: E402
from stmorph.errors import InputError, OutputExistsError  # noqa: E402


@pytest.fixture(scope="module")
def section(tmp_path_factory):
    """A synthetic section as Space Ranger writes it, read by spatialdata-io and written as a store."""
    root = tmp_path_factory.mktemp("sdata")
    tissue = st.datasets.synthetic(300, n_genes=300, random_state=0)
    outs = st.datasets.write_visium(tissue, root / "outs")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sdata = sdio.visium(outs, dataset_id="sec", fullres_image_file="image.tif")
        sdata.write(root / "sec.zarr", update_sdata_path=False)  # the object stays an in-memory one
    return {"root": root, "outs": outs, "store": root / "sec.zarr", "sdata": sdata,
            "visium": st.read.visium(outs, image=outs / "image.tif")}


def test_read_store_matches_space_ranger_reader(section):
    a = st.read.spatialdata(section["store"])
    ref = section["visium"][a.obs_names]
    assert a.n_obs == ref.n_obs == 300
    np.testing.assert_allclose(a.obsm["spatial"], ref.obsm["spatial"])  # full-resolution pixels
    lib = a.uns["spatial"]["sec"]
    assert lib["scalefactors"]["spot_diameter_fullres"] == pytest.approx(55.0)  # 2 x radius
    assert lib["metadata"]["source_image_path"].endswith("images/sec_full_image")
    assert (a.X != ref[:, a.var_names].X).nnz == 0
    with st.im.open_slide(lib["metadata"]["source_image_path"]) as s:  # lazy, pyramid-aware
        assert s.backend == "ome_zarr" and s.n_levels > 1
        x, y = (int(v) for v in a.obsm["spatial"][0])
        with st.im.open_slide(section["outs"] / "image.tif") as tif:
            np.testing.assert_array_equal(s.read_region(x - 20, y - 20, 40, 40), tif.read_region(x - 20, y - 20, 40, 40))
    from stmorph._validate import problems

    assert not problems(a, require_image=True)


def test_coordinates_follow_the_chosen_image(section):
    """Through the transformations, spots land in the pixels of whichever image is chosen."""
    full = st.read.spatialdata(section["store"])
    hires = st.read.spatialdata(section["store"], image="sec_hires_image")
    f = full.uns["spatial"]["sec"]["scalefactors"]["tissue_hires_scalef"]
    np.testing.assert_allclose(hires.obsm["spatial"], full.obsm["spatial"] * f, rtol=1e-6)
    d = hires.uns["spatial"]["sec"]["scalefactors"]["spot_diameter_fullres"]
    assert d == pytest.approx(55.0 * f)
    # the same tissue in micrometres either way: Visium's 100 um grid
    for a in (full, hires):
        xy = st._spatial.coordinates(a)
        assert st._spatial.microns_per_pixel(a) * st._spatial.spot_spacing(xy) == pytest.approx(100.0)


def test_in_memory_object(section):
    a = st.read.spatialdata(section["sdata"])  # from spatialdata-io, never written
    assert a.n_obs == 300
    assert "fullres" in a.uns["spatial"]["sec"]["images"]


def test_round_trip_into_existing_store(section, tmp_path):
    store = tmp_path / "copy.zarr"
    shutil.copytree(section["store"], store)
    before = {p.relative_to(store): p.stat().st_mtime_ns for p in store.rglob("*") if p.is_file()}
    a = st.read.spatialdata(store)
    st.tl.spatial_expression_embedding(a, key_added="X_stmorph")
    st.tl.cluster(a, "X_stmorph", method="gmm", n_clusters=4, n_init=2, key_added="stmorph")
    st.write_spatialdata(a, store)
    after = {p.relative_to(store): p.stat().st_mtime_ns for p in store.rglob("*") if p.is_file()}
    changed = {p for p in before if after.get(p) != before[p]}
    assert all(str(p).startswith("tables/stmorph") or str(p) == "zarr.json" for p in changed), changed
    back = sd.read_zarr(store)
    assert set(back.tables) == {"table", "stmorph"} and set(back.images) == set(section["sdata"].images)
    t = back.tables["stmorph"]
    attrs = t.uns["spatialdata_attrs"]
    assert attrs["region"] == "sec" and attrs["instance_key"] == "spot_id" and attrs["region_key"] == "region"
    assert list(t.obs["stmorph"].astype(str)) == list(a.obs["stmorph"].astype(str))
    assert list(t.obs["spot_id"]) == list(a.obs["spot_id"])
    assert t.obsm["X_stmorph"].shape == (300, a.obsm["X_stmorph"].shape[1])
    assert len(t.uns["stmorph_colors"]) == t.obs["stmorph"].cat.categories.size
    # never clobbered: again without force, or onto a table stmorph did not write
    with pytest.raises(OutputExistsError):
        st.write_spatialdata(a, store)
    with pytest.raises(OutputExistsError, match="not written by stmorph"):
        st.write_spatialdata(a, store, table_name="table", force=True)
    st.write_spatialdata(a, store, force=True)  # its own table: replaced
    # the counts table is still what reading picks
    assert st.read.spatialdata(store).uns["spatial"]["sec"]["metadata"]["spatialdata"]["table"] == "table"


def test_write_by_barcodes_and_new_store(section, tmp_path):
    a = section["visium"].copy()  # read from the Space Ranger folder: matched to the shapes by barcode
    a.obs["expression"] = (np.arange(a.n_obs) % 3).astype(str)
    a.obs["expression"] = a.obs["expression"].astype("category")
    out = st.write_spatialdata(a, section["sdata"], keys=["expression"], table_name="mine")
    t = out.tables["mine"]
    table = section["sdata"].tables["table"]
    np.testing.assert_array_equal(t.obs["spot_id"].to_numpy(), table.obs.loc[a.obs_names, "spot_id"].to_numpy())
    new = tmp_path / "new.zarr"
    st.write_spatialdata(a, new, keys=["expression"])
    b = st.read.spatialdata(new)
    assert b.n_obs == a.n_obs and list(b.obs["expression"].astype(str)) == list(a.obs["expression"].astype(str))
    f = a.uns["spatial"][next(iter(a.uns["spatial"]))]["scalefactors"]["tissue_hires_scalef"]
    np.testing.assert_allclose(b.obsm["spatial"], a.obsm["spatial"] * f, rtol=1e-5)  # the hires image's pixels
    with pytest.raises(OutputExistsError):
        st.write_spatialdata(a, new, keys=["expression"])


def test_bad_input_is_one_line(tmp_path, section):
    (tmp_path / "x.zarr").mkdir()
    with pytest.raises(InputError, match="x.zarr") as e:
        st.read.spatialdata(tmp_path / "x.zarr")
    assert "\n" not in str(e.value)
    with pytest.raises(InputError, match="no table 'nope'"):
        st.read.spatialdata(section["store"], table="nope")
    with pytest.raises(InputError, match="no image 'nope'"):
        st.read.spatialdata(section["store"], image="nope")


def test_stmorph_run_reads_a_store(section, tmp_path):
    from stmorph.cli import main

    out = tmp_path / "run"
    store = section["store"]
    before = {p.relative_to(store): p.stat().st_mtime_ns for p in store.rglob("*")}
    assert main(["run", str(store), "--out", str(out), "--method", "expression", "--n-clusters", "3",
                 "--no-plot", "--quiet"]) == 0
    assert (out / "result.h5ad").exists() and (out / "domains.csv").exists()
    assert {p.relative_to(store): p.stat().st_mtime_ns for p in store.rglob("*")} == before  # input untouched
    # the results as a SpatialData store: the input's spot shapes and small images, a table annotating them
    back = sd.read_zarr(out / "result.zarr")
    assert set(back.tables) == {"stmorph"} and set(back.shapes) == {"sec"}
    assert {"sec_hires_image", "sec_lowres_image"} <= set(back.images)
    t = back.tables["stmorph"]
    assert t.uns["spatialdata_attrs"]["region"] == "sec" and t.uns["spatialdata_attrs"]["instance_key"] == "spot_id"
    domains = pd.read_csv(out / "domains.csv", index_col=0, dtype=str)
    assert list(t.obs["expression"].astype(str)) == list(domains.loc[t.obs_names, "expression"])
    assert t.obs["spot_id"].isin(back.shapes["sec"].index).all()
    assert len(t.uns["expression_colors"]) == t.obs["expression"].cat.categories.size
    run = json.loads((out / "run.json").read_text())
    assert "result.zarr" in run["outputs"]
    # stmorph reads it back onto the same pixels
    again, res = st.read.spatialdata(out / "result.zarr"), st.read.h5ad(out / "result.h5ad")
    np.testing.assert_allclose(again.obsm["spatial"], res[again.obs_names].obsm["spatial"], rtol=1e-6)


def test_new_store_without_a_small_image_places_the_hires_one(section, tmp_path, monkeypatch):
    """No image of the input fits the size limit: the section's hires image goes in, placed through the
    transformations of the image stmorph read, so spots land where they were."""
    from stmorph import _write_spatialdata

    monkeypatch.setattr(_write_spatialdata, "RESULT_IMAGE_MAX_BYTES", 0)
    a = st.read.spatialdata(section["store"])
    a.obs["expression"] = pd.Categorical((np.arange(a.n_obs) % 2).astype(str))
    st.write_spatialdata(a, tmp_path / "r.zarr", keys=["expression"])
    back = sd.read_zarr(tmp_path / "r.zarr")
    assert list(back.images) == ["sec_stmorph_hires_image"] and set(back.shapes) == {"sec"}
    b = st.read.spatialdata(tmp_path / "r.zarr")
    f = a.uns["spatial"]["sec"]["scalefactors"]["tissue_hires_scalef"]
    np.testing.assert_allclose(b.obsm["spatial"], a[b.obs_names].obsm["spatial"] * f, rtol=1e-5)


def test_force_replace_keeps_the_old_table_when_writing_fails(section, tmp_path, monkeypatch):
    store = tmp_path / "copy.zarr"
    shutil.copytree(section["store"], store)
    a = st.read.spatialdata(store)
    a.obs["stmorph"] = pd.Categorical((np.arange(a.n_obs) % 3).astype(str))
    st.write_spatialdata(a, store, keys=["stmorph"])
    first = sd.read_zarr(store).tables["stmorph"].obs["stmorph"].astype(str).tolist()
    a.obs["stmorph"] = pd.Categorical((np.arange(a.n_obs) % 5).astype(str))
    real = sd.SpatialData.write_element

    def crash(self, *args, **kwargs):  # the table is written, then the process fails (disk full, killed ...)
        real(self, *args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sd.SpatialData, "write_element", crash)
    with pytest.raises(OSError, match="No space"):
        st.write_spatialdata(a, store, keys=["stmorph"], force=True)
    assert sd.read_zarr(store).tables["stmorph"].obs["stmorph"].astype(str).tolist() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.zarr"]  # no staging folder left
    assert sorted(p.name for p in (store / "tables").iterdir()) == ["stmorph", "table", "zarr.json"]
    monkeypatch.setattr(sd.SpatialData, "write_element", real)
    st.write_spatialdata(a, store, keys=["stmorph"], force=True)
    back = sd.read_zarr(store)
    assert back.tables["stmorph"].obs["stmorph"].astype(str).tolist() == list(a.obs["stmorph"].astype(str))
    assert set(back.tables) == {"table", "stmorph"} and set(back.images) == set(section["sdata"].images)
    # a folder that cannot take the staging folder: it is made inside the store, and gone afterwards
    entries = sorted(p.name for p in store.iterdir())
    monkeypatch.setattr(os, "access", lambda *a, **k: False)
    a.obs["stmorph"] = pd.Categorical((np.arange(a.n_obs) % 4).astype(str))
    st.write_spatialdata(a, store, keys=["stmorph"], force=True)
    monkeypatch.undo()
    assert sorted(p.name for p in store.iterdir()) == entries and sorted(p.name for p in tmp_path.iterdir()) == ["copy.zarr"]
    assert sd.read_zarr(store).tables["stmorph"].obs["stmorph"].astype(str).tolist() == list(a.obs["stmorph"].astype(str))
