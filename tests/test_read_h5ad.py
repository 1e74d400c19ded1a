"""stmorph.read.h5ad: stmorph and scanpy-style files are read and validated; bad files named."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import stmorph as st
from stmorph.errors import InputError

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
DLPFC = DATA / "dlpfc" / "151673"


def scanpy_like(n=25, g=10, seed=0) -> ad.AnnData:
    """An AnnData laid out as ``scanpy.read_visium`` makes it, with a dense X as some users save it."""
    rng = np.random.default_rng(seed)
    adata = ad.AnnData(
        X=rng.poisson(1.5, (n, g)).astype(np.float32),
        obs=pd.DataFrame({"in_tissue": np.ones(n, int), "array_row": np.arange(n) // 5,
                          "array_col": np.arange(n) % 5, "layer": ["L1", "L2", "L3", "L1", "L2"] * (n // 5)},
                         index=[f"AAAC{i:04d}-1" for i in range(n)]),
        var=pd.DataFrame({"gene_ids": [f"ENSG{j}" for j in range(g)], "feature_types": "Gene Expression"},
                         index=[f"G{j}" for j in range(g)]),
    )
    adata.obsm["spatial"] = rng.integers(100, 2000, (n, 2))  # scanpy keeps integer pixels
    adata.uns["spatial"] = {"V1_Sample": {
        "images": {"hires": rng.random((200, 200, 3), dtype=np.float32),  # matplotlib imread floats
                   "lowres": rng.random((60, 60, 3), dtype=np.float32)},
        "scalefactors": {"spot_diameter_fullres": 89.4, "tissue_hires_scalef": 0.1, "tissue_lowres_scalef": 0.03,
                         "fiducial_diameter_fullres": 144.0},
        "metadata": {"chemistry_description": "Spatial 3' v1", "software_version": "spaceranger-1.2.0"},
    }}
    adata.obs["annotation"] = adata.obs["layer"].astype(str)  # not categorical yet
    return adata


def test_scanpy_style_file(tmp_path):
    path = tmp_path / "scanpy.h5ad"
    scanpy_like().write_h5ad(path)
    adata = st.read.h5ad(path)
    assert sp.isspmatrix_csr(adata.X)
    assert adata.obsm["spatial"].dtype == np.float64
    assert isinstance(adata.obs["annotation"].dtype, pd.CategoricalDtype)
    assert st._spatial.library_id(adata) == "V1_Sample"
    with pytest.raises(InputError, match="no full-resolution image"):
        st.read.h5ad(path, require_image=True)


def test_roundtrip_of_a_reader_result(tmp_path):
    adata = scanpy_like()
    adata.X = sp.csr_matrix(adata.X)
    img = tmp_path / "he.png"
    from PIL import Image

    Image.fromarray(np.zeros((2100, 2100, 3), np.uint8)).save(img)
    adata.uns["spatial"]["V1_Sample"]["metadata"]["source_image_path"] = str(img)
    path = tmp_path / "a.h5ad"
    adata.write_h5ad(path)
    back = st.read.h5ad(path, require_image=True)
    np.testing.assert_array_equal(back.X.toarray(), adata.X.toarray())


def test_invalid_content_lists_problems_and_names_the_file(tmp_path):
    adata = scanpy_like()
    del adata.obsm["spatial"]
    del adata.uns["spatial"]["V1_Sample"]["scalefactors"]["spot_diameter_fullres"]
    path = tmp_path / "bad.h5ad"
    adata.write_h5ad(path)
    with pytest.raises(InputError) as info:
        st.read.h5ad(path)
    text = str(info.value)
    assert text.startswith(str(path)) and "2 problems" in text and "\n" not in text
    assert 'obsm["spatial"] is missing' in text and "spot_diameter_fullres" in text


def test_unreadable_files(tmp_path):
    with pytest.raises(InputError, match=r"\.h5ad file not found"):
        st.read.h5ad(tmp_path / "absent.h5ad")
    text_file = tmp_path / "text.h5ad"
    text_file.write_text("not hdf5")
    with pytest.raises(InputError, match="cannot be read as an .h5ad file"):
        st.read.h5ad(text_file)
    good = tmp_path / "good.h5ad"
    scanpy_like().write_h5ad(good)
    cut = tmp_path / "cut.h5ad"
    cut.write_bytes(good.read_bytes()[:4000])
    with pytest.raises(InputError) as info:
        st.read.h5ad(cut)
    assert str(cut) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.realdata
@pytest.mark.skipif(not DLPFC.exists(), reason="../shared/data/dlpfc/151673 not available")
def test_dlpfc_roundtrip(tmp_path):
    adata = st.read.visium(DLPFC)
    path = tmp_path / "151673.h5ad"
    adata.write_h5ad(path)
    back = st.read.h5ad(path)
    assert back.shape == (3639, 5000)
    assert back.uns["spatial"]["151673"]["metadata"]["source_image_path"] is None
    assert (back.obs["annotation"].astype(str) == adata.obs["annotation"].astype(str)).all()


def test_in_memory_anndata():
    adata = scanpy_like()
    out = st.read.h5ad(adata)
    assert out is adata and sp.isspmatrix_csr(adata.X) and adata.obsm["spatial"].dtype == np.float64
    del adata.obsm["spatial"]
    with pytest.raises(InputError, match=r'obsm\["spatial"\] is missing'):
        st.read.h5ad(adata)


def test_h5ad_with_image_records_it_after_checking_spots(tmp_path):
    from PIL import Image

    from stmorph import datasets, read
    from stmorph._outputs import write_h5ad
    from stmorph.errors import InputError

    tissue = datasets.synthetic(60, n_genes=300, random_state=2)
    full = tissue.uns["spatial"]["synthetic"]["images"]["fullres"]
    Image.fromarray(full).save(tmp_path / "he.png")
    Image.fromarray(full[:20, :20]).save(tmp_path / "small.png")
    write_h5ad(tissue, tmp_path / "s.h5ad")  # the in-memory full-resolution image is not stored

    a = read.h5ad(tmp_path / "s.h5ad", image=tmp_path / "he.png", require_image=True)
    assert a.uns["spatial"]["synthetic"]["metadata"]["source_image_path"] == str((tmp_path / "he.png").resolve())
    with pytest.raises(InputError, match="small.png.*outside the 20 x 20 px image"):
        read.h5ad(tmp_path / "s.h5ad", image=tmp_path / "small.png")
