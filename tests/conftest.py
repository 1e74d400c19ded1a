"""Shared test set-up: a private feature cache, the path of the optional real data, a tiny encoder."""

from pathlib import Path

import pytest

#: ../shared/data beside the checkout (absent in some clones: tests using it skip).
DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


@pytest.fixture(autouse=True, scope="session")
def _private_feature_cache(tmp_path_factory):
    """Never read or write the user's ~/.cache during tests."""
    mp = pytest.MonkeyPatch()
    mp.setenv("STMORPH_CACHE_DIR", str(tmp_path_factory.mktemp("feature-cache")))
    yield
    mp.undo()


@pytest.fixture(scope="module")
def tiny():
    """A tiny seeded convolutional encoder (6-d features, 32 px input) for the feature-pipeline tests."""
    torch = pytest.importorskip("torch")
    from stmorph.im import encoders

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(), torch.nn.Conv2d(8, 6, 3))
    return encoders.get_encoder(net, input_size=32, name="tiny")
