"""Slide fill read as glass (stmorph.im.slide._fill): black fill and transparent pixels become the
slide's background colour on every feature path, dark tissue is left alone, and the option is part
of the feature cache key."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from test_dense_features import bins

import stmorph as st
from stmorph.errors import InputError
from stmorph.im import encoders, iter_patches, open_slide, tissue_mask
from stmorph.im.slide._fill import BLACK_FILL_MAX, paint_fill, parse_color

NUCLEUS = (40, 20, 60)


def tissue_half_black(h=96, w=96):
    """Pink tissue with dark nuclei on the right half, pure black fill on the left half."""
    rng = np.random.default_rng(0)
    img = np.empty((h, w, 3), np.uint8)
    img[:] = (230, 150, 200)
    img[:, :, :] += rng.integers(0, 20, (h, w, 1)).astype(np.uint8)
    for y, x in rng.integers(4, min(h, w) - 4, (30, 2)):
        img[y - 2: y + 2, w // 2 + x // 2 - 2: w // 2 + x // 2 + 2] = NUCLEUS
    img[:, : w // 2] = 0
    return img


def spots(image, xy, side_px):
    """Visium spots of ``side_px`` at ``xy`` over an in-memory image (1 um per px)."""
    return bins(image, xy, side_px, technology="visium")


@pytest.fixture(scope="module")
def pointwise():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 1), torch.nn.ReLU()).eval()
    return encoders.get_encoder(net, input_size=9, name="pointwise9")


def features(a, enc, **kw):
    kw = {"patch": 9, "cache": False, "progress": False, "device": "cpu", "precision": "float32",
          "backend": "torch", **kw}
    st.im.features(a, enc, **kw)
    return a.obsm[kw.get("key_added", "X_image")]


def test_half_black_patch_gets_glass_and_nuclei_stay():
    img = tissue_half_black()
    xy = np.array([[48.0, 48.0]])
    raw = next(iter_patches(img, xy, 40)).patches[0]
    glass = next(iter_patches(img, xy, 40, fill="glass")).patches[0]
    left, right = glass[:, :20], glass[:, 20:]
    assert (raw[:, :20] == 0).all() and (left == 255).all()  # the fill became white glass
    np.testing.assert_array_equal(right, raw[:, 20:])  # tissue, nuclei included, untouched
    assert (right == NUCLEUS).all(axis=-1).any()
    # near-black JPEG noise is fill; anything with one channel above the threshold is not
    px = np.array([[[3, 0, 1], [BLACK_FILL_MAX] * 3, [0, 0, BLACK_FILL_MAX + 1], list(NUCLEUS), [10, 5, 30]]],
                  np.uint8)
    out = paint_fill(px.copy(), (240, 241, 242))
    np.testing.assert_array_equal(out[0, :2], [[240, 241, 242]] * 2)
    np.testing.assert_array_equal(out[0, 2:], px[0, 2:])


def test_read_region_glass_also_fills_outside_and_leaves_source_alone():
    img = tissue_half_black()
    before = img.copy()
    s = open_slide(img)
    r = s.read_region(-8, -8, 16, 16, fill="glass")
    assert (r == 255).all()  # outside the image and black fill alike
    assert (s.read_region(-8, -8, 16, 16)[8:, 8:] == 0).all()  # the default read is raw
    np.testing.assert_array_equal(img, before)  # painting never writes into the source
    thumb, _ = s.thumbnail(48, fill="glass")
    assert (thumb[:, :20] == 255).all() and (s.thumbnail(48)[0][:, :20] == 0).all()
    np.testing.assert_array_equal(img, before)
    with pytest.raises(InputError, match="fill must be"):
        s.read_region(0, 0, 4, 4, fill="black")


def test_rgba_transparent_regions_composited_on_background():
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., :3] = (200, 100, 150)
    rgba[..., 3] = 255
    rgba[:, :16, 3] = 0  # transparent: e.g. an unscanned area
    rgba[:, :16, :3] = 0  # whose colour samples are black, as OpenSlide returns them
    r = open_slide(rgba).read_region(0, 0, 32, 32)
    assert (r[:, :16] == 255).all() and (r[:, 16:] == (200, 100, 150)).all()


def _fake_openslide(monkeypatch, rgba, background):
    """A stand-in ``openslide`` module: one level returning ``rgba`` regions, a declared background colour."""
    from PIL import Image

    mod = types.ModuleType("openslide")

    class OpenSlideError(Exception):
        pass

    class OpenSlide:
        def __init__(self, path):
            self.level_count = 1
            self.level_dimensions = [(rgba.shape[1], rgba.shape[0])]
            self.level_downsamples = [1.0]
            self.properties = {"openslide.vendor": "fake", "openslide.background-color": background}

        def read_region(self, loc, k, size):
            (x, y), (w, h) = loc, size
            return Image.fromarray(np.ascontiguousarray(rgba[y: y + h, x: x + w]), "RGBA")

        def close(self):
            pass

    mod.OpenSlide, mod.OpenSlideError = OpenSlide, OpenSlideError
    mod.OpenSlideUnsupportedFormatError = type("OpenSlideUnsupportedFormatError", (OpenSlideError,), {})
    monkeypatch.setitem(sys.modules, "openslide", mod)


def test_openslide_alpha_goes_onto_declared_background(tmp_path, monkeypatch):
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[10:30, 10:30] = (180, 90, 160, 255)  # scanned tissue; around it alpha 0 with black samples
    _fake_openslide(monkeypatch, rgba, "F0E8DC")
    path = tmp_path / "slide.mrxs"
    path.write_bytes(b"fake")
    with open_slide(path) as s:
        assert s.backend == "openslide" and s.background == (240, 232, 220)
        r = s.read_region(0, 0, 40, 40)
        assert (r[:5, :5] == (240, 232, 220)).all() and (r[15, 15] == (180, 90, 160)).all()
        g = s.read_region(-4, -4, 8, 8, fill="glass")  # outside the image: the same colour
        assert (g == (240, 232, 220)).all()
    assert parse_color(None) == (255, 255, 255) and parse_color("zz") == (255, 255, 255)


def test_features_fill_option_recorded_and_in_cache_key(tmp_path, pointwise):
    img = tissue_half_black()
    a = spots(img, [[20.0, 20.0], [44.0, 50.0], [70.0, 30.0]], 9)
    g = features(a, pointwise, cache=True, cache_dir=tmp_path).copy()
    pg = dict(a.uns["X_image"]["params"])
    n = features(a, pointwise, cache=True, cache_dir=tmp_path, fill=None).copy()
    pn = dict(a.uns["X_image"]["params"])
    assert pg["fill"] == "glass" and pg["glass_rgb"] == [255, 255, 255] and pg["black_fill_max"] == BLACK_FILL_MAX
    assert pn["fill"] is None and pg["cache_key"] != pn["cache_key"] and not pn["from_cache"]
    assert not np.allclose(g[0], n[0])  # the spot on black fill changed; the one on tissue did not
    np.testing.assert_allclose(g[2], n[2], rtol=1e-6)
    features(a, pointwise, cache=True, cache_dir=tmp_path)
    assert a.uns["X_image"]["params"]["from_cache"] and a.uns["X_image"]["params"]["cache_key"] == pg["cache_key"]
    # glass fill equals reading an image whose fill was painted white beforehand
    white = img.copy()
    white[:, :48] = 255
    np.testing.assert_allclose(g, features(spots(white, a.obsm["spatial"], 9), pointwise, fill=None), rtol=1e-6)
    with pytest.raises(InputError, match="fill must be 'glass' or None"):
        features(a, pointwise, fill="white")


def test_dense_and_patch_paths_agree_with_glass_fill(pointwise):
    img = tissue_half_black(96, 96)
    xy = np.array([[x, y] for x in range(4, 96, 11) for y in range(4, 96, 13)], np.float64)  # border spots too
    a = spots(img, xy, 9)
    patch = features(a, pointwise, method="patch", key_added="X_patch").copy()
    st.im.dense_features(a, pointwise, patch=9, key_added="X_dense", mpp=1.0, tile_px=32, overlap_px=4,
                         cache=False, progress=False, device="cpu", precision="float32")
    np.testing.assert_allclose(a.obsm["X_dense"], patch, rtol=1e-4, atol=1e-5)
    assert a.uns["X_dense"]["params"]["fill"] == "glass"
    raw = features(a, pointwise, method="patch", key_added="X_raw", fill=None)
    assert np.abs(raw - patch).max() > 1e-3  # the option changes what the paths see


def test_tissue_mask_never_counts_black_fill():
    img = tissue_half_black(128, 128)
    rng = np.random.default_rng(1)
    noise = rng.integers(0, 6, (128, 64, 3)).astype(np.uint8)  # JPEG-like noise on the fill: saturated
    img[:, :64] = noise
    mask, scale, _ = tissue_mask(img, max_side=128)
    assert scale == 1.0
    assert not mask[:, :62].any() and mask[:, 66:].mean() > 0.9
