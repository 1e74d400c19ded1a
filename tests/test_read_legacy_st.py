"""stmorph.read.legacy_st: the original Spatial Transcriptomics layout (HER2ST), bad input, real sections."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from PIL import Image

import stmorph as st
from stmorph.errors import ImageError, InputError

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
HER2ST = DATA / "her2st"

SPACING = 200.0  # full-resolution pixels between spot centres
GENES = ["ACTB", "GAPDH", "ERBB2", "KRT19", "ACTB", "MT-CO1"]  # one duplicated name, as real tables have


def write_section(root: Path, *, nx=6, ny=5, scale=1.0, extra_selected=(), unselected=(), image=True,
                  transpose=False, seed=0):
    """A legacy ST section: counts (spots x genes), selection, labels (fractional x, y), optional image.

    The image is a rendering at ``scale`` x the selection's pixels (``scale`` = pixel_scale).
    ``extra_selected``: (x, y) selected in the selection but absent from the counts.
    ``unselected``: (x, y) of counted spots marked ``selected == 0``.
    Returns a dict of paths and the expected table.
    """
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    xs, ys = np.meshgrid(np.arange(2, 2 + nx), np.arange(3, 3 + ny))
    xs, ys = xs.ravel(), ys.ravel()
    ids = [f"{a}x{b}" for a, b in zip(xs, ys)]
    counts = rng.poisson(3.0, size=(len(ids), len(GENES)))
    df = pd.DataFrame(counts, index=ids, columns=GENES)
    path_counts = root / "S1.tsv.gz"
    (df.T if transpose else df).to_csv(path_counts, sep="\t")

    all_x = np.concatenate([xs, [p[0] for p in extra_selected]]).astype(int)
    all_y = np.concatenate([ys, [p[1] for p in extra_selected]]).astype(int)
    pixel_x = 100.0 + (all_x - 2) * SPACING + rng.uniform(-3, 3, len(all_x))
    pixel_y = 150.0 + (all_y - 3) * SPACING + rng.uniform(-3, 3, len(all_x))
    selected = np.ones(len(all_x), dtype=int)
    for p in unselected:
        selected[(all_x == p[0]) & (all_y == p[1])] = 0
    sel = pd.DataFrame({"x": all_x, "y": all_y, "new_x": all_x + 0.01, "new_y": all_y - 0.02,
                        "pixel_x": pixel_x, "pixel_y": pixel_y, "selected": selected})
    # a row far away and not selected, as selection files list every spot of the array
    sel.loc[len(sel)] = [30, 30, 30.0, 30.0, 9000.0, 9000.0, 0]
    path_spots = root / "S1_selection.tsv"
    sel.sample(frac=1, random_state=seed).to_csv(path_spots, sep="\t", index=False)

    labels = ["tumour" if a < 2 + nx // 2 else "stroma" for a in all_x]
    lab = pd.DataFrame({"Row.names": [f"{px:.0f}x{py:.0f}" for px, py in zip(pixel_x, pixel_y)],
                        "x": all_x + rng.uniform(-0.3, 0.3, len(all_x)),  # fractional array coordinates
                        "y": all_y + rng.uniform(-0.3, 0.3, len(all_x)),
                        "pixel_x": pixel_x * 0.37, "pixel_y": pixel_y * 0.37,  # another scale: unused
                        "label": labels})
    lab = lab.iloc[1:]  # the first spot stays unlabelled
    path_labels = root / "S1_labeled_coordinates.tsv"
    lab.to_csv(path_labels, sep="\t", index=False)

    out = {"counts": path_counts, "spots": path_spots, "labels": path_labels, "table": df,
           "selection": sel.iloc[:-1], "scale": scale, "ids": ids}
    if image:
        w = int((pixel_x.max() + 150) * scale)
        h = int((pixel_y.max() + 150) * scale)
        img_dir = root / "img"
        img_dir.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(img_dir / "S1_HE.png")
        (img_dir / "scalefactors.json").write_text(json.dumps({"image": "S1_HE.png", "pixel_scale": scale}))
        out["image"] = img_dir / "S1_HE.png"
    return out


def read_err(exc_type, *args, **kwargs) -> str:
    with pytest.raises(exc_type) as info:
        st.read.legacy_st(*args, **kwargs)
    text = str(info.value)
    assert "\n" not in text
    return text


@pytest.fixture
def section(tmp_path):
    return write_section(tmp_path / "S1")


# --------------------------------------------------------------------------- reading


def test_join_on_array_coordinates(section):
    s = section
    adata = st.read.legacy_st(s["counts"], s["spots"], labels=s["labels"])
    assert adata.shape == (30, len(GENES))
    assert sp.isspmatrix_csr(adata.X) and adata.X.dtype == np.float32
    assert list(adata.obs_names) == s["ids"]
    np.testing.assert_array_equal(adata.X.toarray(), s["table"].to_numpy())
    assert list(adata.var_names) == ["ACTB", "GAPDH", "ERBB2", "KRT19", "ACTB-1", "MT-CO1"]
    sel = s["selection"].set_index(s["selection"].x.astype(int).astype(str) + "x" + s["selection"].y.astype(int).astype(str))
    np.testing.assert_allclose(adata.obsm["spatial"], sel.loc[adata.obs_names, ["pixel_x", "pixel_y"]].to_numpy())
    np.testing.assert_array_equal(adata.obs["array_col"], sel.loc[adata.obs_names, "x"])
    np.testing.assert_array_equal(adata.obs["array_row"], sel.loc[adata.obs_names, "y"])
    # labels joined on rounded fractional coordinates; the first spot unlabelled
    ann = adata.obs["annotation"]
    assert isinstance(ann.dtype, pd.CategoricalDtype) and set(ann.cat.categories) == {"tumour", "stroma"}
    assert pd.isna(ann.iloc[0]) and ann.notna().sum() == 29
    expect = np.where(adata.obs["array_col"] < 5, "tumour", "stroma")
    assert (ann.iloc[1:].astype(str).to_numpy() == expect[1:]).all()
    lib = adata.uns["spatial"]["S1"]
    assert lib["metadata"]["technology"] == "legacy_st" and lib["metadata"]["spot_diameter_um"] == 100
    assert lib["metadata"]["source_image_path"] is None and lib["images"] == {}
    # spot diameter = half the centre-to-centre distance
    assert lib["scalefactors"]["spot_diameter_fullres"] == pytest.approx(SPACING / 2, rel=0.03)
    assert st._spatial.microns_per_pixel(adata) == pytest.approx(100 / (SPACING / 2), rel=0.03)
    st.validate(adata)


def test_spot_diameter_from_a_single_row(tmp_path):
    s = write_section(tmp_path / "S1", nx=6, ny=1, image=False)  # array pitch undefined: nearest neighbours
    adata = st.read.legacy_st(s["counts"], s["spots"])
    assert adata.uns["spatial"]["S1"]["scalefactors"]["spot_diameter_fullres"] == pytest.approx(SPACING / 2, rel=0.05)


def test_genes_by_spots_orientation(tmp_path):
    s = write_section(tmp_path / "S1", transpose=True, image=False)
    adata = st.read.legacy_st(s["counts"], s["spots"])
    assert adata.shape == (30, len(GENES))
    np.testing.assert_array_equal(adata.X.toarray(), s["table"].to_numpy())


@pytest.mark.parametrize("how", ["float", "auto"])
def test_image_with_pixel_scale(tmp_path, how):
    s = write_section(tmp_path / "S1", scale=0.25)
    before = sorted((p, p.stat().st_mtime_ns) for p in (tmp_path / "S1").rglob("*"))
    adata = st.read.legacy_st(s["counts"], s["spots"], s["image"], pixel_scale=0.25 if how == "float" else "auto",
                              labels=s["labels"], library_id="sec")
    assert sorted((p, p.stat().st_mtime_ns) for p in (tmp_path / "S1").rglob("*")) == before
    sel = s["selection"].set_index(s["selection"].x.astype(int).astype(str) + "x" + s["selection"].y.astype(int).astype(str))
    np.testing.assert_allclose(adata.obsm["spatial"], 0.25 * sel.loc[adata.obs_names, ["pixel_x", "pixel_y"]].to_numpy())
    lib = adata.uns["spatial"]["sec"]
    assert lib["metadata"]["pixel_scale"] == 0.25
    assert lib["metadata"]["source_image_path"] == str(s["image"].resolve())
    assert lib["scalefactors"]["spot_diameter_fullres"] == pytest.approx(0.25 * SPACING / 2, rel=0.03)
    w, h = Image.open(s["image"]).size
    assert max(lib["images"]["lowres"].shape[:2]) <= 600 and lib["images"]["hires"].shape[:2] == (h, w)
    assert lib["scalefactors"]["tissue_lowres_scalef"] == pytest.approx(lib["images"]["lowres"].shape[1] / w)
    st.validate(adata, require_image=True)


def test_unselected_and_missing_spots(tmp_path):
    s = write_section(tmp_path / "S1", extra_selected=[(20, 20)], unselected=[(2, 3)], image=False)
    with pytest.warns(UserWarning, match=r"1 of 30 selected spots .* '20x20'"):
        adata = st.read.legacy_st(s["counts"], s["spots"])
    assert adata.n_obs == 29 and "2x3" not in adata.obs_names
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        everything = st.read.legacy_st(s["counts"], s["spots"], in_tissue_only=False)
    assert everything.n_obs == 30 and everything.obs.loc["2x3", "in_tissue"] == 0
    text = read_err(InputError, s["counts"], s["spots"], missing_spots="error")
    assert "'20x20'" in text and str(s["counts"]) in text


# --------------------------------------------------------------------------- bad input


def test_missing_files(section, tmp_path):
    s = section
    assert "counts file not found" in read_err(InputError, tmp_path / "no.tsv.gz", s["spots"])
    assert "spot selection file not found" in read_err(InputError, s["counts"], tmp_path / "no.tsv")
    assert "labels file not found" in read_err(InputError, s["counts"], s["spots"], labels=tmp_path / "no.tsv")
    assert "image not found" in read_err(InputError, s["counts"], s["spots"], tmp_path / "no.png")


def test_counts_spot_without_position(section):
    s = section
    sel = pd.read_csv(s["spots"], sep="\t")
    sel[~((sel.x == 4) & (sel.y == 5))].to_csv(s["spots"], sep="\t", index=False)
    text = read_err(InputError, s["counts"], s["spots"])
    assert "1 of 30 spots of S1.tsv.gz have no row" in text and "'4x5'" in text and str(s["spots"]) in text


def test_no_overlap_at_all(section, tmp_path):
    s = section
    sel = pd.read_csv(s["spots"], sep="\t")
    other = write_section(tmp_path / "other", nx=2, ny=2, image=False)
    sel2 = pd.read_csv(other["spots"], sep="\t")
    sel2["x"] += 40
    sel2.to_csv(other["spots"], sep="\t", index=False)
    assert "have no row in this spot selection file" in read_err(InputError, s["counts"], other["spots"])
    del sel


def test_selection_missing_column_and_duplicates(section):
    s = section
    sel = pd.read_csv(s["spots"], sep="\t")
    sel.drop(columns="pixel_y").to_csv(s["spots"], sep="\t", index=False)
    text = read_err(InputError, s["counts"], s["spots"])
    assert "lacks column(s) 'pixel_y'" in text and str(s["spots"]) in text
    pd.concat([sel, sel.iloc[:1]]).to_csv(s["spots"], sep="\t", index=False)
    assert "duplicated" in read_err(InputError, s["counts"], s["spots"])


def test_bad_spot_ids(section):
    s = section
    df = pd.read_csv(s["counts"], sep="\t", index_col=0)
    df.index = ["spot_%d" % i for i in range(len(df))]
    df.to_csv(s["counts"], sep="\t")
    text = read_err(InputError, s["counts"], s["spots"])
    assert "'XxY'" in text and "'spot_0'" in text and str(s["counts"]) in text


def test_duplicated_counts_spots(section):
    s = section
    df = pd.read_csv(s["counts"], sep="\t", index_col=0)
    pd.concat([df, df.iloc[:1]]).to_csv(s["counts"], sep="\t")
    assert "duplicated id(s): '2x3'" in read_err(InputError, s["counts"], s["spots"])


def test_non_numeric_and_empty_counts(section):
    s = section
    df = pd.read_csv(s["counts"], sep="\t", index_col=0).astype(object)
    df.iloc[2, 1] = "many"
    df.to_csv(s["counts"], sep="\t")
    assert "non-numeric" in read_err(InputError, s["counts"], s["spots"])
    (df.iloc[:, :1] * 0).to_csv(s["counts"], sep="\t")
    text = read_err(InputError, s["counts"], s["spots"])
    assert "holds no counts" in text or "no counts" in text
    s["counts"].write_bytes(b"")
    assert "counts file is empty" in read_err(InputError, s["counts"], s["spots"])


def test_negative_counts(section):
    s = section
    df = pd.read_csv(s["counts"], sep="\t", index_col=0)
    df.iloc[0, 0] = -1
    df.to_csv(s["counts"], sep="\t")
    assert "negative" in read_err(InputError, s["counts"], s["spots"])


def test_truncated_gzip(section):
    s = section
    data = s["counts"].read_bytes()
    s["counts"].write_bytes(data[: len(data) // 2])
    text = read_err(InputError, s["counts"], s["spots"])
    assert "cannot be parsed" in text and str(s["counts"]) in text


def test_spots_outside_image_names_pixel_scale(tmp_path):
    s = write_section(tmp_path / "S1", scale=0.25)
    text = read_err(InputError, s["counts"], s["spots"], s["image"])  # forgot pixel_scale
    assert str(s["image"]) in text and "outside" in text and "pixel_scale" in text


def test_bad_images(tmp_path):
    s = write_section(tmp_path / "S1", scale=0.25)
    cut = tmp_path / "cut.png"
    cut.write_bytes(s["image"].read_bytes()[:3000])
    assert str(cut) in read_err(ImageError, s["counts"], s["spots"], cut, pixel_scale=0.25)
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"\xff\xd8\xff garbage")
    assert str(junk) in read_err(ImageError, s["counts"], s["spots"], junk, pixel_scale=0.25)


def test_pixel_scale_errors(section, tmp_path):
    s = section
    assert "positive number" in read_err(InputError, s["counts"], s["spots"], pixel_scale=-1)
    assert "positive number or 'auto'" in read_err(InputError, s["counts"], s["spots"], pixel_scale="big")
    (s["image"].parent / "scalefactors.json").unlink()
    assert "pixel_scale='auto'" in read_err(InputError, s["counts"], s["spots"], s["image"], pixel_scale="auto")


def test_label_problems(section, tmp_path):
    s = section
    lab = pd.read_csv(s["labels"], sep="\t")
    bad = tmp_path / "labels.tsv"
    lab.drop(columns="label").to_csv(bad, sep="\t", index=False)
    assert "lacks column(s) 'label'" in read_err(InputError, s["counts"], s["spots"], labels=bad)
    lab2 = lab.copy()
    lab2["x"] += 50
    lab2.to_csv(bad, sep="\t", index=False)
    assert "none of the 29 labelled spots" in read_err(InputError, s["counts"], s["spots"], labels=bad)
    pd.concat([lab, lab.iloc[:1]]).to_csv(bad, sep="\t", index=False)
    assert "more than one label" in read_err(InputError, s["counts"], s["spots"], labels=bad)


# --------------------------------------------------------------------------- HER2ST


def her2st(section):
    return (HER2ST / "ST-cnts" / f"{section}.tsv.gz", HER2ST / "ST-spotfiles" / f"{section}_selection.tsv",
            HER2ST / "ST-pat" / "lbl" / f"{section}_labeled_coordinates.tsv")


@pytest.mark.realdata
@pytest.mark.skipif(not (HER2ST / "ST-imgs" / "A" / "A1").exists(), reason="../shared/data/her2st A1 not available")
def test_her2st_a1_with_image_and_labels():
    counts, spots, labels = her2st("A1")
    image = HER2ST / "ST-imgs" / "A" / "A1" / "A1_HE_2000px.png"
    scale = json.loads((image.parent / "scalefactors.json").read_text())["pixel_scale"]
    with pytest.warns(UserWarning, match="2 of 348 selected spots"):
        adata = st.read.legacy_st(counts, spots, image, pixel_scale=scale, labels=labels)
    assert adata.shape == (346, 15045)
    assert adata.var_names.is_unique and sp.isspmatrix_csr(adata.X)
    lib = adata.uns["spatial"]["A1"]
    assert lib["metadata"]["source_image_path"] == str(image.resolve())
    # ~63 px between centres in the 2000 px rendering (README): diameter about 31 px
    assert 30 < lib["scalefactors"]["spot_diameter_fullres"] < 33
    xy = adata.obsm["spatial"]
    assert xy[:, 0].max() < 2000 and xy[:, 1].max() < 2138 and xy.min() > 0
    ann = adata.obs["annotation"]
    assert set(ann.cat.categories) == {"invasive cancer", "cancer in situ", "immune infiltrate",
                                       "connective tissue", "adipose tissue", "undetermined"}
    assert ann.notna().all()
    assert (ann == "invasive cancer").sum() == 282
    # the same with pixel_scale read from scalefactors.json
    with pytest.warns(UserWarning):
        auto = st.read.legacy_st(counts, spots, image, pixel_scale="auto")
    np.testing.assert_allclose(auto.obsm["spatial"], xy)
    st.validate(adata, require_image=True)


@pytest.mark.realdata
@pytest.mark.skipif(not (HER2ST / "ST-cnts" / "B1.tsv.gz").exists(), reason="../shared/data/her2st B1 not available")
def test_her2st_b1_without_image():
    counts, spots, labels = her2st("B1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every selected B1 spot has counts: no warning
        adata = st.read.legacy_st(counts, spots, labels=labels)
    assert adata.shape == (295, 15109)
    lib = adata.uns["spatial"]["B1"]
    assert lib["metadata"]["source_image_path"] is None and lib["images"] == {}
    assert 140 < lib["scalefactors"]["spot_diameter_fullres"] < 150  # full-resolution pixels, ~145 px
    assert adata.obs["annotation"].notna().all() and (adata.obs["annotation"] == "undetermined").sum() == 26
    st.validate(adata)
    with pytest.raises(InputError, match="no full-resolution image"):
        st.validate(adata, require_image=True)


def test_comma_separated_counts_named_tsv(section):
    s = section
    pd.read_csv(s["counts"], sep="\t", index_col=0).to_csv(s["counts"], sep=",")
    text = read_err(InputError, s["counts"], s["spots"])
    assert "single column" in text and "tab separated" in text and str(s["counts"]) in text


@pytest.mark.parametrize("change", ["short", "long"])
def test_a_ragged_counts_row_is_named_with_its_fields(tmp_path, change):
    """A row with fields missing was reported as 'NaN or inf' values; one with extra fields as pandas' message."""
    import gzip

    s = write_section(tmp_path / "s", image=False)
    lines = gzip.open(s["counts"], "rt").read().splitlines()
    k = len(lines[0].split("\t"))
    lines[4] = lines[4].rsplit("\t", 2)[0] if change == "short" else lines[4] + "\t5\t6"
    path = tmp_path / "ragged.tsv"
    path.write_text("\n".join(lines) + "\n")
    n = k - 2 if change == "short" else k + 2
    with pytest.raises(InputError, match=rf"ragged\.tsv: counts file: line 5 has {n} fields, expected {k} "
                                         r"\(as line 2 has\)"):
        st.read.legacy_st(path, s["spots"])
