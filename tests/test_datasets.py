"""Tests of stmorph.datasets: synthetic tissue and the Space Ranger-like writer."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy import sparse

import stmorph
from stmorph.datasets import synthetic, write_visium
from stmorph.errors import InputError, OutputExistsError

LIB = "synthetic"


@pytest.fixture(scope="module")
def small():
    return synthetic(250, n_genes=300, image_size=900, random_state=3)


@pytest.fixture(scope="module")
def eight():
    # all 8 regions, 1 um/px texture on a small section
    return synthetic(400, n_regions=8, n_genes=400, microns_per_pixel=1.0, random_state=1)


def test_fields_and_shapes(small):
    a = small
    assert a.n_obs == 250 and a.n_vars == 300
    assert sparse.isspmatrix_csr(a.X) and a.X.dtype == np.float32
    x = a.X.data
    assert np.all(x == np.round(x)) and x.min() >= 0
    for col in ("in_tissue", "array_row", "array_col"):
        assert np.issubdtype(a.obs[col].dtype, np.integer)
    assert (a.obs["in_tissue"] == 1).all()
    # Visium hex convention: array_col steps by 2, odd rows offset
    assert ((a.obs["array_row"] + a.obs["array_col"]) % 2 == 0).all()
    assert isinstance(a.obs["annotation"].dtype, pd.CategoricalDtype)
    syn = a.uns["synthetic"]
    assert list(a.obs["annotation"].cat.categories) == syn["regions"]
    assert set(a.obs["annotation"].unique()) == set(syn["regions"])
    xy = a.obsm["spatial"]
    assert xy.dtype == np.float64 and xy.shape == (250, 2)
    lib = a.uns["spatial"][LIB]
    full = lib["images"]["fullres"]
    assert full.dtype == np.uint8 and full.ndim == 3 and full.shape[2] == 3
    assert max(full.shape[:2]) == 900
    assert (xy[:, 0] > 0).all() and (xy[:, 0] < full.shape[1]).all()
    assert (xy[:, 1] > 0).all() and (xy[:, 1] < full.shape[0]).all()
    sf = lib["scalefactors"]
    meta = lib["metadata"]
    assert meta["technology"] == "synthetic" and meta["spot_diameter_um"] == 55
    mpp = meta["microns_per_pixel"]
    assert sf["spot_diameter_fullres"] == pytest.approx(55 / mpp)
    for res in ("hires", "lowres"):
        img = lib["images"][res]
        assert img.dtype == np.uint8
        assert img.shape[1] == pytest.approx(full.shape[1] * sf[f"tissue_{res}_scalef"], abs=1)
    assert max(lib["images"]["lowres"].shape[:2]) <= 600
    # spot pitch of 100 um between hex neighbours
    from scipy.spatial import cKDTree

    d, _ = cKDTree(xy).query(xy, k=2)
    assert np.median(d[:, 1]) * mpp == pytest.approx(100, rel=0.02)
    # planted genes exist; the spatial accessors of the package understand the metadata
    for genes in syn["region_genes"].values():
        assert set(genes) <= set(a.var_names)
    assert stmorph._spatial.microns_per_pixel(a) == pytest.approx(mpp)
    stmorph.validate(a)


def test_default_scale():
    a = synthetic(2000, image=False, random_state=0)
    assert a.n_obs == 2000 and "fullres" not in a.uns["spatial"][LIB]["images"]
    assert a.obs["annotation"].nunique() == 6
    counts = a.obs["annotation"].value_counts()
    assert counts.min() >= 0.04 * a.n_obs  # every region is a real part of the section
    lib = np.asarray(a.X.sum(1)).ravel()
    assert 1000 < np.median(lib) < 10000
    # regions are spatially coherent: most hex neighbours share the region
    from scipy.spatial import cKDTree

    xy = a.obsm["spatial"]
    pitch = 100 / a.uns["spatial"][LIB]["metadata"]["microns_per_pixel"]
    pairs = cKDTree(xy).query_pairs(1.05 * pitch, output_type="ndarray")
    ann = a.obs["annotation"].to_numpy()
    assert len(pairs) > 2.5 * a.n_obs
    assert (ann[pairs[:, 0]] == ann[pairs[:, 1]]).mean() > 0.8
    # necrosis sits inside the tumour: its spots touch no stroma
    nec = ann[pairs] == "necrosis"
    other = np.where(nec[:, 0], ann[pairs[:, 1]], ann[pairs[:, 0]])[nec.any(1)]
    assert "stroma" not in set(other)


def test_deterministic(small):
    b = synthetic(250, n_genes=300, image_size=900, random_state=3)
    assert (small.X != b.X).nnz == 0
    assert (small.obs["annotation"] == b.obs["annotation"]).all()
    np.testing.assert_array_equal(small.uns["spatial"][LIB]["images"]["fullres"], b.uns["spatial"][LIB]["images"]["fullres"])
    c = synthetic(250, n_genes=300, image=False, random_state=4)
    assert (small.X != c.X).nnz > 0


def test_bad_input():
    with pytest.raises(InputError):
        synthetic(100, n_regions=3, image=False)
    with pytest.raises(InputError):
        synthetic(100, n_regions=9, image=False)
    with pytest.raises(InputError):
        synthetic(100, n_genes=50, image=False)


def _normalised(a):
    X = a.X.toarray()
    return np.log1p(X / X.sum(1, keepdims=True) * 1e4)


def test_image_only_region_shares_expression_program():
    a = synthetic(1500, n_genes=500, image=False, random_state=2)
    syn = a.uns["synthetic"]
    reg, parent = syn["image_only"], syn["parents"][syn["image_only"]]
    assert syn["programs"][reg] == syn["programs"][parent]
    assert syn["region_genes"][reg] == syn["region_genes"][parent]
    assert syn["textures"][reg] != syn["textures"][parent]
    L = _normalised(a)
    ann = a.obs["annotation"].to_numpy()
    genes = a.var_names.get_indexer(syn["region_genes"][parent])
    m_reg, m_par = L[ann == reg][:, genes].mean(), L[ann == parent][:, genes].mean()
    m_tum = L[ann == "tumour"][:, genes].mean()
    assert abs(m_reg - m_par) < 0.25 * abs(m_par - m_tum)
    # the expression-only region has its own planted genes, up in it and not in its parent
    ereg = syn["expression_only"]
    epar = syn["parents"][ereg]
    assert syn["textures"][ereg] == syn["textures"][epar]
    assert syn["texture_params"][syn["textures"][ereg]] == syn["texture_params"][syn["textures"][epar]]
    eg = a.var_names.get_indexer(syn["region_genes"][ereg])
    assert L[ann == ereg][:, eg].mean() > L[ann == epar][:, eg].mean() + 0.8


def _patch_stats(a):
    """Per-spot mean RGB and fraction of near-white pixels in the spot-diameter patch."""
    img = a.uns["spatial"][LIB]["images"]["fullres"].astype(np.float32)
    r = int(a.uns["spatial"][LIB]["scalefactors"]["spot_diameter_fullres"] / 2)
    out = []
    for x, y in np.rint(a.obsm["spatial"]).astype(int):
        p = img[y - r:y + r, x - r:x + r]
        out.append([*p.mean((0, 1)), (p.min(2) > 215).mean(), p.std()])
    return np.array(out)


def test_image_texture_by_region(eight):
    a = eight
    syn = a.uns["synthetic"]
    assert len(syn["regions"]) == 8
    s = _patch_stats(a)
    ann = a.obs["annotation"].to_numpy()
    reg, parent = syn["image_only"], syn["parents"][syn["image_only"]]
    # vessels: lumens make the image-only region whiter than its parent
    assert s[ann == reg, 3].mean() > s[ann == parent, 3].mean() + 0.03
    # expression-only region: same texture as its parent (mean colour within noise)
    ereg, epar = syn["expression_only"], syn["parents"][syn["expression_only"]]
    diff = np.abs(s[ann == ereg, :3].mean(0) - s[ann == epar, :3].mean(0))
    spread = s[ann == epar, :3].std(0)
    assert (diff < 0.5 * spread + 2).all()
    # nuclei-rich regions are darker than stroma; adipose is the whitest
    mean_int = {r: s[ann == r, :3].mean() for r in syn["regions"] if (ann == r).any()}
    assert mean_int["immune"] < mean_int["stroma"]
    assert mean_int["tumour"] < mean_int["stroma"]
    assert max(mean_int, key=mean_int.get) == "adipose"


@pytest.mark.parametrize("positions", ["list", "csv", "parquet"])
def test_write_visium(small, tmp_path, positions):
    if positions == "parquet":
        pytest.importorskip("pyarrow")
    import h5py
    import tifffile

    out = write_visium(small, tmp_path / "outs", positions=positions, compression="zlib")
    assert out == tmp_path / "outs"
    names = {"list": "tissue_positions_list.csv", "csv": "tissue_positions.csv", "parquet": "tissue_positions.parquet"}
    for f in ("filtered_feature_bc_matrix.h5", "labels.tsv", "image.tif", f"spatial/{names[positions]}",
              "spatial/scalefactors_json.json", "spatial/tissue_hires_image.png", "spatial/tissue_lowres_image.png"):
        assert (out / f).is_file(), f
    assert [p.name for p in tmp_path.iterdir()] == ["outs"]  # no temporary folder left behind
    # 10x HDF5 v3: genes x barcodes CSC == spots x genes CSR
    with h5py.File(out / "filtered_feature_bc_matrix.h5", "r") as f:
        m = f["matrix"]
        shape = tuple(m["shape"][()])
        assert shape == (small.n_vars, small.n_obs)
        X = sparse.csr_matrix((m["data"][()], m["indices"][()], m["indptr"][()]), shape=(shape[1], shape[0]))
        assert [b.decode() for b in m["barcodes"][()]] == list(small.obs_names)
        assert [b.decode() for b in m["features/name"][()]] == list(small.var_names)
        assert set(m["features/feature_type"][()]) == {b"Gene Expression"}
        assert m["features/id"].shape == (small.n_vars,) and m["features/genome"].shape == (small.n_vars,)
    assert (X != small.X).nnz == 0
    # positions: every in-tissue spot plus off-tissue grid positions
    path = out / "spatial" / names[positions]
    if positions == "list":
        pos = pd.read_csv(path, header=None, names=["barcode", "in_tissue", "array_row", "array_col",
                                                    "pxl_row_in_fullres", "pxl_col_in_fullres"])
    elif positions == "csv":
        pos = pd.read_csv(path)
        assert list(pos.columns)[0] == "barcode"
    else:
        pos = pd.read_parquet(path)
    pos = pos.set_index("barcode")
    assert (pos["in_tissue"] == 0).sum() > 0
    tis = pos.loc[small.obs_names]
    assert (tis["in_tissue"] == 1).all()
    np.testing.assert_array_equal(tis["pxl_col_in_fullres"], small.obsm["spatial"][:, 0])
    np.testing.assert_array_equal(tis["pxl_row_in_fullres"], small.obsm["spatial"][:, 1])
    np.testing.assert_array_equal(tis["array_row"], small.obs["array_row"])
    sf = json.loads((out / "spatial" / "scalefactors_json.json").read_text())
    assert sf == pytest.approx(small.uns["spatial"][LIB]["scalefactors"])
    lab = pd.read_csv(out / "labels.tsv", sep="\t")
    assert list(lab.columns) == ["barcode", "annotation"]
    assert (lab.set_index("barcode").loc[small.obs_names, "annotation"] == small.obs["annotation"].astype(str).to_numpy()).all()
    with tifffile.TiffFile(out / "image.tif") as tif:
        page = tif.pages[0]
        assert page.is_tiled
        np.testing.assert_array_equal(page.asarray(), small.uns["spatial"][LIB]["images"]["fullres"])


def test_write_visium_jpeg_tiff_is_close(small, tmp_path):
    import tifffile

    out = write_visium(small, tmp_path / "outs")  # default: JPEG-compressed tiled pyramid
    full = small.uns["spatial"][LIB]["images"]["fullres"]
    with tifffile.TiffFile(out / "image.tif") as tif:
        page = tif.pages[0]
        assert page.is_tiled and page.compression == tifffile.COMPRESSION.JPEG
        img = page.asarray()
        assert img.shape == full.shape
        # JPEG drops the pixel noise; 16 x 16 block means agree closely
        h, w = (full.shape[0] // 16) * 16, (full.shape[1] // 16) * 16
        blocks = lambda x: x[:h, :w].astype(float).reshape(h // 16, 16, w // 16, 16, 3).mean((1, 3))  # noqa: E731
        assert np.abs(blocks(img) - blocks(full)).mean() < 1.5


def test_write_visium_refuses_and_forces(small, tmp_path):
    out = tmp_path / "outs"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(OutputExistsError):
        write_visium(small, out)
    with pytest.raises(OutputExistsError, match="not written by stmorph"):  # the user's folder: never replaced
        write_visium(small, out, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    mine = tmp_path / "mine"
    write_visium(small, mine, fullres="image.tif")
    with pytest.raises(OutputExistsError):
        write_visium(small, mine)
    write_visium(small, mine, force=True, fullres=None, positions="csv")  # what write_visium wrote: replaced
    assert not (mine / "image.tif").exists() and (mine / "filtered_feature_bc_matrix.h5").exists()
    (mine / "notes.txt").write_text("mine")  # a file the user added: the folder is no longer replaced
    with pytest.raises(OutputExistsError, match="notes.txt"):
        write_visium(small, mine, force=True, fullres=None)
    assert (mine / "notes.txt").read_text() == "mine"
    with pytest.raises(InputError):
        write_visium(small, tmp_path / "other", positions="xml")
    # an empty existing folder is fine
    (tmp_path / "empty").mkdir()
    write_visium(small, tmp_path / "empty", fullres=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "mine", "outs"]


def test_image_writer_replaces_only_its_own_tiff(tmp_path):
    """write_visium_hd's image beside outs/: force replaces a TIFF stmorph wrote, never another file."""
    from stmorph.datasets._write import _write_tiff, check_output_image

    theirs, ours = tmp_path / "scan.btf", tmp_path / "ours.btf"
    theirs.write_bytes(b"a slide from the scanner")
    _write_tiff(ours, np.zeros((64, 64, 3), dtype=np.uint8), "zlib")
    check_output_image(tmp_path / "absent.btf", force=False)
    for path in (theirs, ours):
        with pytest.raises(OutputExistsError, match="exists"):
            check_output_image(path, force=False)
    with pytest.raises(OutputExistsError, match="not written by stmorph"):
        check_output_image(theirs, force=True)
    check_output_image(ours, force=True)


def test_h5ad_and_reader_round_trip(small, tmp_path):
    path = tmp_path / "s.h5ad"
    small.write_h5ad(path)
    b = stmorph.read.h5ad(path)
    assert b.uns["synthetic"]["image_only"] == small.uns["synthetic"]["image_only"]
    np.testing.assert_array_equal(b.uns["spatial"][LIB]["images"]["fullres"], small.uns["spatial"][LIB]["images"]["fullres"])
    # the Space Ranger-like folder reads back through stmorph.read.visium with its labels
    out = write_visium(small, tmp_path / "outs", positions="csv", compression="zlib")
    c = stmorph.read.visium(out, image=out / "image.tif")
    assert c.n_obs == small.n_obs  # off-tissue positions are dropped by the reader
    c = c[small.obs_names]
    assert (c.X != small.X).nnz == 0
    np.testing.assert_array_equal(c.obsm["spatial"], small.obsm["spatial"])
    assert (c.obs["annotation"].astype(str).to_numpy() == small.obs["annotation"].astype(str).to_numpy()).all()


def test_strength_knobs():
    a = synthetic(600, n_genes=400, image=False, random_state=6, expression_only_strength=0.0)
    syn = a.uns["synthetic"]
    ereg, epar = syn["expression_only"], syn["parents"][syn["expression_only"]]
    L = _normalised(a)
    ann = a.obs["annotation"].to_numpy()
    for genes in (syn["region_genes"][ereg], syn["region_genes"][epar]):
        g = a.var_names.get_indexer(genes)
        assert abs(L[ann == ereg][:, g].mean() - L[ann == epar][:, g].mean()) < 0.15
    b = synthetic(600, n_genes=400, image=False, random_state=6)
    Lb = _normalised(b)
    g = b.var_names.get_indexer(syn["region_genes"][ereg])
    assert Lb[ann == ereg][:, g].mean() > Lb[ann == epar][:, g].mean() + 0.8
    assert b.uns["synthetic"]["params"]["expression_only_strength"] == 1.0
