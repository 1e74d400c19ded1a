"""Visium HD at full scale: ``stmorph run --method stmorph`` end to end on a synthetic 6.5 mm section.

Writes (or reuses) a full-size synthetic Space Ranger HD ``outs/`` folder (``datasets.synthetic_visium_hd``:
2 um bins summed to 8 and 16 um, a pyramidal BigTIFF H&E), then runs the command a user runs, one process
per run, and prints per run: wall seconds, peak RSS of that process (``os.wait4``), the seconds of each
stage from ``run.json``, bins, and ARI against the planted regions. The expression-only variant is the
same command without ``--image``. Every run starts with an empty feature cache of its own. Beside the figures: the CPU's model and relevant instruction sets and
the fp32 matmul peak measured in this run.

    .venv/bin/python benchmarks/bench_visium_hd.py --workdir /tmp/stmorph_hd            # generate + run
    .venv/bin/python benchmarks/bench_visium_hd.py --outs /tmp/hdfull/outs --image /tmp/hdfull/tissue_image.btf

Bars (issue 12): 8 um bins (>= 400,000 under tissue, image >= 20,000 px a side) under 20 minutes and
12 GB peak RSS; 16 um bins under 5 minutes; the image-aware method above its expression-only variant.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_features import cpu_summary, matmul_gflops  # noqa: E402


def run_child(cmd: list[str], env=None) -> tuple[int, float, float]:
    """Run ``cmd``; returns (exit code, wall seconds, peak RSS in GB of that process and its children)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, wall, usage.ru_maxrss / 1e6  # kB -> GB (Linux)


def generate(workdir: Path, size_um: float, mpp: float, seed: int) -> tuple[Path, Path]:
    outs = workdir / "outs"
    image = workdir / "tissue_image.btf"
    if outs.exists() and image.exists():
        print(f"reusing {outs}")
        return outs, image
    code = ("import stmorph as st, sys; "
            f"a = st.datasets.synthetic_visium_hd(size_um={size_um}, microns_per_pixel={mpp}, random_state={seed}); "
            f"st.datasets.write_visium_hd(a, {str(outs)!r})")
    rc, wall, rss = run_child([sys.executable, "-c", code])
    if rc != 0:
        raise SystemExit(f"generating the section failed (exit {rc})")
    print(f"generated and wrote {outs} in {wall:.0f} s (peak RSS {rss:.1f} GB)")
    return outs, image


def ari_of(out: Path, labels: Path, method: str = "stmorph") -> tuple[float, int]:
    from sklearn.metrics import adjusted_rand_score

    dom = pd.read_csv(out / "domains.csv", index_col=0)
    lab = pd.read_csv(labels, sep="\t", header=None, index_col=0).iloc[:, 0]
    both = dom.index.intersection(lab.index)
    return float(adjusted_rand_score(lab.loc[both].astype(str), dom.loc[both, method].astype(str))), len(dom)


def print_searches(result: Path) -> None:
    """Each exact-count resolution search in the result (``uns[key]["resolution_search"]``), one line per run."""
    import anndata as ad

    uns = ad.read_h5ad(result, backed="r").uns
    for key, val in uns.items():
        trace = val.get("resolution_search") if isinstance(val, dict) else None
        if trace is None:
            continue
        runs = list(zip(trace["algorithm"], trace["resolution"], trace["n_clusters"], trace["seconds"]))
        print(f"  {key}: {len(runs)} clustering runs, {sum(r[3] for r in runs):.1f} s: "
              + "; ".join(f"{a} res {r:.4g} -> {k} ({s:.1f} s)" for a, r, k, s in runs), flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--outs", type=Path, help="an existing Space Ranger HD outs/ folder (default: generate one)")
    ap.add_argument("--image", type=Path, help="its full-resolution H&E (default: <outs>/../tissue_image.btf)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/stmorph_hd"))
    ap.add_argument("--size-um", type=float, default=6500.0)
    ap.add_argument("--mpp", type=float, default=0.3, help="microns per pixel of the generated H&E")
    ap.add_argument("--bin-sizes", type=int, nargs="+", default=[16, 8])
    ap.add_argument("--expression-only", type=int, nargs="*", default=[16, 8],
                    help="bin sizes also run without --image")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-clusters", type=int, default=None,
                    help="passed to stmorph run (default: chosen from the data, as a user runs it)")
    ap.add_argument("--method", default="stmorph",
                    help="stmorph run --method (stmorph, stmic, senca, ...); image-only methods skip the "
                         "expression-only runs")
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for the runs (default: unset)")
    args = ap.parse_args(argv)

    model, flags = cpu_summary()
    print(f"CPU: {model}; {os.cpu_count()} logical cores; instruction sets: {' '.join(flags) or 'none of interest'}")
    print(f"fp32 matmul peak: {matmul_gflops():.0f} GFLOP/s; load average at start: {os.getloadavg()}")
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.outs is None:
        outs, image = generate(args.workdir, args.size_um, args.mpp, args.seed)
    else:
        outs = args.outs
        image = args.image or outs.parent / "tissue_image.btf"
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)

    rows = []
    from stmorph.tl._methods import get_method

    needs_image = get_method(args.method).image == "required"
    plan = [(b, True) for b in args.bin_sizes]
    plan += [] if needs_image else [(b, False) for b in args.bin_sizes if b in args.expression_only]
    for bin_size, with_image in plan:
        labels = outs / "binned_outputs" / f"square_{bin_size:03d}um" / "labels.tsv"
        tag = ("" if args.n_clusters is None else f"_k{args.n_clusters}") + (
            "" if args.method == "stmorph" else f"_{args.method}")
        out = args.workdir / f"run_{bin_size:03d}um_{'image' if with_image else 'expression'}{tag}"
        cmd = [sys.executable, "-m", "stmorph", "run", str(outs), "--bin-size", str(bin_size), "--method", args.method,
               "--out", str(out), "--labels", str(labels), "--seed", str(args.seed), "--quiet", "--force"]
        if with_image:
            cmd += ["--image", str(image)]
        if args.n_clusters is not None:
            cmd += ["--n-clusters", str(args.n_clusters)]
        print("$", " ".join(cmd), flush=True)
        cache = tempfile.mkdtemp(prefix="feature_cache_", dir=args.workdir)  # a cold run: features computed
        try:
            rc, wall, rss = run_child(cmd, {**env, "STMORPH_CACHE_DIR": cache})
        finally:
            shutil.rmtree(cache, ignore_errors=True)
        if rc != 0:
            print(f"  failed with exit code {rc}")
            rows.append({"bins_um": bin_size, "image": with_image, "wall_s": wall, "peak_rss_gb": rss, "ari": None})
            continue
        info = json.loads((out / "run.json").read_text())
        stages = {k: round(float(v), 1) for k, v in info.get("timings_s", {}).items() if isinstance(v, (int, float))}
        ari, n = ari_of(out, labels, args.method)
        print(f"  {n:,} bins, wall {wall:.0f} s, peak RSS {rss:.2f} GB, ARI {ari:.3f}; stages (s): {stages}", flush=True)
        print_searches(out / "result.h5ad")
        rows.append({"bins_um": bin_size, "image": with_image, "bins": n, "wall_s": round(wall, 1),
                     "peak_rss_gb": round(rss, 2), "ari": round(ari, 3)})
    print()
    cols = ["bins_um", "image", "bins", "wall_s", "peak_rss_gb", "ari"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    print(f"load average at end: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
