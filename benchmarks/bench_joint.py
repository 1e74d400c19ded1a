"""Joint domains across a cohort against separate runs: per-section ARI on the annotated DLPFC sections.

For each seed, each section is run alone (``stmorph.tl.stmorph``, or the expression-only
baseline with ``--method expression``: the joint pipeline on one section at a time) and all sections are run together
(``stmorph.tl.joint_domains``, Harmony between sections, one Gaussian mixture over every spot,
refinement within each section), both with k = the number of annotated layers. Prints the
per-section ARI (mean +- sd over the seeds) of both, the difference, and the seconds.

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_joint.py --data ../shared/data --seeds 3
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--sections", nargs="+", default=["151673", "151674"])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--method", choices=("stmorph", "expression"), default="stmorph")
    p.add_argument("--batch-correction", choices=("harmony", "none"), default="harmony")
    p.add_argument("--no-refit", action="store_true", help="keep the joint mixture's labels (no per-section refit)")
    args = p.parse_args()

    import stmorph as st
    from stmorph.cli._benchmark import machine_description
    from stmorph.ev._benchmark import find_sections, load_section, scored_labels

    warnings.simplefilter("ignore")
    found = [s for s in find_sections(args.data) if any(o in s.name for o in args.sections)]
    if len(found) < 2:
        raise SystemExit(f"need two annotated sections matching {args.sections} under {args.data}; found {len(found)}")
    sections = {s.name: load_section(s) for s in found}
    ks = {n: int(scored_labels(a, "annotation").nunique()) for n, a in sections.items()}
    k = max(ks.values())
    bc = None if args.batch_correction == "none" else args.batch_correction
    print(f"machine: {machine_description()} (other jobs may share it)")
    print(f"sections: {', '.join(f'{n} ({a.n_obs} spots, {ks[n]} labels)' for n, a in sections.items())}; "
          f"k = {k}; method {args.method}; batch correction {bc}; refit {not args.no_refit}; "
          f"seeds 0..{args.seeds - 1}")
    sep = {n: [] for n in sections}
    joint = {n: [] for n in sections}
    t_sep = t_joint = 0.0
    for seed in range(args.seeds):
        for n, a in sections.items():
            t0 = time.perf_counter()
            if args.method == "stmorph":
                st.tl.stmorph(a, n_clusters=k, use_image=False, random_state=seed, progress=False)
                key = "stmorph"
            else:
                st.tl.joint_domains({n: a}, method="expression", n_clusters=k, random_state=seed,
                                    key_added="separate")
                key = "separate"
            t_sep += time.perf_counter() - t0
            sep[n].append(st.ev.ari(a, key))
        t0 = time.perf_counter()
        st.tl.joint_domains(sections, method=args.method, n_clusters=k, batch_correction=bc,
                            refit=not args.no_refit, random_state=seed)
        t_joint += time.perf_counter() - t0
        for n, a in sections.items():
            joint[n].append(st.ev.ari(a, "joint"))
        print(f"seed {seed}: " + "; ".join(f"{n} separate {sep[n][-1]:.3f} joint {joint[n][-1]:.3f}" for n in sections))
    print()
    print("| section | separate ARI | joint ARI | joint - separate |")
    print("|---|---|---|---|")
    for n in sections:
        s, j = np.asarray(sep[n]), np.asarray(joint[n])
        print(f"| {n} | {s.mean():.3f} +- {s.std(ddof=1) if s.size > 1 else 0:.3f} | "
              f"{j.mean():.3f} +- {j.std(ddof=1) if j.size > 1 else 0:.3f} | {j.mean() - s.mean():+.3f} |")
    s_all = np.mean([np.mean(v) for v in sep.values()])
    j_all = np.mean([np.mean(v) for v in joint.values()])
    print(f"| mean | {s_all:.3f} | {j_all:.3f} | {j_all - s_all:+.3f} |")
    print(f"\nseconds over {args.seeds} seed(s): separate {t_sep:.1f}, joint {t_joint:.1f}")


if __name__ == "__main__":
    main()
