"""A confidence per spot and a stability per domain for every method; what the H&E changed, region by region."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from stmorph import datasets, ev, pl, tl
from stmorph.errors import InputError
from stmorph.tl._confidence import label_posterior


def test_posterior_is_high_inside_a_domain_and_even_between_two():
    rng = np.random.default_rng(0)
    X = np.vstack([rng.normal(0, 1, (200, 3)), rng.normal(0, 1, (200, 3)) + [8, 0, 0], [[4.0, 0, 0]]])
    labels = np.r_[np.zeros(200, int), np.ones(201, int)]
    p = label_posterior(X, labels)
    assert p.shape == (401,) and np.all((0 <= p) & (p <= 1))
    assert np.median(p[:200]) > 0.99 and np.median(p[200:400]) > 0.99
    assert 0.1 < p[-1] < 0.9  # half way between the two means: neither sure nor ruled out
    wrong = labels.copy()
    wrong[0] = 1  # a spot labelled against its embedding
    assert label_posterior(X, wrong)[0] < 0.01
    assert np.all(label_posterior(X, np.zeros(401, int)) == 1)


@pytest.fixture(scope="module")
def section():
    a = datasets.synthetic(300, n_genes=300, image=False, random_state=3)
    tl.run_methods(a, ["stmorph_expr", "expression"], n_clusters=4, progress=False)
    return a


def test_every_method_writes_a_confidence_and_domain_stabilities(section):
    for key in ("stmorph_expr", "expression"):
        c = section.obs[f"{key}_confidence"].to_numpy()
        assert c.dtype == np.float32 and np.all((0 <= c) & (c <= 1))
        info = section.uns[key]["confidence"]
        assert info["kind"] in ("posterior", "co-assignment")
        assert set(info["domain_stability"]) == set(section.obs[key].astype(str))
        means = pd.Series(c).groupby(section.obs[key].astype(str).to_numpy()).mean()
        assert all(abs(means[k] - v) < 1e-5 for k, v in info["domain_stability"].items())


def test_image_changes_match_labels_before_comparing_and_group_regions(section):
    a = section.copy()
    a.obs["with"] = a.obs["stmorph_expr"]
    codes = a.obs["stmorph_expr"].astype(str)
    renamed = codes.map({c: str((int(c) + 1) % 4) for c in codes.unique()})  # the same domains, other names
    a.obs["without"] = pd.Categorical(renamed)
    assert len(ev.image_changes(a, "with", "without")) == 0  # renaming is no change
    xy = a.obsm["spatial"]
    corner = (xy[:, 0] < np.quantile(xy[:, 0], 0.15)) & (xy[:, 1] < np.quantile(xy[:, 1], 0.15))
    other = a.obs["with"].astype(str).to_numpy().copy()
    target = next(c for c in ("0", "1", "2", "3") if (other[corner] != c).all())
    other[corner] = target  # the image made the corner into another domain
    a.obs["with"] = pd.Categorical(other)
    ch = ev.image_changes(a, "with", "without")
    assert set(ch.index) <= set(a.obs_names[corner]) and len(ch) >= 0.8 * corner.sum()
    assert (ch["to_domain"] == target).all() and ch["region"].nunique() <= 2
    assert ch.attrs["regions"][0]["n_spots"] >= 0.5 * corner.sum()
    assert {"from_domain", "to_domain", "confidence_from", "confidence_to", "region", "x", "y"} <= set(ch.columns)
    with pytest.raises(InputError, match="stmorph_expr"):
        ev.image_changes(a)  # no obs["stmorph"]


def test_confidence_and_change_maps_draw(section):
    fig = pl.confidence(section, ["stmorph_expr", "expression"])
    assert len(fig.axes) >= 2 and "confidence" in fig.axes[0].get_title()
    a = section.copy()
    a.obs["stmorph"] = a.obs["expression"]
    fig = pl.image_changes(a)
    assert "with the H&E" in fig.axes[0].get_title()
    with pytest.raises(InputError, match="confidence"):
        pl.confidence(section, "nothing")
