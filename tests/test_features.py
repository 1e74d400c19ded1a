"""stmorph.im.features: the streaming patch -> encoder pipeline, its cache and bad input."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

torch = pytest.importorskip("torch")

import stmorph  # noqa: E402
from stmorph.errors import InputError  # noqa: E402
from stmorph.im import _features, encoders  # noqa: E402
from stmorph.im.encoders import efficientnet_lite  # noqa: E402

H, W, SPOT = 180, 220, 24


def _image(seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (H // 4, W // 4, 3), dtype=np.uint8)
    return np.kron(img, np.ones((4, 4, 1), np.uint8))  # blocky texture, (H, W, 3)


def _adata(img=None, n_side=6) -> ad.AnnData:
    gx, gy = np.meshgrid(np.linspace(20, W - 20, n_side), np.linspace(20, H - 20, n_side))
    xy = np.c_[gx.ravel(), gy.ravel()]
    a = ad.AnnData(sp.csr_matrix((len(xy), 3), dtype=np.float32))
    a.obs_names = [f"s{i}" for i in range(len(xy))]
    a.obsm["spatial"] = xy
    a.uns["spatial"] = {"lib": {
        "images": {"fullres": _image() if img is None else img},
        "scalefactors": {"spot_diameter_fullres": float(SPOT), "tissue_hires_scalef": 1.0, "tissue_lowres_scalef": 1.0},
        "metadata": {"technology": "synthetic", "spot_diameter_um": 55.0},
    }}
    return a


def _direct(a, enc, patch="spot"):
    """Features computed without the pipeline: crop all patches, one forward pass."""
    patches = stmorph.im.crop_patches(a.copy(), patch, out_size=enc.input_size)
    with torch.inference_mode():
        return enc(enc.preprocess(patches)).numpy()


def test_features_match_direct_computation(tiny, tmp_path):
    a = _adata()
    stmorph.im.features(a, tiny, batch_size=7, cache_dir=tmp_path, progress=False, precision="float32")
    f = a.obsm["X_image"]
    assert f.dtype == np.float32 and f.shape == (a.n_obs, tiny.dim)
    np.testing.assert_allclose(f, _direct(a, tiny), rtol=1e-5, atol=1e-5)
    p = a.uns["X_image"]["params"]
    assert p["encoder"] == "tiny" and p["patch_size_px"] == SPOT and p["input_size"] == 32
    assert p["weights_sha256"].startswith("module:") and p["n_outside"] == 0 and p["image"] == "in-memory"
    assert p["device"] == "cpu" and p["dtype"] == "float32" and not p["from_cache"]


def test_rows_follow_obs_names_and_workers(tiny, tmp_path):
    a = _adata()
    b = a[::-1].copy()  # same spots, reversed order
    stmorph.im.features(a, tiny, cache=False, progress=False, precision="float32")
    stmorph.im.features(b, tiny, cache=False, progress=False, precision="float32", num_workers=3, batch_size=5, key_added="X_b")
    np.testing.assert_allclose(b.obsm["X_b"], a[b.obs_names].obsm["X_image"], rtol=1e-5, atol=1e-6)


def test_patch_sizes(tiny):
    a = _adata()
    stmorph.im.features(a, tiny, patch=40, cache=False, progress=False, precision="float32", key_added="X40")
    assert a.uns["X40"]["params"]["patch_size_px"] == 40
    np.testing.assert_allclose(a.obsm["X40"], _direct(a, tiny, 40), rtol=1e-5, atol=1e-5)
    # micrometres: spot is 55 um over 24 px
    stmorph.im.features(a, tiny, patch="110um", cache=False, progress=False, precision="float32", key_added="Xum")
    assert a.uns["Xum"]["params"]["patch_size_px"] == 48


def test_outside_spot_is_nan_with_warning(tiny):
    a = _adata()
    xy = a.obsm["spatial"].copy()
    xy[0] = (-500.0, -500.0)  # patch entirely outside
    xy[1] = (2.0, 2.0)  # crosses the border: computed on white fill
    a.obsm["spatial"] = xy
    with pytest.warns(UserWarning, match="1 of 36 spots have patches entirely outside"):
        stmorph.im.features(a, tiny, cache=False, progress=False, precision="float32")
    f = a.obsm["X_image"]
    assert np.isnan(f[0]).all() and np.isfinite(f[1:]).all()
    p = a.uns["X_image"]["params"]
    assert p["n_outside"] == 1 and p["n_border"] == 2


def test_cache_hit_skips_compute(tiny, tmp_path, monkeypatch):
    a = _adata()
    stmorph.im.features(a, tiny, cache_dir=tmp_path, progress=False, precision="float32")
    files = sorted(tmp_path.glob("*.npy"))
    assert len(files) == 1 and files[0].stem == a.uns["X_image"]["params"]["cache_key"]
    first = a.obsm["X_image"].copy()

    def boom(*args, **kwargs):
        raise AssertionError("features were recomputed despite a cache hit")

    monkeypatch.setattr(_features, "extract", boom)
    b = stmorph.im.features(a, tiny, cache_dir=tmp_path, progress=False, precision="float32", copy=True)
    np.testing.assert_array_equal(b.obsm["X_image"], first)
    assert b.uns["X_image"]["params"]["from_cache"]
    # any change to the key's parts is a miss: patch size, coordinates, image, encoder weights
    for change in (
        dict(patch=30),
        dict(image=_image(seed=1)),
    ):
        with pytest.raises(AssertionError, match="recomputed"):
            stmorph.im.features(a, tiny, cache_dir=tmp_path, progress=False, precision="float32", **change)
    moved = a.copy()
    moved.obsm["spatial"] = moved.obsm["spatial"] + 1.0
    with pytest.raises(AssertionError, match="recomputed"):
        stmorph.im.features(moved, tiny, cache_dir=tmp_path, progress=False, precision="float32")
    other = encoders.get_encoder(torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3)), input_size=32, name="tiny")
    with pytest.raises(AssertionError, match="recomputed"):
        stmorph.im.features(a, other, cache_dir=tmp_path, progress=False, precision="float32")
    monkeypatch.undo()
    stmorph.im.features(a, tiny, cache=False, cache_dir=tmp_path / "never", progress=False, precision="float32")
    assert not (tmp_path / "never").exists()


def test_cache_dir_env(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("STMORPH_CACHE_DIR", str(tmp_path / "env"))
    a = _adata()
    stmorph.im.features(a, tiny, progress=False, precision="float32")
    assert len(list((tmp_path / "env").glob("*.npy"))) == 1


def test_grayscale_rgba_and_16bit_images(tiny, tmp_path):
    rgb = _image()
    gray = rgb[..., 0]
    ref = _adata(np.repeat(gray[..., None], 3, axis=2))
    stmorph.im.features(ref, tiny, cache=False, progress=False, precision="float32")
    # grayscale array
    g = _adata(gray)
    stmorph.im.features(g, tiny, cache=False, progress=False, precision="float32")
    np.testing.assert_allclose(g.obsm["X_image"], ref.obsm["X_image"], rtol=1e-5, atol=1e-6)
    # RGBA (opaque) == RGB
    c = _adata(rgb)
    stmorph.im.features(c, tiny, cache=False, progress=False, precision="float32")
    rgba = _adata(np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)]))
    stmorph.im.features(rgba, tiny, cache=False, progress=False, precision="float32")
    np.testing.assert_allclose(rgba.obsm["X_image"], c.obsm["X_image"], rtol=1e-5, atol=1e-6)
    # 16-bit TIFF on disk, full dtype range: scaled to 8 bit, not truncated
    tifffile = pytest.importorskip("tifffile")
    path = tmp_path / "img16.tif"
    tifffile.imwrite(path, rgb.astype(np.uint16) * 257, photometric="rgb")
    t = _adata(rgb)
    stmorph.im.features(t, tiny, image=path, cache=False, progress=False, precision="float32")
    np.testing.assert_allclose(t.obsm["X_image"], c.obsm["X_image"], rtol=1e-5, atol=1e-5)
    assert t.uns["X_image"]["params"]["image"].startswith("file:")


def test_bad_input_errors(tiny, tmp_path):
    a = _adata()
    with pytest.raises(InputError, match="get_encoder"):
        stmorph.im.features(a, torch.nn.Conv2d(3, 4, 3), progress=False, precision="float32")
    with pytest.raises(InputError, match="unknown encoder"):
        stmorph.im.features(a, "vgg_nope", progress=False, precision="float32")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA"):
            stmorph.im.features(a, tiny, device="cuda", progress=False, precision="float32")
    del a.uns["spatial"]["lib"]["images"]["fullres"]
    with pytest.raises(InputError, match="full-resolution image"):
        stmorph.im.features(a, tiny, cache=False, progress=False, precision="float32")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    with pytest.raises(stmorph.ImageError):
        stmorph.im.features(a, tiny, image=tmp_path / "broken.jpg", cache=False, progress=False, precision="float32")


def test_efficientnet_lite2_features(tmp_path):
    a = _adata(n_side=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no outside spots here: no warning
        b = stmorph.im.features(a, cache_dir=tmp_path, progress=False, copy=True)
    assert "X_image" not in a.obsm
    f = b.obsm["X_image"]
    assert f.shape == (9, 1280) and f.dtype == np.float32 and np.isfinite(f).all()
    p = b.uns["X_image"]["params"]
    assert p["encoder"] == "efficientnet_lite2" and p["weights_sha256"] == efficientnet_lite.WEIGHTS_SHA256
    assert p["input_size"] == 260 and p["dim"] == 1280
    assert p["dtype"] == ("bfloat16" if _features.cpu_has_native_bf16() else "float32")
    # different spots give different features (not a constant output)
    assert np.ptp(f, axis=0).max() > 1e-3


def test_precision(tiny, tmp_path):
    a = _adata()
    stmorph.im.features(a, tiny, cache_dir=tmp_path, progress=False, precision="float32", key_added="f32")
    stmorph.im.features(a, tiny, cache_dir=tmp_path, progress=False, precision="bfloat16", key_added="bf16")
    assert a.uns["bf16"]["params"]["dtype"] == "bfloat16" and not a.uns["bf16"]["params"]["from_cache"]
    assert a.obsm["bf16"].dtype == np.float32
    f32, bf16 = a.obsm["f32"], a.obsm["bf16"]
    assert not np.array_equal(f32, bf16)  # really ran in bf16, and was not served from the float32 cache
    cos = (f32 * bf16).sum(1) / np.linalg.norm(f32, axis=1) / np.linalg.norm(bf16, axis=1)
    assert cos.min() > 0.99
    assert len(list(tmp_path.glob("*.npy"))) == 2
    with pytest.raises(InputError, match="precision"):
        stmorph.im.features(a, tiny, cache=False, progress=False, precision="int4")
    with pytest.raises(InputError, match="int8"):  # int8 is ONNX Runtime's only
        stmorph.im.features(a, tiny, cache=False, progress=False, precision="int8", backend="torch")
    with pytest.raises(InputError, match="CUDA"):
        stmorph.im.features(a, tiny, cache=False, progress=False, precision="float16", device="cpu")


def test_errors_in_threads_propagate(tiny):
    class Broken(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("encoder exploded")

    bad = encoders.get_encoder(torch.nn.Sequential(torch.nn.Conv2d(3, 2, 1)), input_size=8, name="bad")
    bad.model = Broken()
    a = _adata()
    with pytest.raises(RuntimeError, match="encoder exploded"):
        _features.extract(stmorph.im.slide_for(a), a.obsm["spatial"], SPOT, bad, streams=2, progress=False)
    with pytest.raises(InputError, match="NaN"):  # raised inside the producer thread by iter_patches
        xy = a.obsm["spatial"].copy()
        xy[3] = np.nan
        _features.extract(stmorph.im.slide_for(a), xy, SPOT, tiny, streams=2, progress=False)
