"""Dense image features (stmorph.im.dense_features): equal to the patch path where they must be,
no tile seams, background tiles skipped, bounded reads, one-line errors, and the dispatch."""

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

torch = pytest.importorskip("torch")

import stmorph as st
from stmorph.errors import InputError
from stmorph.im import encoders
from stmorph.im._fmap import cell_geometry
from stmorph.im._tissue import otsu_threshold


@pytest.fixture(scope="module")
def he():
    """A 384 x 384 piece of the synthetic H&E-like image (1 um/px)."""
    a = st.datasets.synthetic(300, n_genes=300, random_state=3)
    img = next(iter(a.uns["spatial"].values()))["images"]["fullres"]
    h, w = img.shape[:2]
    return np.ascontiguousarray(img[h // 2 - 192: h // 2 + 192, w // 2 - 192: w // 2 + 192])


def bins(image, xy, side_px, *, technology="visium_hd", mpp=1.0):
    """A bins-like AnnData: square bins of ``side_px`` at ``xy`` over an in-memory image."""
    a = ad.AnnData(sp.csr_matrix((len(xy), 3), dtype=np.float32))
    a.obs_names = [f"b{i}" for i in range(len(xy))]
    a.obsm["spatial"] = np.asarray(xy, np.float64)
    a.uns["spatial"] = {"lib": {
        "images": {"fullres": image},
        "scalefactors": {"spot_diameter_fullres": float(side_px), "tissue_hires_scalef": 1.0,
                         "tissue_lowres_scalef": 1.0},
        "metadata": {"technology": technology, "spot_diameter_um": side_px * mpp, "microns_per_pixel": mpp},
    }}
    return a


def grid(lo, hi, step, offset=0.0):
    g = np.arange(lo, hi, step) + offset
    gx, gy = np.meshgrid(g, g)
    return np.c_[gx.ravel(), gy.ravel()]


def wrap(net, input_size, name):
    net.eval()
    return encoders.get_encoder(net, input_size=input_size, name=name)


@pytest.fixture(scope="module")
def pointwise():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 5, 1), torch.nn.ReLU())


@pytest.fixture(scope="module")
def convnet():
    """Padded convolutions (receptive field 15 px, stride 2): its map depends on what the tile border cuts."""
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 5, padding=2), torch.nn.ReLU(),
                               torch.nn.Conv2d(8, 8, 3, stride=2, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv2d(8, 6, 3, padding=1))


def dense(a, enc, **kw):
    kw = {"mpp": 1.0, "cache": False, "progress": False, "device": "cpu", "precision": "float32", **kw}
    st.im.dense_features(a, enc, **kw)


def patchpath(a, enc, patch, key):
    st.im.features(a, enc, patch=patch, key_added=key, method="patch", cache=False, progress=False, device="cpu",
                   precision="float32", backend="torch")
    return a.obsm[key]


def test_pointwise_encoder_equals_patch_path(he, pointwise):
    # odd windows around integer centres: the bin's square is exactly the patch path's pixels
    xy = grid(20, 360, 23)
    a = bins(he, xy, 9)
    for z in (9, 21):
        enc = wrap(pointwise, z, f"pointwise{z}")
        dense(a, enc, patch=z, key_added="X_dense", tile_px=64, overlap_px=4)
        want = patchpath(a, enc, z, "X_patch")
        np.testing.assert_allclose(a.obsm["X_dense"], want, rtol=1e-4, atol=1e-5)
        p = a.uns["X_dense"]["params"]
        assert p["path"] == "dense" and p["stride"] == 1 and p["patch_size_px"] == z and p["mpp"] == 1.0


def test_pooled_cells_equal_patch_path(he, pointwise):
    # stride-4 cells: a 16 px window on the cell grid averages exactly the cells the patch path pools
    net = torch.nn.Sequential(pointwise, torch.nn.AvgPool2d(4))
    enc = wrap(net, 16, "pool4")
    assert cell_geometry(enc)[:2] == (4, 4)
    xy = grid(24, 360, 20, offset=-0.5)  # x0 = ceil(x - 8) on the 4 px grid
    a = bins(he, xy, 16)
    dense(a, enc, patch=16, key_added="X_dense", tile_px=48, overlap_px=8)
    np.testing.assert_allclose(a.obsm["X_dense"], patchpath(a, enc, 16, "X_patch"), rtol=1e-4, atol=1e-5)


def test_sub_cell_bins_get_their_cell(he, pointwise):
    # 2 px bins on 8 px cells: each bin lying inside one cell gets that cell's value
    net = torch.nn.Sequential(pointwise, torch.nn.AvgPool2d(8))
    enc = wrap(net, 8, "pool8")
    xy = grid(40, 340, 8, offset=3.5)  # bin square [x - 1, x + 1) inside cell [8k, 8k + 8)
    a = bins(he, xy, 2)
    dense(a, enc, patch="spot", key_added="X_dense", tile_px=64, overlap_px=8)
    cells = patchpath(a, enc, 8, "X_cell")  # the 8 px block holding the bin (x0 = ceil(x - 4) = 8k)
    np.testing.assert_allclose(a.obsm["X_dense"], cells, rtol=1e-4, atol=1e-5)


def test_no_tile_seams(he, convnet):
    enc = wrap(convnet, 32, "conv")
    xy = grid(10, 170, 11, offset=0.3)
    a = bins(he, xy, 8)
    out = {}
    for tile, overlap in ((32, 16), (96, 16), (512, 16), (32, 0)):
        dense(a, enc, patch=("spot", "24px"), key_added=("X_s", "X_c"), tile_px=tile, overlap_px=overlap)
        out[tile, overlap] = np.c_[a.obsm["X_s"], a.obsm["X_c"]]
        assert a.uns["X_s"]["params"]["tile_px"] == tile
    np.testing.assert_allclose(out[32, 16], out[512, 16], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out[96, 16], out[512, 16], rtol=1e-4, atol=1e-5)
    # without overlap the tile borders show: the check above can fail
    assert np.abs(out[32, 0] - out[512, 16]).max() > 1e-2


def test_background_tiles_skipped(he, convnet):
    img = he.copy()
    img[:, 192:] = 255  # right half: white glass
    enc = wrap(convnet, 32, "conv")
    xy = grid(8, 376, 16)
    a = bins(img, xy, 8)
    dense(a, enc, patch="spot", key_added="X_auto", tile_px=64, overlap_px=16)
    p = a.uns["X_auto"]["params"]
    assert p["n_tiles"] == 36 and p["n_tiles_background"] >= 12
    assert p["n_tiles_encoded"] + p["n_tiles_background"] == p["n_tiles"]
    dense(a, enc, patch="spot", key_added="X_all", tile_px=64, overlap_px=16, tissue=False)
    assert a.uns["X_all"]["params"]["n_tiles_encoded"] == 36
    # far from the tissue a skipped tile's cells are what encoding the white tile gives
    far = xy[:, 0] > 192 + 64 + 32
    np.testing.assert_allclose(a.obsm["X_auto"][far], a.obsm["X_all"][far], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(a.obsm["X_auto"][xy[:, 0] < 150], a.obsm["X_all"][xy[:, 0] < 150], rtol=1e-5)


def test_otsu_threshold_splits_two_modes():
    rng = np.random.default_rng(0)
    v = np.r_[rng.normal(0.05, 0.01, 500), rng.normal(0.5, 0.05, 500)].clip(0, 1)
    assert 0.1 < otsu_threshold(v) < 0.4


def test_reads_are_bounded_by_tiles(he, convnet):
    big = np.tile(he, (2, 2, 1))  # 768 x 768
    slide = st.im.open_slide(big)
    sizes = []
    orig = slide._read

    def spy(lv, x, y, w, h, fill, out=None):
        sizes.append((w, h))
        return orig(lv, x, y, w, h, fill, out)

    slide._read = spy
    a = bins(big, grid(8, 760, 12), 8)
    enc = wrap(convnet, 32, "conv")
    dense(a, enc, patch=("spot", "6spacing"), key_added=("X_s", "X_c"), tile_px=96, overlap_px=16, image=slide)
    n_in = a.uns["X_s"]["params"]["tile_input_px"]
    assert sizes and max(w * h for w, h in sizes) <= n_in * n_in < big.shape[0] * big.shape[1] / 16
    assert len(sizes) == a.uns["X_s"]["params"]["n_tiles_encoded"]


def test_downsampled_scale_and_recorded_params(he, convnet):
    enc = wrap(convnet, 32, "conv")
    a = bins(he, grid(10, 380, 16), 16, mpp=0.25)
    dense(a, enc, patch=("spot", "6spacing"), key_added=("X_image", "X_image_context"), mpp=0.5, tile_px=64)
    p = a.uns["X_image_context"]["params"]
    assert p["downsample"] == 2.0 and p["mpp"] == 0.5 and p["patch_size_px"] == 96
    assert p["overlap_px"] == 24 and p["encoder"] == "conv" and p["weights_sha256"].startswith("module:")
    x = a.obsm["X_image"]
    assert x.dtype == np.float32 and x.shape == (a.n_obs, 6) and np.isfinite(x).all()
    # default scale: the context window at the encoder's input size, never finer than 0.5 um/px
    st.im.dense_features(a, enc, patch=("spot", "6spacing"), key_added=("X_a", "X_b"), cache=False,
                         progress=False, device="cpu")
    assert a.uns["X_a"]["params"]["mpp"] == max(0.5, 6 * 16 * 0.25 / 32)


def test_features_dispatch(he, pointwise, convnet):
    enc = wrap(convnet, 32, "conv")
    xy = grid(10, 380, 30)
    hd = bins(he, xy, 8)
    st.im.features(hd, enc, patch="spot", cache=False, progress=False, device="cpu")
    assert hd.uns["X_image"]["params"]["path"] == "dense"
    st.im.features(hd, enc, patch=("spot", "6spacing"), key_added=("s", "c"), pool=("mean", "section"), cache=False,
                   progress=False, device="cpu")  # the stmorph method's request reaches the dense path
    assert [hd.uns[k]["params"]["pool"] for k in ("s", "c")] == ["mean", "section"]
    assert hd.uns["c"]["params"]["path"] == "dense" and "n_section_fallback" in hd.uns["c"]["params"]
    visium = bins(he, xy, 8, technology="visium")
    st.im.features(visium, enc, patch="spot", cache=False, progress=False, device="cpu", backend="torch")
    assert "path" not in visium.uns["X_image"]["params"]
    # an encoder without a feature map stays on the patch path under "auto"
    flat = wrap(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()),
                16, "flat")
    st.im.features(hd, flat, patch="spot", key_added="X_flat", cache=False, progress=False, device="cpu",
                   backend="torch")
    assert "path" not in hd.uns["X_flat"]["params"]


@pytest.mark.parametrize("kw, match", [
    ({"tile_px": 0}, "tile_px must be an integer >= 1"),
    ({"overlap_px": -1}, "overlap_px must be an integer >= 0"),
    ({"mpp": -1.0}, "mpp must be a positive number"),
    ({"tissue": "yes"}, "tissue must be"),
    ({"precision": "int8"}, "not available on the dense path"),
    ({"patch": ("spot", "6spacing"), "key_added": "X"}, "key_added needs one obsm key per patch size"),
])
def test_bad_inputs_one_line(he, convnet, kw, match):
    a = bins(he, grid(10, 380, 30), 8)
    with pytest.raises(InputError, match=match) as e:
        dense(a, wrap(convnet, 32, "conv"), **{"patch": "spot", "key_added": "X", **kw})
    assert "\n" not in str(e.value)


def test_encoder_without_map_refused(he):
    flat = wrap(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()),
                16, "flat")
    a = bins(he, grid(10, 380, 30), 8)
    with pytest.raises(InputError, match="not a feature map") as e:
        dense(a, flat, patch="spot", key_added="X")
    assert "\n" not in str(e.value)
    with pytest.raises(InputError, match="method must be"):
        st.im.features(a, flat, method="grid")


def test_onnx_runtime_backend_equals_torch(he, convnet):
    """The default CPU backend (ONNX Runtime, trunk exported for the tile size) computes PyTorch's features."""
    pytest.importorskip("onnxruntime")
    enc = wrap(convnet, 32, "conv")
    a = bins(he, grid(10, 170, 11, offset=0.3), 8)
    out = {}
    for backend in ("torch", "onnxruntime"):
        dense(a, enc, patch=("spot", "24px"), key_added=("X_s", "X_c"), tile_px=64, overlap_px=16, backend=backend)
        assert a.uns["X_s"]["params"]["backend"] == backend
        out[backend] = np.c_[a.obsm["X_s"], a.obsm["X_c"]]
    np.testing.assert_allclose(out["onnxruntime"], out["torch"], rtol=1e-4, atol=1e-5)
    dense(a, enc, patch="spot", key_added="X_auto", tile_px=64, overlap_px=16)
    assert a.uns["X_auto"]["params"]["backend"] == "onnxruntime"


def test_section_pool_equals_patch_path_and_ignores_the_glass(he, pointwise):
    """pool="section" on the dense path: with a pointwise encoder at the image's scale it is the patch path's
    section average; what lies beyond the section does not enter it; a window with no cell in the section
    keeps the plain average (and is counted)."""
    img = he.copy()
    img[:, :150] = 245  # glass left of the section
    grey = img.copy()
    grey[:, :150] = 215  # another, still unstained, glass
    xy = grid(20, 360, 23)  # odd windows around integer centres, some across the edge, some on glass only
    enc = wrap(pointwise, 21, "pointwise21")
    out = {}
    for name, im in (("glass", img), ("grey", grey)):
        a = bins(im, xy, 21)
        # every tile encoded (tissue=False): a skipped glass tile would get the response to a white one
        dense(a, enc, patch=21, key_added="X_dense", tile_px=64, overlap_px=4, pool="section", tissue=False)
        st.im.features(a, enc, patch=21, key_added="X_patch", pool="section", method="patch", cache=False,
                       progress=False, device="cpu", precision="float32", backend="torch")
        np.testing.assert_allclose(a.obsm["X_dense"], a.obsm["X_patch"], rtol=1e-4, atol=1e-5)
        p = a.uns["X_dense"]["params"]
        assert p["pool"] == "section" and p["n_section_fallback"] == a.uns["X_patch"]["params"]["n_section_fallback"]
        out[name] = a
    on_glass = xy[:, 0] + 10 < 150  # windows wholly on glass: the plain average, which differs with the glass
    across = (xy[:, 0] - 10 < 150) & ~on_glass
    assert on_glass.any() and across.any()
    assert out["glass"].uns["X_dense"]["params"]["n_section_fallback"] == on_glass.sum()
    g, r = out["glass"].obsm["X_dense"], out["grey"].obsm["X_dense"]
    np.testing.assert_allclose(g[~on_glass], r[~on_glass], rtol=1e-4, atol=1e-5)
    assert not np.allclose(g[on_glass], r[on_glass], atol=1e-3)
    # the plain average does see the glass across the edge
    a = bins(img, xy, 21)
    dense(a, enc, patch=21, key_added="X_mean", tile_px=64, overlap_px=4, tissue=False)
    assert a.uns["X_mean"]["params"]["pool"] == "mean"
    assert not np.allclose(a.obsm["X_mean"][across], g[across], atol=1e-3)


def test_section_pool_is_cached_apart(he, convnet, tmp_path):
    a = bins(he, grid(10, 380, 30), 8)
    enc = wrap(convnet, 32, "conv")
    kw = {"patch": "spot", "cache": True, "cache_dir": tmp_path, "tile_px": 64}
    dense(a, enc, key_added="m", **kw)
    dense(a, enc, key_added="s", pool="section", **kw)
    assert not a.uns["s"]["params"]["from_cache"] and a.uns["s"]["params"]["cache_key"] != a.uns["m"]["params"]["cache_key"]
    dense(a, enc, key_added="s2", pool="section", **kw)
    assert a.uns["s2"]["params"]["from_cache"]
    np.testing.assert_array_equal(a.obsm["s"], a.obsm["s2"])
    with pytest.raises(InputError, match="pool="):
        dense(a, enc, pool="tissue", patch="spot", key_added="x")
