"""Features at several patch sizes in one pass: same values as separate calls, each slide region read once."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import stmorph  # noqa: E402
from stmorph.errors import InputError  # noqa: E402
from stmorph.im import _slide  # noqa: E402
from test_features import _adata  # noqa: E402


@pytest.fixture()
def count_reads(monkeypatch):
    calls = []
    orig = _slide.Slide._read

    def counted(self, lv, x, y, w, h, fill, out=None):
        if (w, h) != (self.width, self.height):  # not the in-memory image's identity hash
            calls.append((w, h))
        return orig(self, lv, x, y, w, h, fill, out=out)

    monkeypatch.setattr(_slide.Slide, "_read", counted)
    return calls


def test_iter_patches_multi_equals_single_sizes():
    a = _adata()
    xy = a.obsm["spatial"].copy()
    xy[0] = (3.0, 2.5)  # crosses the border
    xy[1] = (-400.0, 10.0)  # entirely outside
    slide = stmorph.im.slide_for(a)
    sizes = [24, 61, 9]
    for out_size in (None, 32):
        got = {k: np.zeros((len(xy), out_size or z, out_size or z, 3), np.uint8) for k, z in enumerate(sizes)}
        ins = np.zeros((len(sizes), len(xy)), np.float32)
        seen = []
        for b in stmorph.im.iter_patches_multi(slide, xy, sizes, out_size=out_size, batch_size=5):
            seen += b.index.tolist()
            for k in range(len(sizes)):
                got[k][b.index] = b.patches[k]
            ins[:, b.index] = b.inside
        assert sorted(seen) == list(range(len(xy)))
        for k, z in enumerate(sizes):
            for b in stmorph.im.iter_patches(slide, xy, z, out_size=out_size, batch_size=7):
                np.testing.assert_array_equal(got[k][b.index], b.patches)
                np.testing.assert_array_equal(ins[k][b.index], b.inside)
    assert ins[:, 1].max() == 0 and 0 < ins[1, 0] < 1


def test_two_sizes_one_pass_equal_separate_calls(tiny, count_reads, tmp_path):
    a = _adata()
    stmorph.im.features(a, tiny, patch=("spot", 60), key_added=("X_image", "X_ctx"), cache=False, progress=False,
                        precision="float32")
    reads_multi = len(count_reads)
    assert reads_multi == a.n_obs and set(count_reads) == {(60, 60)}  # one read of the larger square per spot
    b = _adata()
    for patch, key in (("spot", "X_image"), (60, "X_ctx")):
        stmorph.im.features(b, tiny, patch=patch, key_added=key, cache=False, progress=False, precision="float32")
    assert len(count_reads) - reads_multi == 2 * a.n_obs  # separate calls read every region twice
    for key in ("X_image", "X_ctx"):
        np.testing.assert_allclose(a.obsm[key], b.obsm[key], rtol=1e-5, atol=1e-6)
    assert not np.allclose(a.obsm["X_image"], a.obsm["X_ctx"])
    assert a.uns["X_image"]["params"]["patch_size_px"] == 24 and a.uns["X_ctx"]["params"]["patch_size_px"] == 60
    assert a.uns["X_ctx"]["params"]["computed_with"] == ["24 px", "60 px"]


def test_multi_sizes_share_the_cache(tiny, count_reads, tmp_path):
    a = _adata()
    stmorph.im.features(a, tiny, patch=("spot", "2spacing"), key_added=("X_image", "X_image_senca"),
                        cache_dir=tmp_path, progress=False, precision="float32")
    n = len(count_reads)
    b = _adata()  # SENCA-st's own later call of one size: from the cache, nothing read
    stmorph.im.features(b, tiny, patch="2spacing", key_added="X_image_senca", cache_dir=tmp_path, progress=False,
                        precision="float32")
    assert len(count_reads) == n and b.uns["X_image_senca"]["params"]["from_cache"]
    np.testing.assert_array_equal(a.obsm["X_image_senca"], b.obsm["X_image_senca"])
    c = _adata()  # one size cached, one new: only the new one is computed (single-size reads)
    stmorph.im.features(c, tiny, patch=("spot", 40), key_added=("X_image", "X_big"), cache_dir=tmp_path,
                        progress=False, precision="float32")
    assert c.uns["X_image"]["params"]["from_cache"] and not c.uns["X_big"]["params"]["from_cache"]
    assert set(count_reads[n:]) == {(40, 40)}
    np.testing.assert_array_equal(c.obsm["X_image"], a.obsm["X_image"])


def test_spacing_unit_is_median_nearest_neighbour_distance():
    a = _adata()
    xy = a.obsm["spatial"]
    d = np.sqrt(((xy[:, None] - xy[None]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    spacing = np.median(d.min(1))
    assert stmorph.im.patch_size_px(a, "6spacing") == int(round(6 * spacing))
    assert stmorph.im.patch_size_px(a, "1 spacing") == int(round(spacing))


def test_bad_key_added(tiny):
    a = _adata()
    with pytest.raises(InputError, match="one obsm key per patch size"):
        stmorph.im.features(a, tiny, patch=("spot", "6spacing"), cache=False, progress=False)
    with pytest.raises(InputError, match="repeated key"):
        stmorph.im.features(a, tiny, patch=("spot", 40), key_added=("X", "X"), cache=False, progress=False)
    # (55, "um") is one patch, not two
    stmorph.im.features(a, tiny, patch=(55, "um"), key_added="X_um", cache=False, progress=False)
    assert a.uns["X_um"]["params"]["patch_size_px"] == stmorph.im.patch_size_px(a, "55um")
