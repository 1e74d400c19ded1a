"""stMIC end to end on synthetic tissue: it must beat both of its baselines.

The synthetic section has one region that differs only in the image and one
that differs only in expression (see stmorph.datasets.synthetic), as in the
stMIC paper's vessel example: expression-only clustering cannot split the
first, image-only clustering cannot split the second, stMIC can split both.
"""

import numpy as np
import pytest

from stmorph import datasets, ev, im, tl
from stmorph.errors import InputError


@pytest.fixture(scope="module")
def tissue():
    adata = datasets.synthetic(1000, random_state=0)
    im.features(adata, progress=False)
    return adata


def test_stmic_beats_expression_and_image_baselines(tissue):
    a = tissue.copy()
    k = a.obs["annotation"].nunique()
    tl.stmic(a, n_clusters=k, progress=False)
    scores = {m: ev.ari(a, m) for m in ("expression", "image", "stmic")}
    assert all(a.obs[m].nunique() == k for m in scores)
    assert scores["stmic"] > scores["expression"] + 0.02, scores
    assert scores["stmic"] > scores["image"] + 0.02, scores
    assert a.obsm["X_stmic"].shape == (a.n_obs, 20)
    assert a.uns["stmic"]["params"]["use_rep"] == "X_stmic"
    assert a.uns["stmic"]["params"]["modality"] == "joint" and a.uns["image"]["params"]["modality"] == "image"


def test_stmic_matches_expression_cluster_count_by_default(tissue):
    a = tissue.copy()
    tl.stmic(a, resolution=1.7, progress=False)
    k = a.obs["expression"].nunique()
    assert a.obs["stmic"].nunique() == k and a.obs["image"].nunique() == k
    b = tissue.copy()
    tl.stmic(b, resolution=1.7, progress=False)
    assert (a.obs["stmic"] == b.obs["stmic"]).all()  # deterministic for a seed


def test_run_methods_reuses_features_and_skips_or_refuses_without_image(tissue):
    a = tissue.copy()
    feats = a.obsm["X_image"].copy()
    secs = tl.run_methods(a, ["image"], n_clusters=5, progress=False)
    np.testing.assert_array_equal(a.obsm["X_image"], feats)  # not recomputed
    assert a.uns["stmorph_run"]["steps_s"]["image_features"] == 0.0 and "image" in secs
    b = tissue.copy()
    del b.obsm["X_image"]
    lib = b.uns["spatial"]["synthetic"]
    del lib["images"]["fullres"]
    lib["metadata"].pop("source_image_path", None)
    with pytest.raises(InputError, match="needs the H&E image"):
        tl.run_methods(b, ["stmic"], n_clusters=5)
    with pytest.warns(UserWarning, match="skipped 'stmic'"):
        secs = tl.run_methods(b, ["expression", "stmic"], n_clusters=5, skip_unavailable=True)
    assert set(secs) == {"expression"} and "stmic" in b.uns["stmorph_run"]["skipped"]
    with pytest.raises(InputError, match="unknown method"):
        tl.run_methods(b, ["kmeans"])
