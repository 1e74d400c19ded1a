"""Lazy whole-slide access: formats, layouts, conversion to uint8 RGB, bad files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from stmorph.errors import ImageError, InputError
from stmorph.im import Slide, open_slide, slide_for

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
C2 = DATA / "her2st" / "ST-imgs" / "C" / "C2" / "5714_HE_BT_C2.jpg"


def _rgb(h=300, w=500, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _region(a, x, y, w, h, fill=255):
    """Reference crop of an RGB array with out-of-image pixels set to fill."""
    out = np.full((h, w, 3), fill, np.uint8)
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, a.shape[1]), min(y + h, a.shape[0])
    if x1 > x0 and y1 > y0:
        out[y0 - y: y1 - y, x0 - x: x1 - x] = a[y0:y1, x0:x1]
    return out


REGIONS = [(0, 0, 500, 300), (10, 20, 37, 41), (120, 100, 200, 150), (-30, -20, 80, 60), (450, 260, 100, 100),
           (600, 10, 20, 20), (-5, 299, 510, 3)]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"tile": (64, 64), "compression": "zlib"},
        {"tile": (64, 128)},  # uncompressed tiled
        {"rowsperstrip": 37, "compression": "zlib"},  # stripped, last strip short
        {"rowsperstrip": 300, "compression": "lzw"},  # one strip
        {},  # uncompressed contiguous: memory-mapped
        {"tile": (64, 64), "compression": "zlib", "predictor": True},
    ],
    ids=["tiled-zlib", "tiled-raw", "strips", "one-strip", "contiguous", "predictor"],
)
def test_tiff_layouts_read_region_exact(tmp_path, kwargs):
    a = _rgb()
    path = tmp_path / "img.tif"
    tifffile.imwrite(path, a, photometric="rgb", **kwargs)
    with open_slide(path) as s:
        assert (s.width, s.height) == (500, 300)
        assert s.level_shapes == [(300, 500)]
        assert s.dtype == np.uint8
        for x, y, w, h in REGIONS:
            r = s.read_region(x, y, w, h)
            assert r.dtype == np.uint8 and r.shape == (h, w, 3)
            np.testing.assert_array_equal(r, _region(a, x, y, w, h))
        np.testing.assert_array_equal(s.read_region(-10, -10, 20, 20, fill=0), _region(a, -10, -10, 20, 20, 0))


def test_planar_separate_and_bigtiff(tmp_path):
    a = _rgb()
    p1 = tmp_path / "sep.tif"
    tifffile.imwrite(p1, np.moveaxis(a, -1, 0), photometric="rgb", planarconfig="separate", rowsperstrip=50,
                     compression="zlib")
    p2 = tmp_path / "big.tif"
    tifffile.imwrite(p2, a, bigtiff=True, tile=(64, 64), compression="zlib")
    for p in (p1, p2):
        with open_slide(p) as s:
            for x, y, w, h in REGIONS:
                np.testing.assert_array_equal(s.read_region(x, y, w, h), _region(a, x, y, w, h))


def test_jpeg_tiled_tiff_matches_tifffile(tmp_path):
    a = _rgb()
    a[:] = np.linspace(0, 255, 500, dtype=np.uint8)[None, :, None]  # smooth: small JPEG error
    path = tmp_path / "jpeg.tif"
    tifffile.imwrite(path, a, tile=(64, 64), compression="jpeg", photometric="rgb")
    ref = tifffile.imread(path)
    with open_slide(path) as s:
        np.testing.assert_array_equal(s.read_region(33, 17, 200, 150), ref[17:167, 33:233])
        assert np.abs(s.read_region(0, 0, 500, 300).astype(int) - a).max() < 12


def test_pyramid_levels_and_thumbnail(tmp_path):
    a = _rgb(512, 768)
    path = tmp_path / "pyr.tif"
    levels = [a, a[::2, ::2], a[::4, ::4]]
    with tifffile.TiffWriter(path) as w:
        w.write(levels[0], tile=(64, 64), subifds=2, compression="zlib", photometric="rgb")
        for lev in levels[1:]:
            w.write(lev, tile=(64, 64), subfiletype=1, compression="zlib", photometric="rgb")
    with open_slide(path) as s:
        assert s.level_shapes == [(512, 768), (256, 384), (128, 192)]
        assert s.level_downsamples == [1.0, 2.0, 4.0]
        # x, y in level-0 pixels; w, h in level pixels
        np.testing.assert_array_equal(s.read_region(40, 80, 50, 30, level=1), levels[1][40:70, 20:70])
        np.testing.assert_array_equal(s.read_region(-8, 0, 10, 10, level=2), _region(levels[2], -2, 0, 10, 10))
        thumb, scale = s.thumbnail(150)
        assert max(thumb.shape[:2]) <= 150 and thumb.dtype == np.uint8 and thumb.shape[2] == 3
        assert scale == pytest.approx(thumb.shape[1] / 768)
        with pytest.raises(InputError):
            s.read_region(0, 0, 5, 5, level=3)
    with open_slide(path, level=1) as s1:  # level 1 becomes the base
        assert (s1.width, s1.height) == (384, 256)
        np.testing.assert_array_equal(s1.read_region(5, 6, 7, 8), levels[1][6:14, 5:12])


def test_thumbnail_streams_and_matches_resize(tmp_path, monkeypatch):
    import stmorph.im._slide as slide_mod

    yy, xx = np.mgrid[0:601, 0:900]
    a = np.stack([xx % 256, yy % 256, (xx + yy) % 256], -1).astype(np.uint8)
    path = tmp_path / "t.tif"
    tifffile.imwrite(path, a, tile=(64, 64), compression="zlib")
    # bands of one tile row (64 rows, not a multiple of the factor 3): rows carried between bands
    monkeypatch.setattr(slide_mod, "_THUMB_BAND_BYTES", 64 * 900 * 3)
    with open_slide(path) as s:
        thumb, scale = s.thumbnail(300)
        assert s.cache_info()["nbytes"] == 0  # streamed past the cache
    assert thumb.shape == (201, 300, 3) and scale == pytest.approx(1 / 3)
    np.testing.assert_array_equal(thumb, np.asarray(Image.fromarray(a).reduce(3)))
    with open_slide(path) as s:
        thumb, _ = s.thumbnail(200)  # reduce by 3 then resize to 200
    assert thumb.shape == (134, 200, 3)
    with open_slide(a) as s:
        t2, sc2 = s.thumbnail(5000)  # larger than the image: unchanged
    assert t2.shape == a.shape and sc2 == 1.0


def test_grayscale_rgba_uint16_conversion(tmp_path):
    rng = np.random.default_rng(1)
    g = rng.integers(0, 256, (120, 90), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "g.tif", g, tile=(32, 32), compression="zlib")
    with open_slide(tmp_path / "g.tif") as s:
        np.testing.assert_array_equal(s.read_region(0, 0, 90, 120), np.repeat(g[:, :, None], 3, 2))

    rgba = rng.integers(0, 256, (64, 64, 4), dtype=np.uint8)
    rgba[:32, :, 3] = 255
    rgba[32:, :, 3] = 0
    tifffile.imwrite(tmp_path / "rgba.tif", rgba, photometric="rgb", extrasamples=["unassalpha"])
    with open_slide(tmp_path / "rgba.tif") as s:
        r = s.read_region(0, 0, 64, 64)
    np.testing.assert_array_equal(r[:32], rgba[:32, :, :3])  # opaque: colour kept
    assert (r[32:] == 255).all()  # transparent: white
    # associated (premultiplied) alpha, and an unspecified extra sample (dropped, not composited)
    pre = rgba.copy()
    pre[..., 3] = 100
    pre[..., :3] = (pre[..., :3] * (100 / 255)).astype(np.uint8)
    tifffile.imwrite(tmp_path / "pre.tif", pre, photometric="rgb", extrasamples=["assocalpha"])
    with open_slide(tmp_path / "pre.tif") as s:
        r = s.read_region(0, 0, 64, 64)
    expect = np.round(pre[..., :3] + 255 * (1 - 100 / 255)).astype(np.uint8)
    assert np.abs(r.astype(int) - expect).max() <= 1
    tifffile.imwrite(tmp_path / "x.tif", pre, photometric="rgb", extrasamples=["unspecified"])
    with open_slide(tmp_path / "x.tif") as s:
        np.testing.assert_array_equal(s.read_region(0, 0, 64, 64), pre[..., :3])
    half = rgba.copy()
    half[..., 3] = 128
    expect = np.round(half[..., :3] * (128 / 255) + 255 * (1 - 128 / 255)).astype(np.uint8)
    with open_slide(half) as s:
        assert np.abs(s.read_region(0, 0, 64, 64).astype(int) - expect).max() <= 1

    u16 = rng.integers(0, 65536, (50, 70, 3), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "u16.tif", u16, tile=(16, 16), photometric="rgb")
    with open_slide(tmp_path / "u16.tif") as s:
        assert s.dtype == np.uint16
        r = s.read_region(0, 0, 70, 50)
    np.testing.assert_array_equal(r, np.round(u16 / 65535 * 255).astype(np.uint8))
    # 12-bit data in uint16 containers: scaled by the declared bits, not the container
    u12 = (u16 >> 4).astype(np.uint16)
    tifffile.imwrite(tmp_path / "u12.tif", u12, photometric="rgb", bitspersample=12, rowsperstrip=16)
    with open_slide(tmp_path / "u12.tif") as s:
        r = s.read_region(0, 0, 70, 50)
    np.testing.assert_array_equal(r, np.round(u12 / 4095 * 255).astype(np.uint8))


def test_minisWhite_palette_bilevel(tmp_path):
    bits = np.zeros((8, 8), bool)
    bits[:4] = True
    tifffile.imwrite(tmp_path / "b.tif", bits, photometric="minisblack")
    with open_slide(tmp_path / "b.tif") as s:
        r = s.read_region(0, 0, 8, 8)
    assert (r[:4] == 255).all() and (r[4:] == 0).all()
    g = np.arange(256, dtype=np.uint8).reshape(16, 16)
    tifffile.imwrite(tmp_path / "w.tif", g, photometric="miniswhite")
    with open_slide(tmp_path / "w.tif") as s:
        np.testing.assert_array_equal(s.read_region(0, 0, 16, 16)[..., 0], 255 - g)
    cmap = np.zeros((3, 256), np.uint16)
    cmap[0] = np.arange(256) * 257
    cmap[2] = 65535
    tifffile.imwrite(tmp_path / "p.tif", g, photometric="palette", colormap=cmap)
    with open_slide(tmp_path / "p.tif") as s:
        r = s.read_region(0, 0, 16, 16)
    np.testing.assert_array_equal(r[..., 0], g)
    assert (r[..., 1] == 0).all() and (r[..., 2] == 255).all()


def test_multipage_channel_tiff_via_zarr(tmp_path):
    a = _rgb(64, 80)
    path = tmp_path / "ome.tif"
    tifffile.imwrite(path, np.moveaxis(a, -1, 0), photometric="minisblack", metadata={"axes": "CYX"}, ome=True)
    with open_slide(path) as s:
        assert (s.width, s.height) == (80, 64)
        np.testing.assert_array_equal(s.read_region(-3, 5, 40, 30), _region(a, -3, 5, 40, 30))


def test_unsupported_tiffs_raise(tmp_path):
    tifffile.imwrite(tmp_path / "f.tif", np.zeros((10, 10, 3), np.float32), photometric="rgb")
    tifffile.imwrite(tmp_path / "c5.tif", np.zeros((5, 10, 10), np.uint8), photometric="minisblack",
                     metadata={"axes": "CYX"}, ome=True)
    tifffile.imwrite(tmp_path / "i16.tif", np.zeros((10, 10), np.int16))
    for name in ("f.tif", "c5.tif", "i16.tif"):
        with pytest.raises(ImageError, match=name):
            open_slide(tmp_path / name)


def test_png_jpeg(tmp_path):
    a = _rgb(130, 170)
    Image.fromarray(a).save(tmp_path / "a.png")
    Image.fromarray(np.dstack([a, np.full(a.shape[:2], 255, np.uint8)])).save(tmp_path / "rgba.png")
    Image.fromarray(a[..., 0]).save(tmp_path / "g.png")
    with open_slide(tmp_path / "a.png") as s:
        assert (s.width, s.height) == (170, 130) and s.format == "PNG"
        np.testing.assert_array_equal(s.read_region(-4, 3, 60, 50), _region(a, -4, 3, 60, 50))
    with open_slide(tmp_path / "rgba.png") as s:
        np.testing.assert_array_equal(s.read_region(0, 0, 170, 130), a)
    with open_slide(tmp_path / "g.png") as s:
        np.testing.assert_array_equal(s.read_region(0, 0, 170, 130), np.repeat(a[..., :1], 3, 2))
    # 16-bit grayscale PNG: scaled by 65535
    g16 = (np.arange(130 * 170).reshape(130, 170) * 2).astype(np.uint16)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    with open_slide(tmp_path / "g16.png") as s:
        r = s.read_region(0, 0, 170, 130)
    np.testing.assert_array_equal(r[..., 1], np.round(g16 / 65535 * 255).astype(np.uint8))
    # 16-bit RGB PNG (Pillow would truncate it; read at full depth, scaled by 65535)
    imagecodecs = pytest.importorskip("imagecodecs")
    rgb16 = np.random.default_rng(3).integers(0, 65536, (20, 30, 3), dtype=np.uint16)
    (tmp_path / "rgb16.png").write_bytes(imagecodecs.png_encode(rgb16))
    with open_slide(tmp_path / "rgb16.png") as s:
        np.testing.assert_array_equal(s.read_region(0, 0, 30, 20), np.round(rgb16 / 65535 * 255).astype(np.uint8))
    # palette PNG
    Image.fromarray(a).quantize(16).save(tmp_path / "p.png")
    with open_slide(tmp_path / "p.png") as s:
        ref = np.asarray(Image.open(tmp_path / "p.png").convert("RGB"))
        np.testing.assert_array_equal(s.read_region(0, 0, 170, 130), ref)
    # JPEG: same pixels as Pillow decodes; thumbnail (draft mode) before any full decode
    Image.fromarray(a).save(tmp_path / "a.jpg", quality=90)
    ref = np.asarray(Image.open(tmp_path / "a.jpg").convert("RGB")).astype(int)
    with open_slide(tmp_path / "a.jpg") as s:
        thumb, scale = s.thumbnail(50)
        assert max(thumb.shape[:2]) <= 50 and scale == pytest.approx(thumb.shape[1] / 170)
        assert np.abs(s.read_region(0, 0, 170, 130).astype(int) - ref).max() <= 2


def _truncate(src: Path, dst: Path, frac=0.6):
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * frac)])
    return dst


def test_truncated_and_unreadable_files(tmp_path):
    a = _rgb(200, 200)
    Image.fromarray(a).save(tmp_path / "a.jpg")
    Image.fromarray(a).save(tmp_path / "a.png")
    tifffile.imwrite(tmp_path / "a.tif", a, tile=(64, 64), compression="zlib")
    for name in ("a.jpg", "a.png", "a.tif"):
        bad = _truncate(tmp_path / name, tmp_path / f"trunc_{name}")
        with pytest.raises(ImageError, match=f"trunc_{name}"):
            s = open_slide(bad)
            s.read_region(0, 0, 200, 200)
    (tmp_path / "junk.tif").write_bytes(b"II*\x00" + b"\xff" * 100)
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    (tmp_path / "empty.jpg").write_bytes(b"")
    for name in ("junk.tif", "junk.png", "empty.jpg", "missing.tif"):
        with pytest.raises(ImageError, match=name):
            open_slide(tmp_path / name)
    with pytest.raises(ImageError):
        open_slide(tmp_path)  # a folder
    with pytest.raises(InputError):
        open_slide(12)


def test_corrupt_tile_raises(tmp_path):
    a = _rgb(128, 128)
    path = tmp_path / "c.tif"
    tifffile.imwrite(path, a, tile=(64, 64), compression="zlib")
    with tifffile.TiffFile(path) as t:
        off = t.pages[0].dataoffsets[3]
    data = bytearray(path.read_bytes())
    data[off: off + 20] = b"\x00" * 20
    path.write_bytes(bytes(data))
    with open_slide(path) as s:
        s.read_region(0, 0, 64, 64)  # intact tile
        with pytest.raises(ImageError, match="c.tif"):
            s.read_region(64, 64, 64, 64)


def test_array_inputs_and_errors():
    a = _rgb(40, 50)
    with open_slide(a) as s:
        assert s.path is None and (s.width, s.height) == (50, 40)
        np.testing.assert_array_equal(s.read_region(45, 35, 10, 10), _region(a, 45, 35, 10, 10))
    f = a.astype(np.float32) / 255
    with open_slide(f) as s:
        np.testing.assert_array_equal(s.read_region(0, 0, 50, 40), a)
    with pytest.raises(InputError):
        open_slide(a).read_region(0, 0, 5, 5, fill=256)
    with pytest.raises(InputError):
        open_slide(a).read_region(0, 0, -1, 5)
    with pytest.raises(ImageError):
        open_slide(np.zeros((4, 4, 7), np.uint8))
    with pytest.raises(ImageError):
        open_slide(np.full((4, 4), 300.0))
    with pytest.raises(ImageError):
        open_slide(np.zeros((4, 4), np.int32))
    s = open_slide(a)
    s.close()
    with pytest.raises(ImageError):
        s.read_region(0, 0, 1, 1)
    assert isinstance(open_slide(open_slide(a)), Slide)


def test_slide_for_resolution_order(tmp_path):
    ad = pytest.importorskip("anndata")
    a = _rgb(60, 60)
    b = _rgb(60, 60, seed=5)
    adata = ad.AnnData(np.zeros((2, 1), np.float32))
    adata.obsm["spatial"] = np.array([[10.0, 10.0], [30.0, 30.0]])
    adata.uns["spatial"] = {"lib": {"images": {}, "scalefactors": {"spot_diameter_fullres": 10.0}, "metadata": {}}}
    with pytest.raises(InputError, match="image="):
        slide_for(adata)
    adata.uns["spatial"]["lib"]["images"]["fullres"] = a
    np.testing.assert_array_equal(slide_for(adata).read_region(0, 0, 60, 60), a)
    Image.fromarray(b).save(tmp_path / "b.png")
    adata.uns["spatial"]["lib"]["metadata"]["source_image_path"] = str(tmp_path / "b.png")
    np.testing.assert_array_equal(slide_for(adata).read_region(0, 0, 60, 60), b)
    np.testing.assert_array_equal(slide_for(adata, image=a).read_region(0, 0, 60, 60), a)
    del adata.uns["spatial"]["lib"]["images"]["fullres"]
    adata.uns["spatial"]["lib"]["metadata"]["source_image_path"] = str(tmp_path / "gone.png")
    with pytest.raises(ImageError, match="gone.png"):
        slide_for(adata)


@pytest.mark.realdata
@pytest.mark.skipif(not C2.exists(), reason="../shared/data not present")
def test_her2st_c2_jpeg():
    with open_slide(C2) as s:
        assert (s.width, s.height) == (9274, 9911)
        thumb, scale = s.thumbnail(500)
        assert max(thumb.shape[:2]) == 500 and thumb.dtype == np.uint8
        r = s.read_region(4000, 5000, 145, 145)
        assert r.shape == (145, 145, 3)
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        ref = Image.open(C2)
        ref.load()
    finally:
        Image.MAX_IMAGE_PIXELS = old
    assert np.abs(r.astype(int) - np.asarray(ref.crop((4000, 5000, 4145, 5145)).convert("RGB"))).max() <= 2


def test_pickle_reopens(tmp_path):
    import pickle

    a = _rgb(256, 256)
    path = tmp_path / "pyr.tif"
    with tifffile.TiffWriter(path) as w:
        w.write(a, tile=(64, 64), subifds=1, compression="zlib", photometric="rgb")
        w.write(a[::2, ::2], tile=(64, 64), subfiletype=1, compression="zlib", photometric="rgb")
    for s in (open_slide(path), open_slide(path, level=1, cache_bytes=2**20), open_slide(a)):
        s.read_region(0, 0, 10, 10)
        s2 = pickle.loads(pickle.dumps(s))
        assert s2.level_shapes == s.level_shapes and s2.path == s.path
        assert s2._cache.max_bytes == s._cache.max_bytes
        np.testing.assert_array_equal(s2.read_region(3, 4, 50, 60), s.read_region(3, 4, 50, 60))
        s.close()
        s2.close()


def test_gray_jpeg_ycbcr_tiff_and_main_series(tmp_path):
    a = _rgb(96, 128)
    a[:] = np.linspace(0, 255, 128, dtype=np.uint8)[None, :, None]
    Image.fromarray(a[..., 0]).save(tmp_path / "g.jpg", quality=95)
    with open_slide(tmp_path / "g.jpg") as s:
        r = s.read_region(0, 0, 128, 96)
    assert (r[..., 0] == r[..., 2]).all() and np.abs(r[..., 0].astype(int) - a[..., 0]).max() < 6
    tifffile.imwrite(tmp_path / "ycc.tif", a, tile=(32, 32), compression="jpeg")  # YCbCr JPEG tiles
    with tifffile.TiffFile(tmp_path / "ycc.tif") as t:
        assert t.pages[0].photometric == 6
    with open_slide(tmp_path / "ycc.tif") as s:
        np.testing.assert_array_equal(s.read_region(0, 0, 128, 96), tifffile.imread(tmp_path / "ycc.tif"))
    # a small "label" image stored before the slide: the largest series is the slide
    with tifffile.TiffWriter(tmp_path / "two.tif") as w:
        w.write(a[:16, :16], photometric="rgb")
        w.write(a, photometric="rgb", tile=(32, 32))
    with open_slide(tmp_path / "two.tif") as s:
        assert (s.width, s.height) == (128, 96)


def test_pil_pixel_limit(tmp_path, monkeypatch):
    import stmorph.im._slide as slide_mod

    before = Image.MAX_IMAGE_PIXELS
    Image.fromarray(_rgb(100, 100)).save(tmp_path / "a.png")
    with open_slide(tmp_path / "a.png") as s:
        s.read_region(0, 0, 10, 10)
    assert Image.MAX_IMAGE_PIXELS == before  # the global limit is restored
    monkeypatch.setattr(slide_mod, "MAX_PIL_PIXELS", 5000)
    with pytest.raises(ImageError, match="tiled pyramidal TIFF"):
        open_slide(tmp_path / "a.png")


def test_a_damaged_tiff_is_one_error_without_tifffile_log_lines(tmp_path, capfd, caplog):
    """tifffile logged 'shaped series raised ...' twice before the error."""
    caplog.set_level("DEBUG", logger="tifffile")
    a = _rgb(300, 200)
    with tifffile.TiffWriter(tmp_path / "p.tif") as w:
        w.write(a, photometric="rgb", tile=(64, 64), subifds=1)
        w.write(a[::2, ::2], photometric="rgb", tile=(64, 64), subfiletype=1)
    data = (tmp_path / "p.tif").read_bytes()
    (tmp_path / "cut.tif").write_bytes(data[: len(data) // 3])
    with pytest.raises(ImageError, match=r"cut\.tif: .*truncated"):
        open_slide(tmp_path / "cut.tif")
    out, err = capfd.readouterr()
    assert out == "" and err == "", err
    assert not [r for r in caplog.records if r.name.startswith("tifffile")], caplog.text


def test_a_two_sample_array_saved_as_a_stack_is_refused_naming_its_shape(tmp_path):
    """An (H, W, 2) array written by tifffile is H pages of W x 2 px: it was read as a 2 px wide image."""
    tifffile.imwrite(tmp_path / "hw2.tif", np.zeros((300, 400, 2), np.uint8))
    with pytest.raises(ImageError, match=r"hw2\.tif: TIFF holds an array of shape \(300, 400, 2\) \(axes 'QYX'\)"):
        open_slide(tmp_path / "hw2.tif")
