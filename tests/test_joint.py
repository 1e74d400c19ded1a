"""Joint domains across sections: shared labels, batch correction, cohort --joint, the DLPFC bar."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import stmorph as st
from stmorph.errors import InputError

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _batch_copy(a, seed: int, strength: float = 0.3):
    """The same tissue as another 'section': every gene's counts scaled by its own factor (a batch effect),
    the spots moved and renamed."""
    rng = np.random.default_rng(seed)
    b = a.copy()
    f = np.exp(rng.normal(0.0, strength, a.n_vars))
    X = sp.csr_matrix(a.X, dtype=np.float64) @ sp.diags(f)
    X.data = rng.poisson(X.data).astype(np.float32)
    X.eliminate_zeros()
    b.X = sp.csr_matrix(X)
    keep = np.asarray(b.X.sum(axis=1)).ravel() > 0
    b = b[keep].copy()
    b.obs_names = [f"b_{n}" for n in b.obs_names]
    b.obsm["spatial"] = b.obsm["spatial"] + 5000.0
    return b


@pytest.fixture(scope="module")
def two_sections():
    a = st.datasets.synthetic(500, n_genes=400, image=False, random_state=3)
    return {"A": a, "B": _batch_copy(a, 1)}


def test_labels_mean_the_same_tissue_in_every_section(two_sections):
    secs = {k: v.copy() for k, v in two_sections.items()}
    st.tl.joint_domains(secs, n_clusters=5, random_state=0)
    a, b = secs["A"], secs["B"]
    assert list(a.obs["joint"].cat.categories) == list(b.obs["joint"].cat.categories)
    assert a.obsm["X_joint"].shape[0] == a.n_obs and a.obsm["X_joint"].shape[1] == b.obsm["X_joint"].shape[1]
    # pooled over both sections the labels follow the truth: a domain number is one tissue type in both
    pooled = pd.concat([a.obs[["joint", "annotation"]], b.obs[["joint", "annotation"]]])
    from sklearn.metrics import adjusted_rand_score

    def score(df):
        return adjusted_rand_score(df["annotation"].astype(str), df["joint"].astype(str))

    each = [score(a.obs), score(b.obs)]
    assert min(each) > 0.45  # one region differs only in the image: expression alone does not find it
    assert score(pooled) > 0.9 * np.mean(each)  # labels swapped between sections would score far lower
    # the same spot in both sections mostly gets the same label
    same = b.obs["joint"].astype(str).to_numpy() == a.obs.loc[[n[2:] for n in b.obs_names], "joint"].astype(str)
    assert same.mean() > 0.8
    assert a.uns["joint"]["params"]["batch_correction"] == "harmony"
    refit = a.uns["joint"]["params"]["refit"]
    assert a.uns["joint"]["params"]["sections"] == ["A", "B"]
    assert refit["kept"] == ["refit", "refit"] and min(refit["agreement"]) > 0.8 and refit["domains"] == [5, 5]
    assert len(a.uns["joint"]["params"]["refine"]["n_changed"]) == 2
    assert max(a.uns["joint"]["params"]["section_specific"]) < 0.2  # the same tissue: every domain is shared


def test_domains_that_follow_the_sections_are_flagged(two_sections):
    from stmorph.tl._joint import _section_specific

    # a batch effect far beyond the tissue's differences, left uncorrected: the domains are the sections
    secs = {"A": two_sections["A"].copy(), "B": _batch_copy(two_sections["A"], 2, strength=3.0)}
    with pytest.warns(UserWarning, match="follow the sections"):
        st.tl.joint_domains(secs, n_clusters=4, batch_correction=None, random_state=0)
    assert min(secs["A"].uns["joint"]["params"]["section_specific"]) >= 0.8
    # the measure itself: domain 0 is A's own, 1 is shared, 2 is B's own (19 of its 20 spots: 95%)
    labels = np.array([0] * 6 + [1] * 3 + [2] + [1] * 5 + [2] * 19 + [1])
    np.testing.assert_allclose(_section_specific(labels, [10, 25]), [0.6, 0.76])
    np.testing.assert_allclose(_section_specific(np.zeros(5, int), [5]), [0.0])


def test_refit_keeps_the_joint_identity(two_sections):
    from stmorph.tl._joint import _keeps_identity

    # refitting moves a few boundary spots, and each domain keeps its number
    joint = {k: v.copy() for k, v in two_sections.items()}
    refit = {k: v.copy() for k, v in two_sections.items()}
    st.tl.joint_domains(joint, n_clusters=5, refit=False, refine=False, random_state=0)
    st.tl.joint_domains(refit, n_clusters=5, refine=False, random_state=0)
    assert joint["A"].uns["joint"]["params"]["refit"] is None
    for k in joint:
        before = joint[k].obs["joint"].astype(int).to_numpy()
        after = refit[k].obs["joint"].astype(int).to_numpy()
        assert _keeps_identity(after, before) and 0.8 < np.mean(after == before)
    # the check itself: a domain may vanish, none may take over another's spots
    old = np.array([0, 0, 0, 1, 1, 1, 2, 2])
    assert _keeps_identity(old, old)
    assert _keeps_identity(np.array([0, 0, 0, 1, 1, 1, 1, 1]), old)  # domain 2 absorbed by 1
    assert not _keeps_identity(np.array([1, 1, 1, 0, 0, 0, 2, 2]), old)  # 0 and 1 swapped


def test_deterministic_and_checked(two_sections):
    r = []
    for _ in range(2):
        secs = {k: v.copy() for k, v in two_sections.items()}
        st.tl.joint_domains(secs, method="expression", n_clusters=4, batch_correction=None, random_state=7)
        r.append(np.concatenate([secs[k].obs["joint"].astype(str).to_numpy() for k in secs]))
    np.testing.assert_array_equal(r[0], r[1])
    a = two_sections["A"].copy()
    b = two_sections["B"].copy()
    b.var_names = [f"other{i}" for i in range(b.n_vars)]
    with pytest.raises(InputError, match="share 0 gene"):
        st.tl.joint_domains({"A": a, "B": b}, n_clusters=3)
    with pytest.raises(InputError, match="method="):
        st.tl.joint_domains({"A": a}, method="image")


@pytest.mark.slow
@pytest.mark.skipif(not (DATA / "dlpfc").is_dir(), reason="../shared/data/dlpfc is absent")
def test_dlpfc_joint_at_least_separate():
    """The bar on the two annotated DLPFC sections, one seed (benchmarks/bench_joint.py runs three)."""
    from stmorph.ev._benchmark import find_sections, load_section

    found = [s for s in find_sections(DATA) if s.name.startswith("dlpfc/")]
    secs = {s.name: load_section(s) for s in found}
    st.tl.joint_domains(secs, n_clusters=7, random_state=0)
    joint = {n: st.ev.ari(a, "joint") for n, a in secs.items()}
    assert min(joint.values()) > 0.5, joint


@pytest.mark.slow
def test_cohort_joint(tmp_path):
    pytest.importorskip("distributed")
    from stmorph.cli import main

    for i, name in enumerate(("s1", "s2")):
        st.datasets.write_visium(st.datasets.synthetic(220, n_genes=300, image=False, random_state=i),
                                 tmp_path / name / "outs", fullres=None)
    (tmp_path / "nowhere" / "outs").mkdir(parents=True)  # a section folder without its files: fails when run
    m = tmp_path / "m.csv"
    m.write_text("section,input,method,n_clusters,no_plot\nA,s1/outs,expression,4,true\n"
                 "B,s2/outs,expression,4,true\nbroken,nowhere/outs,expression,4,true\n")
    out = tmp_path / "out"
    # two synthetic seeds draw different gene programs for their regions: no tissue type is shared, and the joint
    # run says so
    with pytest.warns(UserWarning, match="follow the sections"):
        assert main(["cohort", str(m), "--out", str(out), "--workers", "2", "--joint", "--theta", "1",
                     "--quiet"]) == 1  # broken failed
    joint = pd.read_csv(out / "joint.csv")
    assert set(joint["section"]) == {"A", "B"} and set(joint["joint"].astype(str)) <= {"0", "1", "2", "3"}
    table = pd.read_csv(out / "cohort.csv", index_col="section")
    assert joint["joint"].nunique() == 4  # over the cohort (a section may hold only some of them)
    assert 1 <= table.loc["A", "n_domains_joint"] <= 4 and np.isfinite(table.loc["B", "ari_joint"])
    assert table.loc["A", "joint_section_specific"] >= 0.8
    assert "joint" in table.loc["broken", "error"]
    md = (out / "cohort.md").read_text()
    assert "Joint domains" in md and "refit per section" in md and "harmony (theta 1)" in md
    assert main(["cohort", str(m), "--out", str(tmp_path / "bad"), "--joint", "--theta", "-1", "--quiet"]) == 2
    assert not (tmp_path / "bad").exists()
    assert "joint.csv" in (out / ".stmorph").read_text()
