"""Visium HD: synthetic section, the Space Ranger HD writer, read.visium_hd, read.rebin, `stmorph run`, plots."""

import json
import shutil
import warnings

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("pyarrow")

from stmorph import datasets, pl, read
from stmorph.cli import main
from stmorph.errors import InputError, OutputExistsError

LIB = "hd"  # the library id: the name of the folder holding outs/


def _read(outs, bin_size, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # 2 um bins without counts are left out, with a warning
        return read.visium_hd(outs, bin_size=bin_size, **kw)


@pytest.fixture(scope="module")
def hd(tmp_path_factory):
    """A 600 um synthetic capture area (~63,000 bins of 2 um, ~4,000 of 8 um under tissue) written as outs/."""
    root = tmp_path_factory.mktemp("hd", numbered=False)
    tissue = datasets.synthetic_visium_hd(600, random_state=0)
    outs = datasets.write_visium_hd(tissue, root / "outs")
    return tissue, outs, root / "tissue_image.btf"


@pytest.fixture(scope="module")
def bins(hd):
    _, outs, image = hd
    return {b: _read(outs, b, image=image) for b in (2, 8, 16)}


def test_writer_layout(hd):
    _, outs, image = hd
    assert image.is_file() and image.read_bytes()[:4] in (b"II+\x00", b"MM\x00+")  # BigTIFF
    for b in (2, 8, 16):
        sp = outs / "binned_outputs" / f"square_{b:03d}um" / "spatial"
        assert (sp.parent / "filtered_feature_bc_matrix.h5").is_file()
        assert {"tissue_hires_image.png", "tissue_lowres_image.png"} <= {p.name for p in sp.iterdir()}
        sf = json.loads((sp / "scalefactors_json.json").read_text())
        assert sf["bin_size_um"] == b and sf["microns_per_pixel"] == 0.5
        assert sf["spot_diameter_fullres"] == pytest.approx(b / 0.5)
        assert {"tissue_hires_scalef", "tissue_lowres_scalef", "regist_target_img_scalef"} <= set(sf)
        pos = pd.read_parquet(sp / "tissue_positions.parquet")
        assert list(pos.columns) == ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres",
                                     "pxl_col_in_fullres"]
        assert pos["barcode"].iloc[0] == f"s_{b:03d}um_00000_00000-1"
        n_side = int(np.ceil(300 / (b // 2)))  # the whole capture area is listed, in tissue or not
        assert len(pos) == n_side**2 and 0 < pos["in_tissue"].mean() < 1
    assert (outs / "spatial" / "scalefactors_json.json").is_file()


def test_reader_at_each_bin_size(hd, bins):
    tissue, _, image = hd
    totals = {b: float(a.X.sum()) for b, a in bins.items()}
    assert totals[2] == totals[8] == totals[16] == float(tissue.X.sum())  # every UMI, at every bin size
    n = {b: a.n_obs for b, a in bins.items()}
    assert n[2] > 50_000 and 3_000 < n[8] < 6_000 and n[16] < n[8] / 3
    for b, a in bins.items():
        lib = a.uns["spatial"][LIB]
        meta, sf = lib["metadata"], lib["scalefactors"]
        assert meta["technology"] == "visium_hd" and meta["bin_size_um"] == b and meta["spot_diameter_um"] == b
        assert meta["microns_per_pixel"] == 0.5 and meta["source_image_path"] == str(image.resolve())
        assert sf["spot_diameter_fullres"] == pytest.approx(b / 0.5)
        assert {"hires", "lowres"} <= set(lib["images"])
        assert a.obs["annotation"].notna().all() and a.obs_names[0].startswith(f"s_{b:03d}um_")
    # 8 um bin centres: the centre of their 4 x 4 block of 2 um bins, in full-resolution pixels
    a8 = bins[8]
    expect = (150 + (a8.obs[["array_col", "array_row"]].to_numpy() + 0.5) * 8) / 0.5
    np.testing.assert_allclose(a8.obsm["spatial"], expect)


def test_rebin_conserves_counts_and_matches_space_ranger_bins(bins):
    r = read.rebin(bins[8], 16)
    ref = bins[16]
    assert list(r.obs_names) == list(ref.obs_names)
    assert abs(r.X - ref.X).sum() == 0
    np.testing.assert_allclose(r.obsm["spatial"], ref.obsm["spatial"])
    assert r.uns["spatial"][LIB]["scalefactors"]["spot_diameter_fullres"] == pytest.approx(32.0)
    assert r.uns["rebin"]["params"] == {"from_bin_size_um": 8.0, "bin_size_um": 16.0, "n_bins_from": bins[8].n_obs,
                                        "n_bins": ref.n_obs}
    for size in (24, 48):
        big = read.rebin(bins[8], size)
        assert big.X.sum() == bins[8].X.sum()
        k = size // 8
        key = set(zip(bins[8].obs["array_row"] // k, bins[8].obs["array_col"] // k, strict=True))
        assert set(zip(big.obs["array_row"], big.obs["array_col"], strict=True)) == key
        assert big.obs["annotation"].notna().all()
    # majority label: a 48 um bin takes the most frequent label of its 8 um members
    big = read.rebin(bins[8], 48)
    a8 = bins[8].obs
    one = big.obs.iloc[len(big) // 2]
    members = a8[(a8["array_row"] // 6 == one["array_row"]) & (a8["array_col"] // 6 == one["array_col"])]
    assert one["annotation"] == members["annotation"].value_counts().index[0]
    # reading a bin size Space Ranger did not write re-bins the largest size that divides it
    r32 = _read(bins[16].uns["spatial"][LIB]["metadata"]["bin_folder"].rsplit("/binned_outputs", 1)[0], 32)
    ref32 = read.rebin(bins[16], 32)
    assert list(r32.obs_names) == list(ref32.obs_names) and abs(r32.X - ref32.X).sum() == 0


def test_rebin_refuses_non_multiples(bins):
    for bad in (12, 4, "x"):
        with pytest.raises(InputError) as e:
            read.rebin(bins[8], bad)
        assert "multiple" in str(e.value) and "\n" not in str(e.value)
    plain = datasets.synthetic(40, image=False, n_genes=300)
    with pytest.raises(InputError, match="bin_size_um"):
        read.rebin(plain, 110)


def test_synthetic_bins_are_sums_of_2um_bins():
    two = datasets.synthetic_visium_hd(300, image=False, random_state=3)
    eight = datasets.synthetic_visium_hd(300, image=False, random_state=3, bin_size=8)
    r = read.rebin(two, 8)
    assert list(r.obs_names) == list(eight.obs_names) and abs(r.X - eight.X).sum() == 0
    assert (r.obs["annotation"] == eight.obs["annotation"]).all()
    assert set(eight.obs["annotation"].cat.categories) >= {"vessel-rich", "hypoxic-tumour"}


@pytest.fixture
def one_bin(hd, tmp_path):
    """A copy of the 16 um folder alone, to damage."""
    _, outs, _ = hd
    dst = tmp_path / "outs" / "binned_outputs" / "square_016um"
    shutil.copytree(outs / "binned_outputs" / "square_016um", dst)
    return tmp_path / "outs", dst


def _one_line(e, name):
    text = str(e.value)
    assert "\n" not in text and name in text, text


def test_bad_inputs_name_the_file(hd, one_bin, tmp_path):
    _, outs, _ = hd
    with pytest.raises(InputError) as e:
        read.visium_hd(outs, bin_size=5)
    _one_line(e, "binned_outputs")
    assert "2 um, 8 um, 16 um" in str(e.value)
    with pytest.raises(InputError) as e:
        read.visium_hd(outs, bin_size=0)
    _one_line(e, "bin_size")
    (tmp_path / "plain").mkdir()
    with pytest.raises(InputError) as e:
        read.visium_hd(tmp_path / "plain")
    _one_line(e, "binned_outputs")
    root, folder = one_bin
    with pytest.raises(InputError) as e:  # only 16 um present: 8 is not a multiple of it
        read.visium_hd(root, bin_size=8)
    _one_line(e, "16 um")

    pos = folder / "spatial" / "tissue_positions.parquet"
    good = pos.read_bytes()
    pos.write_bytes(good[: len(good) // 2])  # truncated parquet
    with pytest.raises(InputError) as e:
        read.visium_hd(root, bin_size=16)
    _one_line(e, "tissue_positions.parquet")

    table = pd.read_parquet(pd.io.common.BytesIO(good))
    table["barcode"] = table["barcode"].str.replace("s_016um", "s_008um")  # barcodes of another bin size
    table.to_parquet(pos, index=False)
    with pytest.raises(InputError) as e:
        read.visium_hd(root, bin_size=16)
    _one_line(e, "tissue_positions.parquet")
    assert "barcodes" in str(e.value)

    pos.write_bytes(good)
    sf = folder / "spatial" / "scalefactors_json.json"
    d = json.loads(sf.read_text())
    sf.write_text(json.dumps({**d, "bin_size_um": 8.0}))
    with pytest.raises(InputError) as e:
        read.visium_hd(root, bin_size=16)
    _one_line(e, "scalefactors_json.json")


def test_writer_never_clobbers(hd, tmp_path):
    tissue, outs, _ = hd
    with pytest.raises(OutputExistsError):
        datasets.write_visium_hd(tissue, outs)
    small = read.rebin(tissue, 16)
    (tmp_path / "tissue_image.btf").write_bytes(b"mine")
    with pytest.raises(OutputExistsError, match="tissue_image.btf"):
        datasets.write_visium_hd(small, tmp_path / "outs")
    assert (tmp_path / "tissue_image.btf").read_bytes() == b"mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tissue_image.btf"]  # nothing half-written
    with pytest.raises(InputError, match="multiples"):
        datasets.write_visium_hd(small, tmp_path / "o2", bin_sizes=(8,), fullres=None)


def test_stmorph_run_on_hd_folder(hd, tmp_path):
    _, outs, _ = hd
    out = tmp_path / "res"
    assert main(["run", str(outs.parent), "--method", "expression", "--bin-size", "16", "--n-clusters", "6",
                 "--no-plot", "--quiet", "--out", str(out)]) == 0
    table = pd.read_csv(out / "domains.csv", index_col="barcode")
    assert len(table) == 1042 or table.index.str.startswith("s_016um_").all()
    assert table["expression"].nunique() == 6
    info = json.loads((out / "run.json").read_text())
    assert info["n_spots"] == len(table) and info["ari"]["expression"] > 0.2
    with pytest.raises(SystemExit):
        main(["run", str(outs), "--bin-size", "abc", "--out", str(tmp_path / "x")])


def test_many_bins_are_drawn_as_an_image(bins):
    from matplotlib.collections import PolyCollection
    from matplotlib.image import AxesImage

    a2 = bins[2]  # > 50,000 bins: one image pixel per bin
    fig = pl.domains(a2, "annotation", image=False)
    ax = fig.axes[0]
    ims = [im for im in ax.get_children() if isinstance(im, AxesImage)]
    assert len(ims) == 1 and not any(isinstance(c, PolyCollection) for c in ax.collections)
    arr = ims[0].get_array()
    rows = a2.obs["array_row"].to_numpy() - a2.obs["array_row"].min()
    cols = a2.obs["array_col"].to_numpy() - a2.obs["array_col"].min()
    assert arr.shape[:2] == (rows.max() + 1, cols.max() + 1)
    assert (np.asarray(arr)[rows, cols, 3] == 1).all()  # every bin drawn, opaque without an H&E
    left, right, bottom, top = ims[0].get_extent()
    xy = a2.obsm["spatial"]
    assert left == pytest.approx(xy[:, 0].min() - 2) and right == pytest.approx(xy[:, 0].max() + 2)
    assert top == pytest.approx(xy[:, 1].min() - 2) and bottom == pytest.approx(xy[:, 1].max() + 2)
    fig8 = pl.domains(bins[8], "annotation", image=False)  # few bins: one square each
    assert any(isinstance(c, PolyCollection) for c in fig8.axes[0].collections)
