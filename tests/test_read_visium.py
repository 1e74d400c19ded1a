"""stmorph.read.visium: the three positions layouts, labels, images, every bad input, DLPFC 151673."""

from __future__ import annotations

import json
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

N_SPOTS, N_GENES = 40, 40


# --------------------------------------------------------------------------- Space Ranger-like folders
# Folders are written by stmorph.datasets.write_visium from a small synthetic section; bad inputs are
# made by editing what it wrote (h5py for the matrix, pandas for the tables).


@pytest.fixture(scope="module")
def tissue():
    return st.datasets.synthetic(N_SPOTS, n_genes=N_GENES, n_program_genes=3, image_size=300, random_state=0)


def write_outs(adata, folder: Path, layout="list", **kwargs) -> Path:
    return st.datasets.write_visium(adata, folder, positions=layout, **kwargs)


def h5_set(h5: Path, name: str, value) -> None:
    """Replace (or with value None, delete) one dataset of a 10x HDF5 file."""
    with h5py.File(h5, "a") as f:
        del f[name]
        if value is not None:
            f[name] = value


def h5_counts(h5: Path, X, barcodes) -> None:
    """Replace the matrix (spots x genes, any sparsity) and the barcodes of a 10x HDF5 file."""
    X = sp.csr_matrix(X)
    h5_set(h5, "matrix/data", X.data.astype(np.int32))
    h5_set(h5, "matrix/indices", X.indices.astype(np.int64))
    h5_set(h5, "matrix/indptr", X.indptr.astype(np.int64))
    h5_set(h5, "matrix/shape", np.array([X.shape[1], X.shape[0]], dtype=np.int32))
    h5_set(h5, "matrix/barcodes", np.array(list(barcodes), dtype="S"))


def positions_file(folder: Path) -> Path:
    return folder / "spatial" / "tissue_positions_list.csv"


def read_list(folder: Path) -> pd.DataFrame:
    return pd.read_csv(positions_file(folder), header=None)


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


@pytest.fixture
def outs(tissue, tmp_path):
    return write_outs(tissue, tmp_path / "outs", fullres=None)


def read_err(exc_type, *args, **kwargs) -> str:
    """Call st.read.visium, expect ``exc_type``, return its one-line message."""
    with pytest.raises(exc_type) as info:
        st.read.visium(*args, **kwargs)
    text = str(info.value)
    assert "\n" not in text
    return text


# --------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("layout", ["list", "csv", "parquet"])
def test_each_positions_layout(tissue, tmp_path, layout):
    folder = write_outs(tissue, tmp_path / "sample" / "outs", layout, fullres=None)
    assert (folder / "spatial" / {"list": "tissue_positions_list.csv", "csv": "tissue_positions.csv",
                                  "parquet": "tissue_positions.parquet"}[layout]).exists()
    before = snapshot(folder)
    adata = st.read.visium(folder)
    assert snapshot(folder) == before  # nothing written into the input folder

    assert adata.shape == (N_SPOTS, tissue.n_vars)
    assert sp.isspmatrix_csr(adata.X) and adata.X.dtype == np.float32
    assert list(adata.obs_names) == list(tissue.obs_names)  # matrix order, whatever the positions order
    np.testing.assert_array_equal(adata.X.toarray(), tissue.X.toarray())
    # x = column, y = row, full-resolution pixels (the writer keeps whole pixels)
    np.testing.assert_allclose(adata.obsm["spatial"], np.rint(tissue.obsm["spatial"]))
    assert adata.obsm["spatial"].dtype == np.float64
    for col in ("array_row", "array_col", "in_tissue"):
        np.testing.assert_array_equal(adata.obs[col], tissue.obs[col])
    assert list(adata.var_names) == list(tissue.var_names)
    assert list(adata.var["gene_ids"]) == list(tissue.var["gene_ids"])
    lib = adata.uns["spatial"]["sample"]  # library id: the folder holding outs/
    src = st._spatial.library(tissue)
    assert lib["scalefactors"]["spot_diameter_fullres"] == pytest.approx(src["scalefactors"]["spot_diameter_fullres"])
    assert lib["scalefactors"]["tissue_lowres_scalef"] == pytest.approx(src["scalefactors"]["tissue_lowres_scalef"])
    assert lib["images"]["hires"].shape == src["images"]["hires"].shape and lib["images"]["hires"].dtype == np.uint8
    np.testing.assert_array_equal(lib["images"]["lowres"], src["images"]["lowres"])
    assert lib["metadata"]["technology"] == "visium"
    assert lib["metadata"]["spot_diameter_um"] == 55
    assert lib["metadata"]["source_image_path"] is None
    # labels.tsv written by write_visium -> obs["annotation"]
    assert (adata.obs["annotation"].astype(str) == tissue.obs["annotation"].astype(str)).all()
    st.validate(adata)


def test_sample_folder_and_library_id(outs, tmp_path):
    adata = st.read.visium(tmp_path, library_id="S1")  # the folder holding outs/
    assert list(adata.uns["spatial"]) == ["S1"]


def test_off_tissue_positions_are_listed(outs):
    df = read_list(outs)
    assert (df[1] == 0).sum() > 0  # the writer lists off-tissue spots, as Space Ranger does
    assert st.read.visium(outs).n_obs == N_SPOTS


def test_list_file_with_header_is_accepted(outs):
    df = read_list(outs)
    df.columns = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]
    df.to_csv(positions_file(outs), index=False)
    assert st.read.visium(outs).n_obs == N_SPOTS


def test_in_tissue_only_false_keeps_matrix_barcodes(tissue, tmp_path):
    adata = tissue.copy()
    adata.obs["in_tissue"] = np.r_[np.zeros(3, int), np.ones(N_SPOTS - 3, int)]
    folder = write_outs(adata, tmp_path / "outs", fullres=None)  # a matrix holding off-tissue spots too
    assert st.read.visium(folder).n_obs == N_SPOTS - 3
    everything = st.read.visium(folder, in_tissue_only=False)
    assert everything.n_obs == N_SPOTS and everything.obs["in_tissue"].sum() == N_SPOTS - 3


def test_labels_auto_path_and_none(tissue, tmp_path):
    adata = tissue.copy()
    adata.obs["annotation"] = adata.obs["annotation"].astype(object)
    adata.obs.iloc[:2, adata.obs.columns.get_loc("annotation")] = np.nan
    folder = write_outs(adata, tmp_path / "outs", fullres=None)
    ann = st.read.visium(folder).obs["annotation"]
    assert isinstance(ann.dtype, pd.CategoricalDtype)
    assert set(ann.cat.categories) == set(tissue.obs["annotation"].iloc[2:])
    assert ann.isna().sum() == 2 and (ann.iloc[2:].astype(str) == tissue.obs["annotation"].iloc[2:].astype(str)).all()
    assert "annotation" not in st.read.visium(folder, labels=None).obs
    other = tmp_path / "layers.tsv"
    pd.DataFrame({"barcode": tissue.obs_names, "layer": ["L1"] * N_SPOTS}).to_csv(other, sep="\t", index=False)
    (folder / "labels.tsv").unlink()
    assert "annotation" not in st.read.visium(folder).obs  # auto and no labels.tsv: nothing
    assert (st.read.visium(folder, labels=other).obs["annotation"] == "L1").all()


@pytest.mark.parametrize("fmt", ["tif", "png", "jpg"])
def test_full_resolution_image(tissue, tmp_path, fmt):
    folder = write_outs(tissue, tmp_path / "outs", fullres="image.tif")  # tiled pyramidal TIFF
    image = folder / "image.tif"
    if fmt != "tif":
        image = tmp_path / f"image.{fmt}"
        Image.fromarray(st._spatial.library(tissue)["images"]["fullres"]).save(image)
    before = snapshot(folder)
    adata = st.read.visium(folder, image=image)
    assert snapshot(folder) == before
    assert st._spatial.library(adata)["metadata"]["source_image_path"] == str(image.resolve())
    st.validate(adata, require_image=True)


def test_pyramidal_bigtiff(tissue, tmp_path):
    import tifffile

    folder = write_outs(tissue, tmp_path / "outs", fullres=None)
    img = st._spatial.library(tissue)["images"]["fullres"]
    path = tmp_path / "pyramid.tif"
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        tw.write(img, tile=(64, 64), subifds=1, compression="zlib")
        tw.write(img[::2, ::2], tile=(64, 64), subfiletype=1, compression="zlib")
    adata = st.read.visium(folder, image=path)
    assert st._spatial.library(adata)["metadata"]["source_image_path"] == str(path.resolve())


def test_parquet_without_pyarrow(tissue, tmp_path, monkeypatch):
    folder = write_outs(tissue, tmp_path / "outs", "parquet", fullres=None)
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    text = read_err(DependencyError, folder)
    assert 'pip install "stmorph[parquet]"' in text and "tissue_positions.parquet" in text


# --------------------------------------------------------------------------- bad input


def test_missing_folder_and_files(outs, tmp_path):
    assert "not found" in read_err(InputError, tmp_path / "nowhere")
    before = snapshot(outs)
    for rel, what in [
        ("spatial/scalefactors_json.json", "scale factors file not found"),
        ("spatial/tissue_positions_list.csv", "no spot positions file"),
        ("filtered_feature_bc_matrix.h5", "count matrix not found"),
    ]:
        p = outs / rel
        data = p.read_bytes()
        p.unlink()
        text = read_err(InputError, outs)
        assert what in text and str(p if "positions" not in rel else p.parent) in text
        p.write_bytes(data)
    assert snapshot(outs).keys() == before.keys()


def test_missing_spatial_folder(outs):
    import shutil

    shutil.rmtree(outs / "spatial")
    assert "spatial/ folder" in read_err(InputError, outs)


def test_positions_missing_column(tissue, tmp_path):
    folder = write_outs(tissue, tmp_path / "outs", "csv", fullres=None)
    f = folder / "spatial" / "tissue_positions.csv"
    pd.read_csv(f).drop(columns="pxl_col_in_fullres").to_csv(f, index=False)
    text = read_err(InputError, folder)
    assert str(f) in text and "'pxl_col_in_fullres'" in text


def test_positions_wrong_column_count(outs):
    read_list(outs).iloc[:, :5].to_csv(positions_file(outs), header=False, index=False)
    text = read_err(InputError, outs)
    assert str(positions_file(outs)) in text and "5 column(s)" in text


def test_positions_non_numeric(tissue, tmp_path):
    folder = write_outs(tissue, tmp_path / "outs", "csv", fullres=None)
    f = folder / "spatial" / "tissue_positions.csv"
    df = pd.read_csv(f)
    df["pxl_row_in_fullres"] = df["pxl_row_in_fullres"].astype(object)
    df.loc[3, "pxl_row_in_fullres"] = "abc"
    df.to_csv(f, index=False)
    text = read_err(InputError, folder)
    assert "'pxl_row_in_fullres'" in text and "'abc'" in text


def test_barcodes_in_matrix_not_in_positions(outs, tissue):
    df = read_list(outs)
    gone = tissue.obs_names[5]
    df[df[0] != gone].to_csv(positions_file(outs), header=False, index=False)
    text = read_err(InputError, outs)
    assert f"1 of {N_SPOTS} barcodes" in text and gone in text and str(positions_file(outs)) in text


def test_in_tissue_positions_not_in_matrix(outs):
    df = read_list(outs)
    n_off = int((df[1] == 0).sum())
    df[1] = 1  # the off-tissue spots now claim to be in tissue, but the matrix lacks them
    df.to_csv(positions_file(outs), header=False, index=False)
    text = read_err(InputError, outs)
    assert f"{n_off} in-tissue spots" in text and "filtered_feature_bc_matrix.h5" in text


def test_duplicated_barcodes(outs, tissue):
    df = read_list(outs)
    pd.concat([df, df.iloc[:2]]).to_csv(positions_file(outs), header=False, index=False)
    text = read_err(InputError, outs)
    assert "duplicated" in text and str(positions_file(outs)) in text

    df.to_csv(positions_file(outs), header=False, index=False)
    bcs = list(tissue.obs_names)
    bcs[3] = bcs[2]
    h5 = outs / "filtered_feature_bc_matrix.h5"
    h5_set(h5, "matrix/barcodes", np.array(bcs, dtype="S"))
    text = read_err(InputError, outs)
    assert "duplicated" in text and str(h5) in text and bcs[2] in text


def test_spots_outside_the_image(outs):
    small = outs.parent / "small.png"
    Image.fromarray(np.zeros((100, 100, 3), np.uint8)).save(small)
    text = read_err(InputError, outs, image=small)
    assert str(small) in text and "outside the 100 x 100 px image" in text and "e.g. spot" in text


def test_unreadable_and_truncated_images(tissue, tmp_path):
    folder = write_outs(tissue, tmp_path / "outs", fullres="image.tif")
    garbage = tmp_path / "garbage.tif"
    garbage.write_bytes(b"this is not an image at all")
    assert str(garbage) in read_err(ImageError, folder, image=garbage)
    data = (folder / "image.tif").read_bytes()
    cut = tmp_path / "cut.tif"
    cut.write_bytes(data[: len(data) // 2])
    assert str(cut) in read_err(ImageError, folder, image=cut)
    png = tmp_path / "full.png"
    Image.fromarray(st._spatial.library(tissue)["images"]["fullres"]).save(png)
    cut = tmp_path / "cut.png"
    cut.write_bytes(png.read_bytes()[:5000])
    assert str(cut) in read_err(ImageError, folder, image=cut)
    assert "image not found" in read_err(InputError, folder, image=tmp_path / "absent.tif")


def test_truncated_lowres_png(outs):
    f = outs / "spatial" / "tissue_lowres_image.png"
    f.write_bytes(f.read_bytes()[:200])
    text = read_err(ImageError, outs)
    assert str(f) in text and "truncated" in text


def test_h5_problems(outs, tissue):
    h5 = outs / "filtered_feature_bc_matrix.h5"
    data = h5.read_bytes()
    h5_set(h5, "matrix/indptr", None)
    text = read_err(InputError, outs)
    assert "'matrix/indptr'" in text and str(h5) in text

    h5.write_bytes(data[:2000])  # truncated
    text = read_err(InputError, outs)
    assert "HDF5" in text and str(h5) in text

    h5.write_bytes(data)
    h5_set(h5, "matrix/features/name", None)  # no symbols: ids as var_names
    assert list(st.read.visium(outs).var_names) == list(tissue.var["gene_ids"])

    h5_set(h5, "matrix/features/feature_type", np.array(["Antibody Capture"] * tissue.n_vars, dtype="S"))
    assert "Gene Expression" in read_err(InputError, outs)


def test_duplicated_gene_symbols_made_unique(outs, tissue):
    names = list(tissue.var_names)
    names[-1] = names[0]
    h5_set(outs / "filtered_feature_bc_matrix.h5", "matrix/features/name", np.array(names, dtype="S"))
    adata = st.read.visium(outs)
    assert adata.var_names.is_unique and adata.var_names[-1] == f"{names[0]}-1"
    assert adata.var["gene_ids"].iloc[-1] == tissue.var["gene_ids"].iloc[-1]


def test_empty_matrix(outs, tissue):
    h5 = outs / "filtered_feature_bc_matrix.h5"
    h5_counts(h5, sp.csr_matrix(tissue.shape), tissue.obs_names)
    text = read_err(InputError, outs)
    assert "no counts" in text and str(h5) in text

    h5_counts(h5, sp.csr_matrix((0, tissue.n_vars)), [])
    text = read_err(InputError, outs)
    assert f"count matrix is empty (0 spots x {tissue.n_vars} genes)" in text and str(h5) in text


def test_no_spot_in_tissue(outs):
    df = read_list(outs)
    df[1] = 0
    df.to_csv(positions_file(outs), header=False, index=False)
    assert "no spot of filtered_feature_bc_matrix.h5 is in tissue" in read_err(InputError, outs)
    assert st.read.visium(outs, in_tissue_only=False).n_obs == N_SPOTS


def test_bad_scalefactors(outs):
    f = outs / "spatial" / "scalefactors_json.json"
    f.write_text("{not json")
    assert "not valid JSON" in read_err(InputError, outs)
    f.write_text(json.dumps({"tissue_hires_scalef": 0.5, "tissue_lowres_scalef": 0.1}))
    text = read_err(InputError, outs)
    assert "spot_diameter_fullres" in text and str(f) in text
    f.write_text(json.dumps({"spot_diameter_fullres": 30.0, "tissue_lowres_scalef": 0.1}))
    assert "tissue_hires_scalef" in read_err(InputError, outs)


def test_labels_problems(outs, tissue, tmp_path):
    bad = tmp_path / "bad.tsv"
    pd.DataFrame({"barcode": ["XXX-1", "YYY-1"], "layer": ["L1", "L2"]}).to_csv(bad, sep="\t", index=False)
    assert "none of the 2 labelled spots" in read_err(InputError, outs, labels=bad)
    pd.DataFrame({"barcode": [tissue.obs_names[0]] * 2, "layer": ["L1", "L2"]}).to_csv(bad, sep="\t", index=False)
    assert "duplicated" in read_err(InputError, outs, labels=bad)
    bad.write_text("barcode\n" + "\n".join(tissue.obs_names) + "\n")
    assert "two columns" in read_err(InputError, outs, labels=bad)
    assert "labels file not found" in read_err(InputError, outs, labels=tmp_path / "absent.tsv")


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


def test_gene_expression_features_only(outs, tissue):
    types = ["Gene Expression"] * (tissue.n_vars - 2) + ["Antibody Capture"] * 2
    h5_set(outs / "filtered_feature_bc_matrix.h5", "matrix/features/feature_type", np.array(types, dtype="S"))
    adata = st.read.visium(outs)
    assert adata.n_vars == tissue.n_vars - 2 and (adata.var["feature_types"] == "Gene Expression").all()
    np.testing.assert_array_equal(adata.X.toarray(), tissue.X.toarray()[:, :-2])


def test_inconsistent_h5(outs, tissue):
    h5 = outs / "filtered_feature_bc_matrix.h5"
    h5_set(h5, "matrix/barcodes", np.array(list(tissue.obs_names[:-1]), dtype="S"))
    text = read_err(InputError, outs)
    assert f"'matrix/barcodes' has {N_SPOTS - 1} entries but shape says {N_SPOTS} barcodes" in text
    assert str(h5) in text


def test_command_line_prints_one_line_and_exits_non_zero(outs, tmp_path, capsys):
    from stmorph.cli import main

    df = read_list(outs)
    pd.concat([df, df.iloc[:1]]).to_csv(positions_file(outs), header=False, index=False)
    before = snapshot(outs)
    rc = main(["run", str(outs), "--out", str(tmp_path / "result")])
    err = capsys.readouterr().err
    assert rc != 0
    assert err.count("\n") == 1 and "Traceback" not in err
    assert str(positions_file(outs)) in err and "duplicated" in err
    assert snapshot(outs) == before and not (tmp_path / "result").exists()


def test_scale_factors_that_do_not_fit_the_images(outs):
    f = outs / "spatial" / "scalefactors_json.json"
    sf = json.loads(f.read_text())
    sf["tissue_lowres_scalef"] *= 5  # as if taken from another run
    f.write_text(json.dumps(sf))
    text = read_err(InputError, outs)
    assert "outside tissue_lowres_image.png" in text and str(f) in text
