"""Spot-centred patches: exact crops, padding and flags, ordering, sizes, bounded decoding."""

from __future__ import annotations

import queue
import threading
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from stmorph.errors import InputError
from stmorph.im import PatchBatch, crop_patches, iter_patches, open_slide, patch_size_px
from stmorph.im._patches import patch_origins

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
C2 = DATA / "her2st" / "ST-imgs" / "C" / "C2" / "5714_HE_BT_C2.jpg"


def _rgb(h=300, w=500, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _ref_patch(a, cx, cy, size, fill=255):
    x0 = int(np.ceil(cx - size / 2))
    y0 = int(np.ceil(cy - size / 2))
    out = np.full((size, size, 3), fill, np.uint8)
    X0, Y0, X1, Y1 = max(x0, 0), max(y0, 0), min(x0 + size, a.shape[1]), min(y0 + size, a.shape[0])
    if X1 > X0 and Y1 > Y0:
        out[Y0 - y0: Y1 - y0, X0 - x0: X1 - x0] = a[Y0:Y1, X0:X1]
    inside = max(0, X1 - X0) * max(0, Y1 - Y0) / size**2
    return out, inside


def _collect(batches, n, s):
    patches = np.zeros((n, s, s, 3), np.uint8)
    inside = np.full(n, -1.0, np.float32)
    seen = np.zeros(n, int)
    for b in batches:
        assert isinstance(b, PatchBatch)
        assert b.index.dtype == np.int64 and b.patches.dtype == np.uint8 and b.inside.dtype == np.float32
        assert b.patches.shape[1:] == (s, s, 3) and len(b.index) == len(b.patches) == len(b.inside)
        patches[b.index] = b.patches
        inside[b.index] = b.inside
        seen[b.index] += 1
    assert (seen == 1).all(), "every spot exactly once"
    return patches, inside


@pytest.fixture(scope="module")
def tiled(tmp_path_factory):
    a = _rgb(700, 900, seed=3)
    path = tmp_path_factory.mktemp("p") / "tiled.tif"
    tifffile.imwrite(path, a, tile=(64, 64), compression="zlib")
    return a, path


@pytest.mark.parametrize("size", [1, 16, 31, 64, 150])
def test_patches_equal_numpy_slicing(tiled, size):
    a, path = tiled
    rng = np.random.default_rng(size)
    xy = np.column_stack([rng.uniform(-100, 1000, 300), rng.uniform(-100, 800, 300)])
    xy[:5] = [[0, 0], [899.5, 699.5], [450.25, 350.75], [-5000, 10], [450, 2000]]
    with open_slide(path) as s:
        patches, inside = _collect(iter_patches(s, xy, size, batch_size=17), len(xy), size)
    for i in range(len(xy)):
        ref, frac = _ref_patch(a, *xy[i], size)
        np.testing.assert_array_equal(patches[i], ref)
        assert inside[i] == pytest.approx(frac)
    assert inside[3] == 0 and inside[4] == 0  # entirely outside: flagged, all fill
    assert (patches[3] == 255).all()


def test_formats_give_same_patches(tiled, tmp_path):
    a, path = tiled
    tifffile.imwrite(tmp_path / "strips.tif", a, rowsperstrip=50, compression="zlib")
    Image.fromarray(a).save(tmp_path / "a.png")
    xy = np.random.default_rng(0).uniform(0, 900, (100, 2))
    results = []
    for src in (a, path, tmp_path / "strips.tif", tmp_path / "a.png"):
        results.append(_collect(iter_patches(src, xy, 40, fill=0), len(xy), 40))
    for p, ins in results[1:]:
        np.testing.assert_array_equal(p, results[0][0])
        np.testing.assert_array_equal(ins, results[0][1])


def test_out_size_resize_matches_pillow(tiled):
    a, path = tiled
    xy = np.array([[100.0, 100.0], [450.0, 300.0], [5.0, 690.0]])
    with open_slide(path) as s:
        patches, _ = _collect(iter_patches(s, xy, 145, out_size=260), 3, 260)
        small, _ = _collect(iter_patches(s, xy, 145, out_size=32), 3, 32)
    for i in range(3):
        ref, _ = _ref_patch(a, *xy[i], 145)
        np.testing.assert_array_equal(patches[i], np.asarray(Image.fromarray(ref).resize((260, 260), Image.BILINEAR)))
        np.testing.assert_array_equal(small[i], np.asarray(Image.fromarray(ref).resize((32, 32), Image.BILINEAR)))


def test_each_tile_decoded_once_with_small_cache(tmp_path):
    a = _rgb(1024, 1024, seed=9)
    path = tmp_path / "grid.tif"
    tifffile.imwrite(path, a, tile=(64, 64), compression="zlib")
    # dense hex-like grid of spots over the whole image, given in shuffled order
    ys, xs = np.mgrid[20:1024:37, 20:1024:37]
    xy = np.column_stack([xs.ravel() + (ys.ravel() // 37 % 2) * 18, ys.ravel()]).astype(float)
    xy = xy[np.random.default_rng(0).permutation(len(xy))]
    # cache of ~4 tile rows (one row = 16 tiles of 12 KB): enough for patches 50 px high
    with open_slide(path, cache_bytes=4 * 16 * 64 * 64 * 3) as s:
        patches, _ = _collect(iter_patches(s, xy, 50), len(xy), 50)
        info = s.cache_info()
    assert info["decoded"] == 16 * 16  # every tile decoded exactly once
    assert info["nbytes"] <= info["max_bytes"]
    for i in range(0, len(xy), 23):
        np.testing.assert_array_equal(patches[i], _ref_patch(a, *xy[i], 50)[0])


def test_consume_from_background_thread(tiled):
    a, path = tiled
    xy = np.random.default_rng(2).uniform(0, 700, (200, 2))
    q: queue.Queue = queue.Queue(maxsize=2)
    with open_slide(path) as s:
        def produce():
            for b in iter_patches(s, xy, 30, batch_size=16):
                q.put(b)
            q.put(None)

        t = threading.Thread(target=produce)
        t.start()
        # the main thread reads from the same slide meanwhile
        main_reads = [s.read_region(10, 10, 30, 30) for _ in range(20)]
        patches, _ = _collect(iter(q.get, None), len(xy), 30)
        t.join()
    np.testing.assert_array_equal(main_reads[-1], a[10:40, 10:40])
    for i in range(0, 200, 13):
        np.testing.assert_array_equal(patches[i], _ref_patch(a, *xy[i], 30)[0])


def test_iter_patches_bad_arguments(tiled):
    _, path = tiled
    with open_slide(path) as s:
        for kwargs in ({"size": 0}, {"size": 10, "out_size": 0}, {"size": 10, "batch_size": 0},
                       {"size": 10, "fill": 300}):
            with pytest.raises(InputError):
                next(iter_patches(s, np.zeros((2, 2)), **kwargs))
        with pytest.raises(InputError, match="shape"):
            next(iter_patches(s, np.zeros((2, 3)), 10))
        with pytest.raises(InputError, match="NaN"):
            next(iter_patches(s, np.array([[1.0, np.nan]]), 10))
        assert list(iter_patches(s, np.zeros((0, 2)), 10)) == []


def test_patch_origins_centre():
    # even and odd sizes: centre pixel of the patch is the spot's pixel
    np.testing.assert_array_equal(patch_origins(np.array([[10.0, 10.0]]), 5), [[8, 8]])
    np.testing.assert_array_equal(patch_origins(np.array([[10.0, 10.0]]), 4), [[8, 8]])
    np.testing.assert_array_equal(patch_origins(np.array([[10.4, 9.6]]), 5), [[8, 8]])
    np.testing.assert_array_equal(patch_origins(np.array([[-0.2, 3.0]]), 1), [[0, 3]])


def _adata(image=None, diameter=40.0, technology="visium", mpp=None):
    ad = pytest.importorskip("anndata")
    adata = ad.AnnData(np.zeros((4, 1), np.float32))
    adata.obs_names = [f"s{i}" for i in range(4)]
    adata.obsm["spatial"] = np.array([[50.0, 50.0], [5.0, 5.0], [499.0, 100.0], [2000.0, 2000.0]])
    meta = {"technology": technology}
    if mpp:
        meta["microns_per_pixel"] = mpp
    adata.uns["spatial"] = {"lib": {"images": {} if image is None else {"fullres": image},
                                    "scalefactors": {"spot_diameter_fullres": diameter}, "metadata": meta}}
    return adata


def test_patch_size_px():
    adata = _adata(diameter=40.4)
    assert patch_size_px(adata) == 40
    assert patch_size_px(adata, "spot") == 40
    assert patch_size_px(adata, "1.5spot") == 61
    assert patch_size_px(adata, 224) == 224
    assert patch_size_px(adata, np.int64(7)) == 7
    assert patch_size_px(adata, "224px") == 224
    assert patch_size_px(adata, 99.6) == 100
    # Visium: 55 um spot = 40.4 px
    assert patch_size_px(adata, "55um") == 40
    assert patch_size_px(adata, "110 µm") == 81
    assert patch_size_px(adata, (110, "um")) == 81
    assert patch_size_px(_adata(mpp=0.5), "100um") == 200
    for bad in ("abc", "12 furlongs", -3, 0, True, "0px", "0.1px", None, "nanpx"):
        with pytest.raises(InputError):
            patch_size_px(adata, bad)


def test_crop_patches_flags_border_and_outside():
    a = _rgb(200, 500, seed=4)
    adata = _adata(image=a, diameter=40.0)
    patches = crop_patches(adata)
    assert patches.shape == (4, 40, 40, 3) and patches.dtype == np.uint8
    np.testing.assert_array_equal(patches[0], a[30:70, 30:70])
    assert list(adata.obs["patch_border"]) == [False, True, True, True]
    frac = adata.obs["patch_inside_frac"].to_numpy()
    assert frac[0] == 1.0 and frac[1] == pytest.approx(25 * 25 / 1600) and frac[3] == 0.0
    assert (patches[3] == 255).all()
    small = crop_patches(adata, "20px", out_size=64, image=a)
    assert small.shape == (4, 64, 64, 3)


@pytest.mark.realdata
@pytest.mark.skipif(not C2.exists(), reason="../shared/data not present")
def test_her2st_c2_patches():
    rng = np.random.default_rng(0)
    with open_slide(C2) as s:
        xy = np.column_stack([rng.uniform(100, s.width - 100, 40), rng.uniform(100, s.height - 100, 40)])
        patches, inside = _collect(iter_patches(s, xy, 145, out_size=260, batch_size=16), 40, 260)
        direct = s.read_region(int(np.ceil(xy[0, 0] - 72.5)), int(np.ceil(xy[0, 1] - 72.5)), 145, 145)
    assert (inside == 1).all()
    np.testing.assert_array_equal(patches[0], np.asarray(Image.fromarray(direct).resize((260, 260), Image.BILINEAR)))
