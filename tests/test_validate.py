"""stmorph.validate: every problem named, all of them collected in one error."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import stmorph as st
from stmorph._validate import problems
from stmorph.errors import InputError


def make_adata(n=20, g=8, seed=0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    adata = ad.AnnData(
        X=sp.csr_matrix(rng.poisson(2.0, (n, g)).astype(np.float32)),
        obs=pd.DataFrame({"in_tissue": 1, "array_row": np.arange(n) // 5, "array_col": np.arange(n) % 5},
                         index=[f"s{i}" for i in range(n)]),
        var=pd.DataFrame(index=[f"g{j}" for j in range(g)]),
    )
    adata.obsm["spatial"] = rng.uniform(0, 500, (n, 2))
    adata.uns["spatial"] = {"lib": {
        "images": {"lowres": np.zeros((50, 50, 3), np.uint8)},
        "scalefactors": {"spot_diameter_fullres": 20.0, "tissue_lowres_scalef": 0.1},
        "metadata": {"source_image_path": None, "technology": "visium", "spot_diameter_um": 55},
    }}
    return adata


def test_valid_object_passes():
    adata = make_adata()
    st.validate(adata)
    assert problems(adata) == []


def _drop_spatial(a):
    del a.obsm["spatial"]


def _wrong_shape(a):
    a.obsm["spatial"] = np.zeros((a.n_obs, 3))


def _nan_coords(a):
    a.obsm["spatial"][2, 0] = np.nan


def _no_uns(a):
    del a.uns["spatial"]


def _no_scalefactors(a):
    del a.uns["spatial"]["lib"]["scalefactors"]


def _no_diameter(a):
    del a.uns["spatial"]["lib"]["scalefactors"]["spot_diameter_fullres"]


def _bad_diameter(a):
    a.uns["spatial"]["lib"]["scalefactors"]["spot_diameter_fullres"] = -3


def _string_x(a):
    a.X = np.full(a.shape, "x", dtype=object)


def _negative(a):
    a.X.data[0] = -1


def _nan_counts(a):
    a.X.data[0] = np.nan


def _dup_obs(a):
    a.obs_names = ["s0"] * 2 + list(a.obs_names[2:])


def _dup_var(a):
    a.var_names = ["g0"] * 2 + list(a.var_names[2:])


def _lowres_without_scalef(a):
    del a.uns["spatial"]["lib"]["scalefactors"]["tissue_lowres_scalef"]


def _empty(a):
    a._inplace_subset_obs(np.zeros(a.n_obs, bool))


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (_drop_spatial, 'obsm["spatial"] is missing'),
        (_wrong_shape, "must have shape (n_obs, 2) = (20, 2); got (20, 3)"),
        (_nan_coords, "1 spot(s) with missing or non-finite coordinates"),
        (_no_uns, 'uns["spatial"] is missing'),
        (_no_scalefactors, '["scalefactors"] is missing'),
        (_no_diameter, '["spot_diameter_fullres"] is missing'),
        (_bad_diameter, "must be a positive number; got -3"),
        (_string_x, "X is not numeric"),
        (_negative, "X holds 1 negative value(s)"),
        (_nan_counts, "X holds 1 non-finite value(s)"),
        (_dup_obs, "obs_names has 1 duplicated barcode(s), e.g. 's0'"),
        (_dup_var, "var_names has 1 duplicated gene name(s)"),
        (_lowres_without_scalef, '"tissue_lowres_scalef"] is missing or not positive'),
        (_empty, "X is empty (0 spots x 8 genes)"),
    ],
)
def test_each_problem_is_named(mutate, expected):
    import warnings

    adata = make_adata()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata warns about duplicated names
        mutate(adata)
    with pytest.raises(InputError) as info:
        st.validate(adata)
    assert expected in str(info.value)
    assert "1 problem:" in str(info.value)


def test_all_problems_collected_in_one_line():
    adata = make_adata()
    _drop_spatial(adata)
    _no_diameter(adata)
    _negative(adata)
    with pytest.raises(InputError) as info:
        st.validate(adata, require_image=True)
    text = str(info.value)
    assert "\n" not in text and "4 problems" in text
    for part in ('obsm["spatial"] is missing', "spot_diameter_fullres", "negative", "no full-resolution image"):
        assert part in text
    assert len(problems(adata, require_image=True)) == 4


def test_require_image(tmp_path):
    adata = make_adata()
    st.validate(adata)
    with pytest.raises(InputError, match="no full-resolution image"):
        st.validate(adata, require_image=True)
    meta = adata.uns["spatial"]["lib"]["metadata"]
    meta["source_image_path"] = str(tmp_path / "gone.tif")
    with pytest.raises(InputError, match="gone.tif' does not exist"):
        st.validate(adata, require_image=True)
    (tmp_path / "gone.tif").write_bytes(b"x")
    st.validate(adata, require_image=True)
    meta["source_image_path"] = None
    adata.uns["spatial"]["lib"]["images"]["fullres"] = np.zeros((10, 10, 3), np.uint8)
    st.validate(adata, require_image=True)


def test_library_selection_and_not_anndata():
    adata = make_adata()
    adata.uns["spatial"]["other"] = {"scalefactors": {}}
    with pytest.raises(InputError, match=r"\['other'\]\[\"scalefactors\"\]\[\"spot_diameter_fullres\"\] is missing"):
        st.validate(adata)
    st.validate(adata, library_id="lib")
    with pytest.raises(InputError, match="library_id 'nope' not in"):
        st.validate(adata, library_id="nope")
    with pytest.raises(InputError, match="expected an AnnData"):
        st.validate({"X": 1})


def test_integer_and_dense_counts_are_fine():
    adata = make_adata()
    adata.X = adata.X.toarray().astype(np.int32)
    st.validate(adata)
