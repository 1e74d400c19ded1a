"""Inputs that used to give a result without a word, though the result is wrong or meaningless."""

from __future__ import annotations

import os
import shutil
import warnings

import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image

import stmorph as st
from stmorph import datasets
from stmorph.errors import InputError
from test_read_legacy_st import write_section


@pytest.fixture(scope="module")
def visium(tmp_path_factory):
    adata = datasets.synthetic(200, n_genes=300, random_state=0)
    return datasets.write_visium(adata, tmp_path_factory.mktemp("vis") / "outs", fullres="image.tif",
                                 compression="zlib")


def _copy(visium, tmp_path):
    return shutil.copytree(visium, tmp_path / "outs")


def _resized_tiff(src, dst, factor):
    with tifffile.TiffFile(src) as tif:
        img = tif.pages[0].asarray()
    h, w = img.shape[:2]
    tifffile.imwrite(dst, np.asarray(Image.fromarray(img).resize((round(w * factor), round(h * factor)))),
                     photometric="rgb", tile=(256, 256))
    return dst


def test_ari_against_a_single_class_says_why_it_is_zero():
    import anndata as ad

    a = ad.AnnData(np.zeros((6, 1), np.float32))
    a.obs["annotation"] = pd.Categorical(["L1"] * 6)
    a.obs["d"] = pd.Categorical(list("001122"))
    with pytest.warns(UserWarning, match=r"single class \('L1'\) on the 6 scored spots: ARI and NMI are 0"):
        assert st.ev.ari(a, "d") == 0.0
    a.obs["annotation"] = pd.Categorical(list("xxyyzz"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        st.ev.ari(a, "d")
