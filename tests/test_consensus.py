"""Consensus clustering: the same domains whatever the seed, a co-assignment confidence, a spatial prior."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from stmorph import datasets, tl
from stmorph.errors import InputError
from stmorph.tl import _consensus as C


def _grid_domains(side=24, k=3, noise=1.0, d=6, seed=0, blend=False):
    """Spots on a square grid (100 um apart) in ``k`` vertical bands: embeddings are the band's mean plus noise;
    with ``blend`` the columns on either side of a border sit half way between the two bands' means."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side]
    col = xx.ravel()
    xy = np.c_[col, yy.ravel()].astype(float) * 100.0
    truth = np.minimum((col * k) // side, k - 1)
    means = np.eye(k, d) * 3.0
    centre = means[truth]
    if blend:
        for b in range(1, k):
            edge = b * side // k
            for c, other in ((edge - 1, b), (edge, b - 1)):
                centre[col == c] = 0.5 * (means[b - 1] + means[b])
    X = centre + rng.normal(0, noise, (truth.size, d))
    return X, xy, truth


def test_coassignment_counts_how_often_two_spots_share_a_group():
    runs = np.array([[0, 0, 1, 1], [1, 1, 0, 0], [0, 1, 1, 1]])
    co = C.coassignment(runs)
    assert np.allclose(np.diag(co), 1) and np.allclose(co, co.T)
    assert co[0, 1] == pytest.approx(2 / 3) and co[2, 3] == pytest.approx(1.0) and co[0, 3] == pytest.approx(0.0)
    assert list(C.consensus_labels(runs, 2)) in ([0, 0, 1, 1], [1, 1, 0, 0])


def test_confidence_is_the_share_of_runs_that_agree_after_matching_names():
    labels = np.array([0, 0, 1, 1])
    runs = np.array([[1, 1, 0, 0], [0, 0, 1, 1], [0, 1, 1, 1], [5, 5, 2, 2]])  # names differ, partitions do not
    conf = C.coassignment_confidence(runs, labels)
    assert np.allclose(conf, [1.0, 0.75, 1.0, 1.0])


def test_the_vote_settles_spots_the_tree_cut_misplaced():
    runs = np.array([[0, 0, 1, 1, 1], [1, 1, 0, 0, 0], [0, 0, 1, 1, 0], [2, 2, 7, 7, 7]])  # names differ by run
    settled = C.vote_labels(runs, np.array([0, 1, 1, 1, 1]), 2)
    assert adjusted_rand_score(settled, [0, 0, 1, 1, 1]) == 1.0
    # matched on spot 1 alone, which keeps its label: the runs' majority follows it
    assert list(C.vote_labels(runs, np.array([0, 1, 1, 1, 1]), 2, fixed=np.array([1]))) == [1, 1, 0, 0, 0]
    # a start that no run supports for one domain: the vote keeps every domain rather than emptying one
    assert np.unique(C.vote_labels(runs[:1], np.array([0, 0, 0, 0, 1]), 2)).size == 2


def test_by_default_the_consensus_is_the_runs_majority_unpolished():
    X, xy, truth = _grid_domains(noise=1.6, seed=1)
    labels, runs, info = C.consensus_clustering(X, 3, xy_um=xy, n_runs=20, random_state=0)
    assert info["polished"] is False and info["spatial_prior"] == 0.0
    assert np.array_equal(labels, C.vote_labels(runs, labels, 3))  # a fixed point of the vote
    polished, runs2, info2 = C.consensus_clustering(X, 3, xy_um=xy, n_runs=20, spatial_prior=0.5, random_state=0)
    assert info2["polished"] is True and np.array_equal(runs, runs2)
    assert not np.array_equal(labels, polished)


def test_consensus_finds_planted_domains_and_does_not_move_with_the_seed():
    X, xy, truth = _grid_domains()
    found = [C.consensus_clustering(X, 3, xy_um=xy, random_state=s)[0] for s in (0, 1, 2)]
    assert all(adjusted_rand_score(truth, f) > 0.9 for f in found)
    assert min(adjusted_rand_score(a, b) for a in found for b in found) > 0.95


def test_the_spatial_prior_helps_where_the_embedding_hesitates():
    X, xy, truth = _grid_domains(noise=1.6, seed=1)
    with_prior, _, info = C.consensus_clustering(X, 3, xy_um=xy, spatial_prior=0.5, random_state=0)
    without, _, info0 = C.consensus_clustering(X, 3, xy_um=xy, random_state=0)
    inner, edge, corner = 22**2, 4 * 22, 4  # a square grid's ring at 1.5 spacings: 8 neighbours inside, 5, 3
    assert info["prior_neighbours"] == pytest.approx((8 * inner + 5 * edge + 3 * corner) / 24**2)
    assert info0["spatial_prior"] == 0.0
    assert adjusted_rand_score(truth, with_prior) > adjusted_rand_score(truth, without) + 0.05


def test_boundary_spots_are_less_confident_than_core_spots():
    # 1600 spots: each run's mixture is fitted on its own subset of FIT_SPOTS, so the runs' means differ a little
    X, xy, truth = _grid_domains(side=40, noise=0.8, seed=2, blend=True)
    labels, runs, _ = C.consensus_clustering(X, 3, xy_um=xy, random_state=0)
    conf = C.coassignment_confidence(runs, labels)
    assert conf.shape == truth.shape and np.all((0 <= conf) & (conf <= 1))
    border = np.isin((xy[:, 0] / 100).astype(int), [12, 13, 25, 26])  # the blended columns
    assert conf[border].mean() < conf[~border].mean() - 0.02
    low = conf < 0.95  # the spots the runs disagree on lie mostly on the blended columns (a tenth of the section)
    assert low.sum() >= 10 and border[low].mean() > 0.5


def test_a_prior_that_would_empty_a_domain_is_discarded():
    X, xy, truth = _grid_domains(noise=6.0, seed=3)  # almost no signal: a strong prior would merge domains
    labels, _, info = C.consensus_clustering(X, 3, xy_um=xy, spatial_prior=5.0, random_state=0)
    assert np.unique(labels).size == 3 and info["polished"] is False


def test_runs_scale_with_the_section_and_large_sections_vote_outside_the_subset(monkeypatch):
    assert C.default_runs(300) == C.MAX_RUNS and C.default_runs(10**6) == C.RUN_BUDGET // C.FIT_SPOTS
    monkeypatch.setattr(C, "CONSENSUS_SPOTS", 200)
    X, xy, truth = _grid_domains(noise=1.0)
    labels, runs, info = C.consensus_clustering(X, 3, xy_um=xy, n_runs=10, random_state=0)
    assert info["consensus_spots"] == 200 and runs.shape == (10, truth.size)
    assert adjusted_rand_score(truth, labels) > 0.9


def test_bad_options_are_refused():
    X, xy, _ = _grid_domains(side=6)
    with pytest.raises(InputError, match="n_clusters"):
        C.consensus_clustering(X, 1)
    with pytest.raises(InputError, match="spatial_prior"):
        C.consensus_clustering(X, 2, spatial_prior=-1)
    with pytest.raises(InputError, match="n_runs"):
        C.consensus_clustering(X, 2, n_runs=1)


def test_cluster_and_stmorph_write_a_co_assignment_confidence():
    a = datasets.synthetic(300, n_genes=300, image=False, random_state=4)
    tl.stmorph(a, n_clusters=4, use_image=False, progress=False)
    info = a.uns["stmorph"]
    assert info["params"]["method"] == "consensus" and info["params"]["consensus"]["n_runs"] == C.MAX_RUNS
    assert info["confidence"]["kind"] == "co-assignment"
    c = a.obs["stmorph_confidence"].to_numpy()
    assert np.all((0 <= c) & (c <= 1)) and c.mean() > 0.5
    with pytest.raises(InputError, match="consensus"):
        tl.cluster(a, "X_stmorph", method="gmm", n_clusters=3, n_runs=10)
    b = a.copy()
    tl.stmorph(b, n_clusters=4, use_image=False, progress=False, random_state=7)
    assert adjusted_rand_score(a.obs["stmorph"], b.obs["stmorph"]) > 0.95
