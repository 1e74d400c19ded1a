"""Feature maps averaged over the tissue section only (``features(..., pool="section")``): what lies beyond the
section's edge does not enter the features, holes inside the section count, the option is part of the cache key,
and encoders without a feature map are refused."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from test_glass_fill import spots, tissue_half_black

import stmorph as st
from stmorph.errors import InputError
from stmorph.im import encoders
from stmorph.im._section import section_mask


@pytest.fixture(scope="module")
def pointwise():
    """A 1 x 1 convolution: each map cell sees one pixel, so the section average is exact."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 1), torch.nn.ReLU()).eval()
    return encoders.get_encoder(net, input_size=9, name="pointwise9")


def _features(img, enc, pool, **kw):
    a = spots(img, np.array([[48.0, 48.0], [80.0, 48.0]]), 9)  # on the section's edge; inside it
    st.im.features(a, enc, patch=9, pool=pool, device="cpu", precision="float32", backend="torch",
                   progress=False, **{"cache": False, **kw})
    return a


def test_what_lies_beyond_the_section_does_not_enter_its_features(pointwise):
    glass = tissue_half_black()
    glass[:, :48] = 255  # white glass left of the section
    grey = glass.copy()
    grey[:, :48] = 200  # another, still unstained, glass
    sec = {n: _features(img, pointwise, "section") for n, img in (("glass", glass), ("grey", grey))}
    plain = {n: _features(img, pointwise, "mean") for n, img in (("glass", glass), ("grey", grey))}
    np.testing.assert_allclose(sec["glass"].obsm["X_image"], sec["grey"].obsm["X_image"], rtol=1e-5, atol=1e-6)
    assert not np.allclose(plain["glass"].obsm["X_image"][0], plain["grey"].obsm["X_image"][0], atol=1e-3)
    # a patch wholly inside the section: both poolings agree
    np.testing.assert_allclose(sec["glass"].obsm["X_image"][1], plain["glass"].obsm["X_image"][1], rtol=1e-5)
    p = sec["glass"].uns["X_image"]["params"]
    assert p["pool"] == "section" and p["n_section_fallback"] == 0 and plain["glass"].uns["X_image"]["params"]["pool"] == "mean"


def test_holes_inside_the_section_count():
    img = np.full((96, 96, 3), 250, np.uint8)
    img[20:76, 20:76] = (220, 120, 190)  # stained tissue
    img[40:56, 40:56] = 250  # a lumen (or fat) inside it: unstained
    mask, scale = section_mask(img)
    assert scale == pytest.approx(1.0)
    assert mask[48, 48] and mask[30, 30] and not mask[5, 5] and not mask[90, 50]


def test_pool_is_cached_apart_and_checked(pointwise, tmp_path):
    img = tissue_half_black()
    a = _features(img, pointwise, "mean", cache=True, cache_dir=tmp_path)
    b = _features(img, pointwise, "section", cache=True, cache_dir=tmp_path)
    assert not b.uns["X_image"]["params"]["from_cache"]  # the plain features are not served for it
    assert b.uns["X_image"]["params"]["cache_key"] != a.uns["X_image"]["params"]["cache_key"]
    c = _features(img, pointwise, "section", cache=True, cache_dir=tmp_path)
    assert c.uns["X_image"]["params"]["from_cache"]
    np.testing.assert_array_equal(b.obsm["X_image"], c.obsm["X_image"])
    with pytest.raises(InputError, match="pool="):
        _features(img, pointwise, "tissue")
    pooled_net = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 1), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()
    vector = encoders.get_encoder(pooled_net, input_size=9, name="vector9")
    with pytest.raises(InputError, match="pool='section' needs a convolutional encoder"):
        _features(img, vector, "section")


def test_one_size_two_poolings_in_one_pass(pointwise):
    img = tissue_half_black()
    a = spots(img, np.array([[48.0, 48.0], [80.0, 48.0]]), 9)
    st.im.features(a, pointwise, patch=(9, 9), key_added=("plain", "sec"), pool=("mean", "section"), cache=False,
                   device="cpu", precision="float32", backend="torch", progress=False)
    b = _features(img, pointwise, "section")
    np.testing.assert_allclose(a.obsm["sec"], b.obsm["X_image"], rtol=1e-6)
    assert a.uns["sec"]["params"]["computed_with"] == ["9 px", "9 px (section)"]
