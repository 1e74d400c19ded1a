"""Shared test set-up: a private feature cache, and the path of the optional real data."""

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
