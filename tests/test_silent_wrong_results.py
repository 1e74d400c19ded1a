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


def test_a_full_resolution_image_upscaled_2x_is_refused(visium, tmp_path):
    big = _resized_tiff(visium / "image.tif", tmp_path / "big.tif", 2.0)
    with pytest.raises(InputError, match=r"big\.tif: the image is \d+ x \d+ px, but tissue_hires_image\.png .* "
                                         r"\(2\.00x in width, 2\.00x in height\)") as info:
        st.read.visium(visium, image=big)
    assert "\n" not in str(info.value)
    # the image itself, and a slightly different size (a crop by a few per cent): read, the latter with a warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        st.read.visium(visium, image=visium / "image.tif")
    near = _resized_tiff(visium / "image.tif", tmp_path / "near.tif", 1.05)
    with pytest.warns(UserWarning, match=r"near\.tif: the image is .*1\.05x in width"):
        st.read.visium(visium, image=near)


def test_labels_of_another_section_are_warned_about(visium, tmp_path):
    """DLPFC 151674's labels on 151673: 96% of the barcodes matched (Visium barcodes repeat across slides)."""
    outs = _copy(visium, tmp_path)
    own = pd.read_csv(visium / "labels.tsv", sep="\t", dtype=str)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        st.read.visium(outs, labels=visium / "labels.tsv")
    other = own.copy()
    n = max(5, len(own) // 20)
    other.iloc[:n, 0] = [f"AAAC{i:012d}-1" for i in range(n)]  # barcodes of spots this section does not have
    other.to_csv(tmp_path / "other.tsv", sep="\t", index=False)
    with pytest.warns(UserWarning, match=rf"other\.tsv: {n} of its {len(own)} labelled spots are not spots of this "
                                         rf"section .* cover {len(own) - n} of the \d+ spots; are these the labels "
                                         "of another section"):
        st.read.visium(outs, labels=tmp_path / "other.tsv")


def test_feature_cache_is_keyed_on_the_image_content(tmp_path, tiny):
    """An edit in place that keeps the size and the modification time: the features are computed again."""
    from test_features import _adata, _image

    path = tmp_path / "img.tif"
    tifffile.imwrite(path, _image(0), photometric="rgb")
    stat = os.stat(path)
    a = _adata()
    st.im.features(a, tiny, image=path, cache_dir=tmp_path / "cache", progress=False, precision="float32")
    first = a.obsm["X_image"].copy()
    with open(path, "r+b") as f:  # same layout, other pixels, written over the old ones
        tifffile.imwrite(tmp_path / "other.tif", _image(1), photometric="rgb")
        f.write((tmp_path / "other.tif").read_bytes())
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.stat(path).st_size == stat.st_size and os.stat(path).st_mtime_ns == stat.st_mtime_ns
    b = _adata()
    st.im.features(b, tiny, image=path, cache_dir=tmp_path / "cache", progress=False, precision="float32")
    assert not b.uns["X_image"]["params"]["from_cache"]
    assert not np.allclose(b.obsm["X_image"], first)
    c = _adata()  # touched, content unchanged: still a hit
    os.utime(path)
    st.im.features(c, tiny, image=path, cache_dir=tmp_path / "cache", progress=False, precision="float32")
    assert c.uns["X_image"]["params"]["from_cache"]
    np.testing.assert_array_equal(c.obsm["X_image"], b.obsm["X_image"])


def test_a_large_image_is_fingerprinted_by_a_sample_and_its_change_time(tmp_path, monkeypatch):
    from stmorph.im import _cache

    monkeypatch.setattr(_cache, "WHOLE_FILE_HASH_BYTES", 2**16)
    path = tmp_path / "big.bin"
    path.write_bytes(os.urandom(2**23))
    one = _cache.image_identity(path)
    assert "sample-sha256-ctime" in one and _cache.image_identity(path) == one
    stat = os.stat(path)
    with open(path, "r+b") as f:  # one byte far from any sampled block
        f.seek(2**22 + 17)
        f.write(b"\x00" if f.read(1) != b"\x00" else b"\x01")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert _cache.image_identity(path) != one


def test_visium_spots_all_at_one_pixel_are_refused_naming_the_file(visium, tmp_path):
    outs = _copy(visium, tmp_path)
    pos = outs / "spatial" / "tissue_positions_list.csv"
    df = pd.read_csv(pos, header=None)
    df[4], df[5] = 100, 100
    df.to_csv(pos, header=False, index=False)
    with pytest.raises(InputError, match=r"tissue_positions_list\.csv: all \d+ spots lie at the same pixel"):
        st.read.visium(outs)


def test_legacy_spots_all_at_one_pixel_are_refused_naming_the_file(tmp_path):
    s = write_section(tmp_path / "s", image=False)
    sel = pd.read_csv(s["spots"], sep="\t")
    sel["pixel_x"], sel["pixel_y"] = 10.0, 10.0
    sel.to_csv(s["spots"], sep="\t", index=False)
    with pytest.raises(InputError, match=r"S1_selection\.tsv: all \d+ spots lie at the same pixel"):
        st.read.legacy_st(s["counts"], s["spots"])


def test_absurd_counts_are_refused_naming_the_file(tmp_path):
    s = write_section(tmp_path / "s", image=False)
    df = pd.read_csv(s["counts"], sep="\t", index_col=0).astype(float)
    df.iloc[3, 2] = 1e30
    df.to_csv(s["counts"], sep="\t")
    with pytest.raises(InputError, match=r"S1\.tsv\.gz: counts file holds 1 value\(s\) above 1e\+08 "
                                         r"\(the largest 1e\+30\)"):
        st.read.legacy_st(s["counts"], s["spots"])


def test_absurd_counts_in_an_h5ad_are_refused(tmp_path):
    adata = datasets.synthetic(100, n_genes=300, image=False, random_state=0)
    adata.X = adata.X.astype(np.float32)
    adata.X[0, 0] = 1e30
    adata.write_h5ad(tmp_path / "a.h5ad")
    with pytest.raises(InputError, match=r"above 1e\+08"):
        st.read.h5ad(tmp_path / "a.h5ad")


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
