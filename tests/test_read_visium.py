"""stmorph.read.visium: the three positions layouts, labels, images, every bad input, DLPFC 151673."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from PIL import Image

import stmorph as st
from stmorph.errors import DependencyError, ImageError, InputError

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
DLPFC = DATA / "dlpfc" / "151673"

N_SPOTS, N_GENES, FULLRES = 30, 12, (400, 300)  # (height, width) of the full-resolution image


# --------------------------------------------------------------------------- a tiny Space Ranger-like folder


def write_10x_h5(path, X, barcodes, ids, names, types=None, *, drop=()):
    """Write a 10x HDF5 v3 matrix (X: barcodes x features); ``drop`` leaves datasets out."""
    X = sp.csc_matrix(X.T)  # features x barcodes, stored column-compressed by barcode
    types = ["Gene Expression"] * len(ids) if types is None else types
    datasets = {
        "matrix/data": X.data.astype(np.int32),
        "matrix/indices": X.indices.astype(np.int64),
        "matrix/indptr": X.indptr.astype(np.int64),
        "matrix/shape": np.array(X.shape, dtype=np.int32),
        "matrix/barcodes": np.array(barcodes, dtype="S"),
        "matrix/features/id": np.array(ids, dtype="S"),
        "matrix/features/name": np.array(names, dtype="S"),
        "matrix/features/feature_type": np.array(types, dtype="S"),
        "matrix/features/genome": np.array(["GRCh38"] * len(ids), dtype="S"),
    }
    with h5py.File(path, "w") as f:
        for name, value in datasets.items():
            if name not in drop:
                f.create_dataset(name, data=value)


def make_spots(n=N_SPOTS, seed=0):
    rng = np.random.default_rng(seed)
    rows, cols = np.divmod(np.arange(n), 6)
    barcodes = [f"AAAC{i:04d}-1" for i in range(n)]
    pxl_row = 40.0 + rows * 60 + rng.uniform(-2, 2, n)  # within the 400 x 300 image
    pxl_col = 30.0 + cols * 45 + rng.uniform(-2, 2, n)
    return pd.DataFrame(
        {
            "barcode": barcodes,
            "in_tissue": np.ones(n, dtype=int),
            "array_row": rows,
            "array_col": cols * 2 + rows % 2,
            "pxl_row_in_fullres": pxl_row,
            "pxl_col_in_fullres": pxl_col,
        }
    )


def write_positions(spatial, pos: pd.DataFrame, layout: str):
    if layout == "list":
        pos.to_csv(spatial / "tissue_positions_list.csv", header=False, index=False)
    elif layout == "csv":
        pos.to_csv(spatial / "tissue_positions.csv", index=False)
    elif layout == "parquet":
        pos.to_parquet(spatial / "tissue_positions.parquet", index=False)
    else:
        raise AssertionError(layout)


def write_outs(root: Path, layout="list", *, n=N_SPOTS, n_off=4, labels=True, fullres=None, seed=0):
    """A Space Ranger outs/ folder: ``n`` in-tissue spots in the matrix and ``n_off`` off-tissue positions.

    Returns ``(folder, positions, counts)`` with the in-tissue positions and the dense counts written.
    """
    root.mkdir(parents=True, exist_ok=True)
    spatial = root / "spatial"
    spatial.mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    pos = make_spots(n + n_off, seed)
    pos.loc[n:, "in_tissue"] = 0
    counts = rng.poisson(2.0, size=(n, N_GENES)).astype(np.int32)
    ids = [f"ENSG{i:011d}" for i in range(N_GENES)]
    names = [f"GENE{i}" for i in range(N_GENES - 1)] + ["GENE0"]  # one duplicated symbol
    write_10x_h5(root / "filtered_feature_bc_matrix.h5", sp.csr_matrix(counts), pos.barcode[:n], ids, names)
    write_positions(spatial, pos.sample(frac=1, random_state=seed), layout)  # row order differs from the matrix
    sf = {"spot_diameter_fullres": 30.0, "tissue_hires_scalef": 0.5, "tissue_lowres_scalef": 0.1,
          "fiducial_diameter_fullres": 45.0}
    (spatial / "scalefactors_json.json").write_text(json.dumps(sf))
    h, w = FULLRES
    Image.fromarray(rng.integers(0, 255, (h // 2, w // 2, 3), dtype=np.uint8)).save(spatial / "tissue_hires_image.png")
    Image.fromarray(rng.integers(0, 255, (h // 10, w // 10, 3), dtype=np.uint8)).save(spatial / "tissue_lowres_image.png")
    if labels:
        lab = pd.DataFrame({"barcode": pos.barcode[: n - 2], "annotation": ["a", "b"] * ((n - 2) // 2)})
        lab.to_csv(root / "labels.tsv", sep="\t", index=False)
    if fullres is not None:
        img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        if fullres.endswith((".tif", ".tiff")):
            import tifffile

            tifffile.imwrite(root / fullres, img, tile=(64, 64))
        else:
            Image.fromarray(img).save(root / fullres)
    return root, pos.iloc[:n].reset_index(drop=True), counts


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


@pytest.fixture
def outs(tmp_path):
    return write_outs(tmp_path / "outs")


def read_err(exc_type, *args, **kwargs) -> str:
    """Call st.read.visium, expect ``exc_type``, return its one-line message."""
    with pytest.raises(exc_type) as info:
        st.read.visium(*args, **kwargs)
    text = str(info.value)
    assert "\n" not in text
    return text


# --------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("layout", ["list", "csv", "parquet"])
def test_each_positions_layout(tmp_path, layout):
    folder, pos, counts = write_outs(tmp_path / "sample" / "outs", layout)
    before = snapshot(folder)
    adata = st.read.visium(folder)
    assert snapshot(folder) == before  # nothing written into the input folder

    assert adata.shape == (N_SPOTS, N_GENES)
    assert sp.isspmatrix_csr(adata.X) and adata.X.dtype == np.float32
    assert list(adata.obs_names) == list(pos.barcode)  # matrix order
    np.testing.assert_array_equal(adata.X.toarray(), counts)
    # x = column, y = row, full-resolution pixels
    np.testing.assert_allclose(adata.obsm["spatial"], pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy())
    assert adata.obsm["spatial"].dtype == np.float64
    np.testing.assert_array_equal(adata.obs["array_row"], pos.array_row)
    np.testing.assert_array_equal(adata.obs["array_col"], pos.array_col)
    assert (adata.obs["in_tissue"] == 1).all()
    # gene symbols, unique, ids kept
    assert adata.var_names.is_unique and adata.var_names[-1] == "GENE0-1"
    assert adata.var["gene_ids"].iloc[-1] == f"ENSG{N_GENES - 1:011d}"
    lib = adata.uns["spatial"]["sample"]  # library id: the folder holding outs/
    assert lib["scalefactors"]["spot_diameter_fullres"] == 30.0
    assert lib["scalefactors"]["tissue_lowres_scalef"] == 0.1
    assert lib["images"]["hires"].shape == (200, 150, 3) and lib["images"]["hires"].dtype == np.uint8
    assert lib["images"]["lowres"].shape == (40, 30, 3)
    assert lib["metadata"]["technology"] == "visium"
    assert lib["metadata"]["spot_diameter_um"] == 55
    assert lib["metadata"]["source_image_path"] is None
    st.validate(adata)


def test_sample_folder_and_library_id(outs, tmp_path):
    folder, _, _ = outs
    adata = st.read.visium(tmp_path, library_id="S1")  # the folder holding outs/
    assert list(adata.uns["spatial"]) == ["S1"]


def test_list_file_with_header_is_accepted(outs):
    folder, pos, _ = outs
    f = folder / "spatial" / "tissue_positions_list.csv"
    df = pd.read_csv(f, header=None)
    df.columns = list(pos.columns)
    df.to_csv(f, index=False)
    assert st.read.visium(folder).n_obs == N_SPOTS


def test_in_tissue_only_false_keeps_matrix_barcodes(tmp_path):
    folder, pos, _ = write_outs(tmp_path / "outs")
    # put two off-tissue barcodes into the matrix, as a raw matrix would have them
    full = make_spots(N_SPOTS + 4)
    rng = np.random.default_rng(1)
    counts = rng.poisson(2.0, size=(N_SPOTS + 2, N_GENES))
    ids = [f"ENSG{i:011d}" for i in range(N_GENES)]
    write_10x_h5(folder / "filtered_feature_bc_matrix.h5", sp.csr_matrix(counts), full.barcode[: N_SPOTS + 2], ids, ids)
    assert st.read.visium(folder).n_obs == N_SPOTS
    adata = st.read.visium(folder, in_tissue_only=False)
    assert adata.n_obs == N_SPOTS + 2
    assert adata.obs["in_tissue"].sum() == N_SPOTS


def test_labels_auto_path_and_none(outs, tmp_path):
    folder, pos, _ = outs
    adata = st.read.visium(folder)
    ann = adata.obs["annotation"]
    assert isinstance(ann.dtype, pd.CategoricalDtype) and list(ann.cat.categories) == ["a", "b"]
    assert ann.isna().sum() == 2 and ann.iloc[0] == "a" and ann.iloc[1] == "b"
    assert "annotation" not in st.read.visium(folder, labels=None).obs
    other = tmp_path / "layers.tsv"
    pd.DataFrame({"barcode": pos.barcode, "layer": ["L1"] * N_SPOTS}).to_csv(other, sep="\t", index=False)
    (folder / "labels.tsv").unlink()
    assert "annotation" not in st.read.visium(folder).obs  # auto and no labels.tsv: nothing
    assert (st.read.visium(folder, labels=other).obs["annotation"] == "L1").all()


@pytest.mark.parametrize("fullres", ["image.tif", "image.png", "image.jpg"])
def test_full_resolution_image(tmp_path, fullres):
    folder, _, _ = write_outs(tmp_path / "outs", fullres=fullres)
    adata = st.read.visium(folder, image=folder / fullres)
    src = st._spatial.library(adata)["metadata"]["source_image_path"]
    assert src == str((folder / fullres).resolve())
    st.validate(adata, require_image=True)


def test_pyramidal_bigtiff(tmp_path):
    import tifffile

    folder, _, _ = write_outs(tmp_path / "outs")
    img = np.random.default_rng(0).integers(0, 255, (*FULLRES, 3), dtype=np.uint8)
    path = folder / "pyramid.tif"
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        tw.write(img, tile=(64, 64), subifds=1, compression="zlib")
        tw.write(img[::2, ::2], tile=(64, 64), subfiletype=1, compression="zlib")
    adata = st.read.visium(folder, image=path)
    assert st._spatial.library(adata)["metadata"]["source_image_path"].endswith("pyramid.tif")


def test_parquet_without_pyarrow(tmp_path, monkeypatch):
    folder, _, _ = write_outs(tmp_path / "outs", "parquet")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    text = read_err(DependencyError, folder)
    assert 'pip install "stmorph[parquet]"' in text and "tissue_positions.parquet" in text


# --------------------------------------------------------------------------- bad input


def test_missing_folder_and_files(outs, tmp_path):
    folder, _, _ = outs
    assert "not found" in read_err(InputError, tmp_path / "nowhere")
    before = snapshot(folder)
    for rel, what in [
        ("spatial/scalefactors_json.json", "scale factors file not found"),
        ("spatial/tissue_positions_list.csv", "no spot positions file"),
        ("filtered_feature_bc_matrix.h5", "count matrix not found"),
    ]:
        p = folder / rel
        data = p.read_bytes()
        p.unlink()
        text = read_err(InputError, folder)
        assert what in text and str(p if "positions" not in rel else p.parent) in text
        p.write_bytes(data)
    assert snapshot(folder).keys() == before.keys()


def test_missing_spatial_folder(outs):
    folder, _, _ = outs
    import shutil

    shutil.rmtree(folder / "spatial")
    assert "spatial/ folder" in read_err(InputError, folder)


def test_positions_missing_column(tmp_path):
    folder, pos, _ = write_outs(tmp_path / "outs", "csv")
    f = folder / "spatial" / "tissue_positions.csv"
    pd.read_csv(f).drop(columns="pxl_col_in_fullres").to_csv(f, index=False)
    text = read_err(InputError, folder)
    assert str(f) in text and "'pxl_col_in_fullres'" in text


def test_positions_wrong_column_count(outs):
    folder, _, _ = outs
    f = folder / "spatial" / "tissue_positions_list.csv"
    pd.read_csv(f, header=None).iloc[:, :5].to_csv(f, header=False, index=False)
    text = read_err(InputError, folder)
    assert str(f) in text and "5 column(s)" in text


def test_positions_non_numeric(tmp_path):
    folder, _, _ = write_outs(tmp_path / "outs", "csv")
    f = folder / "spatial" / "tissue_positions.csv"
    df = pd.read_csv(f)
    df["pxl_row_in_fullres"] = df["pxl_row_in_fullres"].astype(object)
    df.loc[3, "pxl_row_in_fullres"] = "abc"
    df.to_csv(f, index=False)
    text = read_err(InputError, folder)
    assert "'pxl_row_in_fullres'" in text and "'abc'" in text


def test_barcodes_in_matrix_not_in_positions(outs):
    folder, pos, _ = outs
    f = folder / "spatial" / "tissue_positions_list.csv"
    df = pd.read_csv(f, header=None)
    df[df[0] != pos.barcode[5]].to_csv(f, header=False, index=False)
    text = read_err(InputError, folder)
    assert "1 of 30 barcodes" in text and pos.barcode[5] in text and str(f) in text


def test_in_tissue_positions_not_in_matrix(outs):
    folder, pos, _ = outs
    f = folder / "spatial" / "tissue_positions_list.csv"
    df = pd.read_csv(f, header=None)
    df[1] = 1  # the off-tissue spots now claim to be in tissue, but the matrix lacks them
    df.to_csv(f, header=False, index=False)
    text = read_err(InputError, folder)
    assert "4 in-tissue spots" in text and "filtered_feature_bc_matrix.h5" in text


def test_duplicated_barcodes(outs):
    folder, pos, counts = outs
    f = folder / "spatial" / "tissue_positions_list.csv"
    df = pd.read_csv(f, header=None)
    pd.concat([df, df.iloc[:2]]).to_csv(f, header=False, index=False)
    text = read_err(InputError, folder)
    assert "duplicated" in text and str(f) in text

    folder2, pos2, counts2 = write_outs(folder.parent / "outs2")
    bcs = list(pos2.barcode)
    bcs[3] = bcs[2]
    ids = [f"ENSG{i:011d}" for i in range(N_GENES)]
    write_10x_h5(folder2 / "filtered_feature_bc_matrix.h5", sp.csr_matrix(counts2), bcs, ids, ids)
    text = read_err(InputError, folder2)
    assert "duplicated" in text and "filtered_feature_bc_matrix.h5" in text and bcs[2] in text


def test_spots_outside_the_image(outs):
    folder, _, _ = outs
    small = folder / "small.png"
    Image.fromarray(np.zeros((100, 100, 3), np.uint8)).save(small)
    text = read_err(InputError, folder, image=small)
    assert str(small) in text and "outside the 100 x 100 px image" in text and "e.g. spot" in text


def test_unreadable_and_truncated_images(tmp_path):
    folder, _, _ = write_outs(tmp_path / "outs", fullres="image.tif")
    garbage = folder / "garbage.tif"
    garbage.write_bytes(b"this is not an image at all")
    assert str(garbage) in read_err(ImageError, folder, image=garbage)
    for name in ("image.tif",):
        data = (folder / name).read_bytes()
        cut = folder / f"cut_{name}"
        cut.write_bytes(data[: len(data) // 2])
        assert str(cut) in read_err(ImageError, folder, image=cut)
    png = folder / "full.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (*FULLRES, 3), dtype=np.uint8)).save(png)
    cut = folder / "cut.png"
    cut.write_bytes(png.read_bytes()[:5000])
    assert str(cut) in read_err(ImageError, folder, image=cut)
    assert "image not found" in read_err(InputError, folder, image=folder / "absent.tif")


def test_truncated_lowres_png(outs):
    folder, _, _ = outs
    f = folder / "spatial" / "tissue_lowres_image.png"
    f.write_bytes(f.read_bytes()[:200])
    text = read_err(ImageError, folder)
    assert str(f) in text and "truncated" in text


def test_h5_problems(outs):
    folder, pos, counts = outs
    h5 = folder / "filtered_feature_bc_matrix.h5"
    ids = [f"ENSG{i:011d}" for i in range(N_GENES)]
    write_10x_h5(h5, sp.csr_matrix(counts), pos.barcode, ids, ids, drop=("matrix/indptr",))
    text = read_err(InputError, folder)
    assert "'matrix/indptr'" in text and str(h5) in text

    h5.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)  # an HDF5 signature, then nothing: truncated
    text = read_err(InputError, folder)
    assert "HDF5" in text and str(h5) in text

    write_10x_h5(h5, sp.csr_matrix(counts), pos.barcode, ids, ids, drop=("matrix/features/name",))
    assert list(st.read.visium(folder).var_names) == ids  # no names: ids as var_names

    write_10x_h5(h5, sp.csr_matrix(counts), pos.barcode, ids, ids, types=["Antibody Capture"] * N_GENES)
    assert "Gene Expression" in read_err(InputError, folder)


def test_empty_matrix(outs):
    folder, pos, counts = outs
    h5 = folder / "filtered_feature_bc_matrix.h5"
    ids = [f"ENSG{i:011d}" for i in range(N_GENES)]
    write_10x_h5(h5, sp.csr_matrix(np.zeros_like(counts)), pos.barcode, ids, ids)
    text = read_err(InputError, folder)
    assert "no counts" in text and str(h5) in text

    write_10x_h5(h5, sp.csr_matrix((0, N_GENES)), [], ids, ids)
    text = read_err(InputError, folder)
    assert "count matrix is empty (0 spots x 12 genes)" in text and str(h5) in text


def test_no_spot_in_tissue(outs):
    folder, _, _ = outs
    f = folder / "spatial" / "tissue_positions_list.csv"
    df = pd.read_csv(f, header=None)
    df[1] = 0
    df.to_csv(f, header=False, index=False)
    assert "no spot of filtered_feature_bc_matrix.h5 is in tissue" in read_err(InputError, folder)
    assert st.read.visium(folder, in_tissue_only=False).n_obs == N_SPOTS


def test_bad_scalefactors(outs):
    folder, _, _ = outs
    f = folder / "spatial" / "scalefactors_json.json"
    f.write_text("{not json")
    assert "not valid JSON" in read_err(InputError, folder)
    f.write_text(json.dumps({"tissue_hires_scalef": 0.5, "tissue_lowres_scalef": 0.1}))
    text = read_err(InputError, folder)
    assert "spot_diameter_fullres" in text and str(f) in text
    f.write_text(json.dumps({"spot_diameter_fullres": 30.0, "tissue_lowres_scalef": 0.1}))
    assert "tissue_hires_scalef" in read_err(InputError, folder)


def test_labels_problems(outs, tmp_path):
    folder, pos, _ = outs
    bad = tmp_path / "bad.tsv"
    pd.DataFrame({"barcode": ["XXX-1", "YYY-1"], "layer": ["L1", "L2"]}).to_csv(bad, sep="\t", index=False)
    assert "none of the 2 labelled spots" in read_err(InputError, folder, labels=bad)
    pd.DataFrame({"barcode": [pos.barcode[0]] * 2, "layer": ["L1", "L2"]}).to_csv(bad, sep="\t", index=False)
    assert "duplicated" in read_err(InputError, folder, labels=bad)
    bad.write_text("barcode\n" + "\n".join(pos.barcode) + "\n")
    assert "two columns" in read_err(InputError, folder, labels=bad)
    assert "labels file not found" in read_err(InputError, folder, labels=tmp_path / "absent.tsv")


# --------------------------------------------------------------------------- real data


@pytest.mark.realdata
@pytest.mark.skipif(not DLPFC.exists(), reason="../shared/data/dlpfc/151673 not available")
def test_dlpfc_151673():
    before = snapshot(DLPFC)
    adata = st.read.visium(DLPFC)
    assert snapshot(DLPFC) == before
    assert adata.shape == (3639, 5000)
    assert adata.var_names.is_unique and adata.var_names[0].startswith("ENSG")
    assert sp.isspmatrix_csr(adata.X) and adata.X.dtype == np.float32
    lib = adata.uns["spatial"]["151673"]
    assert list(lib["images"]) == ["lowres"] and lib["images"]["lowres"].shape == (600, 600, 3)
    assert lib["metadata"]["source_image_path"] is None
    assert lib["scalefactors"]["spot_diameter_fullres"] == pytest.approx(96.4008, abs=1e-3)
    ann = adata.obs["annotation"]
    assert set(ann.cat.categories) == {"L1", "L2", "L3", "L4", "L5", "L6", "WM"}
    assert ann.notna().sum() == 3611
    # spots lie on the lowres image once scaled
    xy = adata.obsm["spatial"] * lib["scalefactors"]["tissue_lowres_scalef"]
    assert xy.min() > 0 and xy.max() < 600
    st.validate(adata)


def test_gene_expression_features_only(outs):
    folder, pos, counts = outs
    ids = [f"ENSG{i:011d}" for i in range(N_GENES)]
    types = ["Gene Expression"] * (N_GENES - 2) + ["Antibody Capture"] * 2
    write_10x_h5(folder / "filtered_feature_bc_matrix.h5", sp.csr_matrix(counts), pos.barcode, ids, ids, types=types)
    adata = st.read.visium(folder)
    assert adata.n_vars == N_GENES - 2 and (adata.var["feature_types"] == "Gene Expression").all()
    np.testing.assert_array_equal(adata.X.toarray(), counts[:, : N_GENES - 2])


def test_inconsistent_h5(outs):
    folder, pos, counts = outs
    ids = [f"ENSG{i:011d}" for i in range(N_GENES)]
    h5 = folder / "filtered_feature_bc_matrix.h5"
    write_10x_h5(h5, sp.csr_matrix(counts), pos.barcode, ids, ids)
    with h5py.File(h5, "a") as f:
        del f["matrix/barcodes"]
        f["matrix/barcodes"] = np.array(pos.barcode[:-1], dtype="S")
    text = read_err(InputError, folder)
    assert "'matrix/barcodes' has 29 entries but shape says 30 barcodes" in text and str(h5) in text
