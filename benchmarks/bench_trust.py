"""Do `stmorph`'s domains move with the seed? Seed-to-seed agreement, accuracy and confidence on annotated sections.

For every annotated section under ``--data`` (k = number of scored labels, as ``stmorph benchmark``), runs the
``stmorph`` method with each of ``--seeds`` seeds for each clustering in ``--cluster-methods`` (default: the
consensus, stmorph's default, and the single tied mixture it replaced, so the two are compared in one run), and
prints per section and clustering:

- ARI against the annotation: mean and sd over seeds;
- seed agreement: the ARI between the domains of every two seeds (mean and minimum);
- the mean confidence (``obs["stmorph_confidence"]``: co-assignment frequency for the consensus, posterior
  probability for the mixture), on how many seeds the consensus kept its spatial polish, and seconds per run.

The embedding is computed once per section and image setting and reused by every seed and clustering (the
``stmorph`` method's own reuse of a step with the same parameters), so the seconds are the clustering's.

Usage::

    .venv/bin/python benchmarks/bench_trust.py --seeds 5
    .venv/bin/python benchmarks/bench_trust.py --seeds 5 --sections her2st --cluster-methods consensus consensus:0

A clustering ``consensus:B`` is the consensus with the spatial prior's weight set to ``B`` nats per neighbour
(``consensus:0``: no prior), to measure what the prior adds in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def main(argv=None) -> int:
    from sklearn.metrics import adjusted_rand_score

    from bench_stmorph import machine
    from stmorph import tl
    from stmorph.ev._benchmark import find_sections, load_section
    from stmorph.ev._metrics import DEFAULT_IGNORE, scored_labels

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--sections", nargs="*", default=None, help="only sections whose name contains one of these")
    p.add_argument("--cluster-methods", nargs="+", default=["consensus", "gmm"])
    p.add_argument("--no-image", action="store_true", help="expression only, also where there is an H&E")
    a = p.parse_args(argv)
    print(f"machine: {machine()}")
    print("section | clustering | modalities | ARI mean ± sd | seed agreement mean (min) | confidence | polished | "
          "s/run")
    print("---|---|---|---|---|---|---|---")
    rows = []
    for sec in find_sections(a.data):
        if a.sections and not any(s in sec.name for s in a.sections):
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            adata = load_section(sec)
        truth = scored_labels(adata, "annotation", ignore=DEFAULT_IGNORE)
        keep = adata.obs_names.isin(truth.index)
        t = truth.loc[adata.obs_names[keep]].to_numpy()
        k = int(truth.nunique())
        for spec in a.cluster_methods:
            method, _, prior = spec.partition(":")
            labels, aris, conf, secs, polished = [], [], [], [], 0
            for seed in range(a.seeds):
                t0 = time.perf_counter()
                with warnings.catch_warnings(), _spatial_prior(prior):
                    warnings.simplefilter("ignore")
                    tl.stmorph(adata, n_clusters=k, cluster_method=method, use_image=False if a.no_image else None,
                               random_state=seed, progress=False)
                secs.append(time.perf_counter() - t0)
                lab = adata.obs["stmorph"].to_numpy()
                labels.append(lab)
                aris.append(adjusted_rand_score(t, lab[keep]))
                conf.append(float(adata.obs["stmorph_confidence"].mean()))
                polished += bool((adata.uns["stmorph"]["params"].get("consensus") or {}).get("polished"))
            pairs = [adjusted_rand_score(x, y) for x, y in itertools.combinations(labels, 2)] or [1.0]
            mods = "+".join(adata.uns["stmorph"]["params"]["modalities"])
            rows.append((sec.name, spec, np.mean(aris), np.mean(pairs), min(pairs)))
            print(f"{sec.name} | {spec} | {mods} | {np.mean(aris):.3f} ± {np.std(aris):.3f} | "
                  f"{np.mean(pairs):.3f} ({min(pairs):.3f}) | {np.mean(conf):.2f} | {polished}/{a.seeds} | "
                  f"{np.mean(secs[1:] or secs):.1f}",
                  flush=True)
    for method in a.cluster_methods:
        r = [x for x in rows if x[1] == method]
        if r:
            print(f"{method}: mean ARI {np.mean([x[2] for x in r]):.3f}; seed agreement >= 0.9 on "
                  f"{sum(x[4] >= 0.9 for x in r)} of {len(r)} sections (every pair of seeds)")
    return 0


@contextlib.contextmanager
def _spatial_prior(weight: str):
    """The consensus' spatial prior set to ``weight`` (nats per neighbour) for the runs inside; "" leaves it."""
    from stmorph.tl import _consensus

    saved = _consensus.SPATIAL_PRIOR
    if weight:
        _consensus.SPATIAL_PRIOR = float(weight)
    try:
        yield
    finally:
        _consensus.SPATIAL_PRIOR = saved


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    raise SystemExit(main())
