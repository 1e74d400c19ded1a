"""A feature cache that cannot be written, or a damaged entry, is a warning: the features are (re)computed."""

from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import stmorph  # noqa: E402
from stmorph.im import _cache  # noqa: E402
from test_features import _adata  # noqa: E402


@pytest.fixture(scope="module")
def reference(tiny):
    a = _adata()
    stmorph.im.features(a, tiny, cache=False, progress=False, precision="float32")
    return a.obsm["X_image"]


def _features(tiny, cache_dir):
    a = _adata()
    stmorph.im.features(a, tiny, cache_dir=cache_dir, progress=False, precision="float32")
    return a


@pytest.mark.parametrize("kind", ["file", "below-a-file", "proc", "read-only"])
def test_unwritable_cache_is_a_warning(tiny, reference, tmp_path, kind):
    if kind == "file":
        cache_dir = tmp_path / "a-file"
        cache_dir.write_text("not a folder")
    elif kind == "below-a-file":
        (tmp_path / "a-file").write_text("not a folder")
        cache_dir = tmp_path / "a-file" / "features"
    elif kind == "proc":
        cache_dir = "/proc/x"
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        cache_dir = tmp_path / "ro"
        cache_dir.mkdir()
        cache_dir.chmod(0o500)
    with pytest.warns(UserWarning, match="cannot be written"):
        a = _features(tiny, cache_dir)
    np.testing.assert_allclose(a.obsm["X_image"], reference, rtol=1e-6)


def test_an_entry_that_is_a_folder_is_skipped(tiny, reference, tmp_path):
    a = _adata()
    stmorph.im.features(a, tiny, cache_dir=tmp_path, progress=False, precision="float32")
    entry = tmp_path / f"{a.uns['X_image']['params']['cache_key']}.npy"
    entry.unlink()
    entry.mkdir()
    with pytest.warns(UserWarning):
        b = _features(tiny, tmp_path)
    np.testing.assert_allclose(b.obsm["X_image"], reference, rtol=1e-6)
    assert entry.is_dir()  # not ours to delete


@pytest.mark.parametrize("damage", ["empty", "truncated", "nan", "shape", "garbage"])
def test_damaged_entry_is_discarded_and_recomputed(tiny, reference, tmp_path, damage):
    a = _features(tiny, tmp_path)
    entry = tmp_path / f"{a.uns['X_image']['params']['cache_key']}.npy"
    good = entry.read_bytes()
    if damage == "empty":
        entry.write_bytes(b"")
    elif damage == "truncated":
        entry.write_bytes(good[: len(good) // 2])
    elif damage == "garbage":
        entry.write_bytes(b"\x93NUMPY\x01\x00garbage" * 10)
    elif damage == "nan":
        np.save(entry, np.full(reference.shape, np.nan, np.float32))
    else:
        np.save(entry, np.zeros((3, 3), np.float32))
    with pytest.warns(UserWarning, match="discarded"):
        b = _features(tiny, tmp_path)
    assert not b.uns["X_image"]["params"]["from_cache"]
    np.testing.assert_allclose(b.obsm["X_image"], reference, rtol=1e-6)
    assert entry.read_bytes() == good  # recomputed and stored again


def test_load_and_save_never_raise(tmp_path):
    (tmp_path / "k.npy").write_bytes(b"")
    with pytest.warns(UserWarning):
        assert _cache.load(tmp_path, "k", (2, 2)) is None
    assert not (tmp_path / "k.npy").exists()
    with pytest.warns(UserWarning):
        assert _cache.save("/proc/x", "k", np.zeros((2, 2))) is None
