"""Vendor whole-slide formats through the OpenSlide backend, and the backend registry.

The slides are small Aperio SVS files written here with tifffile (tiled pyramid,
``Aperio Image Library`` ImageDescription, which is how OpenSlide detects Aperio).
Tests that need OpenSlide skip when it cannot be imported; the tests of what
happens without it run everywhere.
"""

from __future__ import annotations

import pickle
import sys

import numpy as np
import pytest
import tifffile

from stmorph.errors import DependencyError, ImageError, InputError
from stmorph.im import iter_patches, open_slide


def _openslide():
    try:
        import openslide
    except (ImportError, OSError) as e:  # OSError: openslide-python without the OpenSlide library
        pytest.skip(f"openslide cannot be imported: {e}")
    return openslide


def _image(h, w):
    yy, xx = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 40, (h, w), dtype=np.int64)
    return np.stack([(xx + noise) % 256, (yy * 3) % 256, (xx + yy + noise) % 256], -1).astype(np.uint8)


def _write_svs(path, a, n_levels=3, tile=64, compression="zlib"):
    """Aperio-style SVS: tiled level 0, a stripped thumbnail, then 2x-downsampled tiled levels.

    Returns the level arrays.
    """
    levels = [a]
    for _ in range(n_levels - 1):
        levels.append(np.ascontiguousarray(levels[-1][::2, ::2]))
    h, w = a.shape[:2]
    with tifffile.TiffWriter(path) as tw:
        for i, lv in enumerate(levels):
            if i == 0:
                desc = (f"Aperio Image Library v12.0.0 \r\n{w}x{h} [0,0 {w}x{h}] ({tile}x{tile}) RGB"
                        "|AppMag = 20|MPP = 0.5")
            else:
                desc = f"Aperio Image Library v12.0.0 \r\n{w}x{h} -> {lv.shape[1]}x{lv.shape[0]} - |AppMag = 20"
            tw.write(lv, photometric="rgb", tile=(tile, tile), compression=compression, description=desc,
                     metadata=None)
            if i == 0:  # IFD 1 of an SVS is a stripped thumbnail, not a pyramid level
                thumb = np.ascontiguousarray(a[::8, ::8])
                desc = f"Aperio Image Library v12.0.0 \r\n{w}x{h} -> {thumb.shape[1]}x{thumb.shape[0]} - |AppMag = 20"
                tw.write(thumb, photometric="rgb", compression=compression, description=desc, metadata=None)
    return levels


REGIONS = [(0, 0, 40, 30), (37, 91, 70, 65), (300, 200, 80, 80), (-20, -10, 50, 40), (460, 300, 64, 64)]


def test_svs_read_lazily_through_openslide_matches_tifffile(tmp_path):
    _openslide()
    path = tmp_path / "slide.svs"
    levels = _write_svs(path, _image(360, 500))
    with open_slide(path) as s, open_slide(path, backend="tiff") as t:
        assert s.backend == "openslide" and s.format == "aperio"
        assert t.backend == "tiff"
        assert s.level_shapes == t.level_shapes == [lv.shape[:2] for lv in levels]
        assert s.level_downsamples == pytest.approx([1.0, 2.0, 4.0], rel=1e-3)
        assert s.tile_shape == (64, 64)
        for level in range(3):
            for x, y, w, h in REGIONS:
                a = s.read_region(x, y, w, h, level=level)
                assert a.dtype == np.uint8 and a.shape == (h, w, 3)
                np.testing.assert_array_equal(a, t.read_region(x, y, w, h, level=level))
        # pyramid-aware: the level for a requested downsample
        assert [s.best_level_for_downsample(d) for d in (1, 1.9, 2, 3.5, 4, 100)] == [0, 0, 1, 1, 2, 2]
        with pytest.raises(InputError):
            s.best_level_for_downsample(0)
        # patches and thumbnails through the slide interface are the same from either backend
        xy = np.array([[10, 10], [250, 180], [499, 359], [120, 300]], float)
        got = {b.index.tobytes(): b.patches for b in iter_patches(s, xy, 48, out_size=32, batch_size=3)}
        ref = {b.index.tobytes(): b.patches for b in iter_patches(t, xy, 48, out_size=32, batch_size=3)}
        assert got.keys() == ref.keys()
        for k in got:
            np.testing.assert_array_equal(got[k], ref[k])
        ts, ss = s.thumbnail(100)
        tt, st = t.thumbnail(100)
        assert ss == st
        np.testing.assert_array_equal(ts, tt)
    with open_slide(path, level=1) as s1:  # a stored level as the base
        assert (s1.width, s1.height) == (250, 180)
        np.testing.assert_array_equal(s1.read_region(5, 6, 7, 8), levels[1][6:14, 5:12])


def test_openslide_decodes_only_the_tiles_a_read_touches(tmp_path):
    _openslide()
    path = tmp_path / "slide.svs"
    levels = _write_svs(path, _image(256, 256), n_levels=1, tile=64)
    with tifffile.TiffFile(path) as tif:  # overwrite the last tile of level 0 with garbage
        page = tif.pages[0]
        off, n = page.dataoffsets[-1], page.databytecounts[-1]
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(b"\x00\xff" * (n // 2))
    with open_slide(path) as s:
        assert s.backend == "openslide"
        np.testing.assert_array_equal(s.read_region(0, 0, 128, 128), levels[0][:128, :128])
    with open_slide(path) as s, pytest.raises(ImageError, match="slide.svs"):
        s.read_region(192, 192, 64, 64)


def test_openslide_only_when_asked_for_tiff_and_pickle(tmp_path):
    _openslide()
    a = _image(200, 300)
    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, a, photometric="rgb", tile=(64, 64), compression="zlib")
    with open_slide(path) as t:
        assert t.backend == "tiff"  # tifffile stays the default for TIFF
    with open_slide(path, backend="openslide") as s:
        assert s.backend == "openslide" and s.format == "generic-tiff"
        ref = open_slide(a).read_region(-5, 17, 120, 90)
        np.testing.assert_array_equal(s.read_region(-5, 17, 120, 90), ref)
        s2 = pickle.loads(pickle.dumps(s))
        assert s2.backend == "openslide"
        np.testing.assert_array_equal(s2.read_region(-5, 17, 120, 90), ref)
        s2.close()


def test_openslide_unreadable_file_is_one_line_error(tmp_path):
    _openslide()
    bad = tmp_path / "bad.svs"
    bad.write_bytes(b"this is not a slide at all" * 10)
    with pytest.raises(ImageError, match="bad.svs") as e:
        open_slide(bad)
    assert "\n" not in str(e.value)
    mrxs = tmp_path / "scan.mrxs"
    mrxs.write_text("[GENERAL]\nnot really\n")
    with pytest.raises(ImageError, match="scan.mrxs"):
        open_slide(mrxs)


def test_without_openslide(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "openslide", None)  # import openslide now raises ImportError
    path = tmp_path / "slide.svs"
    levels = _write_svs(path, _image(120, 160), n_levels=2)
    with open_slide(path) as s:  # TIFF-based vendor file: tifffile reads it
        assert s.backend == "tiff" and s.level_shapes == [lv.shape[:2] for lv in levels]
        np.testing.assert_array_equal(s.read_region(3, 4, 20, 10, level=1), levels[1][2:12, 2:22])
    with pytest.raises(DependencyError, match=r"slide\.svs.*stmorph\[openslide\]") as e:
        open_slide(path, backend="openslide")
    assert "\n" not in str(e.value)
    mrxs = tmp_path / "scan.mrxs"
    mrxs.write_text("[GENERAL]\n")
    with pytest.raises(DependencyError, match="scan.mrxs"):
        open_slide(mrxs)
    with pytest.raises(InputError, match="unknown slide backend"):
        open_slide(path, backend="nope")
