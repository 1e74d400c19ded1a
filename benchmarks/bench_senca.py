"""SENCA-st benchmark: speed on synthetic sections and ARI on ../shared/data.

Usage (from the repository root)::

    .venv/bin/python benchmarks/bench_senca.py                 # everything
    .venv/bin/python benchmarks/bench_senca.py --only speed    # the two timings
    .venv/bin/python benchmarks/bench_senca.py --only ari --sections A1 B1
    .venv/bin/python benchmarks/bench_senca.py --only ablation  # Tables 4 and 5 on A1 + synthetic, 3 seeds
    .venv/bin/python benchmarks/bench_senca.py --only schedule  # large sections with an image: batch sizes
    .venv/bin/python benchmarks/bench_senca.py --only rna-views  # sections without an image: two dropout views
    .venv/bin/python benchmarks/bench_senca.py --only presets    # default vs the "mixture" preset, every section
    .venv/bin/python benchmarks/bench_senca.py --threads 1     # torch threads (default: torch's)

Speed (image feature extraction excluded, as the bar says):
  * 10 epochs (paper setting) on a 600-spot synthetic section (HER2ST size), bar: < 30 s;
  * 10 epochs on a 4,992-spot synthetic Visium section, bar: < 5 min;
  * a DLPFC section (3,600 spots, RNA only, whole call), bar: < 60 s (with --data).
  The synthetic sections carry stand-in image features (1,280-d, the
  EfficientNet-Lite2 width, region signal + noise) so that only SENCA-st is timed.

Accuracy: every annotated section found under --data (HER2ST A1 with its H&E,
B1/C1/D1 without an image, the DLPFC sections without a full-resolution image).
SENCA-st (and, where an image exists, its two Table 4 ablations) beside stMIC
and the expression-only baseline, with the number of clusters set to the
number of distinct scored labels and ``undetermined`` left out of scoring.
Without an image SENCA-st runs its RNA branch alone and stMIC is not applicable.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"

PAPER = {
    "SENCA-st HER2ST mean ARI over 8 sections (Table 1)": 0.304,
    "SENCA-st HER2ST median ARI (Table 1)": 0.320,
    "without cross-attention (Table 4)": 0.2218,
    "without hierarchical learning (Table 4)": 0.2495,
}


def stand_in_features(adata, dim=1280, seed=0):
    """Region-informative random features standing in for cached CNN features."""
    rng = np.random.default_rng(seed)
    codes = adata.obs["annotation"].astype("category").cat.codes.to_numpy()
    centers = rng.normal(size=(codes.max() + 1, dim)).astype(np.float32)
    return centers[codes] * 0.5 + rng.normal(size=(adata.n_obs, dim)).astype(np.float32)


def bench_speed(threads):
    import stmorph
    from stmorph.tl.senca import senca

    print("== speed (image feature extraction excluded) ==")
    for n, bar in ((600, 30.0), (4992, 300.0)):
        a = stmorph.datasets.synthetic(n, image=False, random_state=0)
        a.obsm["X_image_senca"] = stand_in_features(a)
        k = int(a.obs["annotation"].nunique())
        t0, c0, load0 = time.perf_counter(), time.process_time(), os.getloadavg()[0]
        senca(a, k, progress=False, device="cpu")
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        p = a.uns["senca"]["params"]
        ari = stmorph.ev.ari(a, "senca")
        print(f"{n:>5} spots x {p['n_genes_used']} genes, {p['epochs']} epochs x {p['steps_per_epoch']} steps, "
              f"attention={p['attention_resolved']}, threads={threads}: {dt:6.1f} s "
              f"wall (train {p['seconds_train']:.1f} s), {cpu:6.1f} s CPU, load avg {load0:.1f}->{os.getloadavg()[0]:.1f}; "
              f"bar < {bar:.0f} s: {'PASS' if dt < bar else 'FAIL'}  [ARI vs synthetic truth {ari:.3f}]", flush=True)


def bench_dlpfc_speed(data):
    """The whole senca() call on the first DLPFC section found (RNA only), bar < 60 s."""
    import stmorph
    from stmorph.ev._benchmark import find_sections, load_section
    from stmorph.tl.senca import senca

    secs = [s for s in find_sections(data) if s.layout == "visium"] if data.exists() else []
    if not secs:
        print("no Visium section under --data: DLPFC timing skipped")
        return
    a = load_section(secs[0])
    k = int(stmorph.ev._metrics.scored_labels(a).nunique())
    t0, c0, load0 = time.perf_counter(), time.process_time(), os.getloadavg()[0]
    senca(a, k, progress=False, device="cpu")
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    p = a.uns["senca"]["params"]
    print(f"{secs[0].name}: {a.n_obs} spots, RNA only, whole call {dt:.1f} s wall (train {p['seconds_train']:.1f} s), "
          f"{cpu:.1f} s CPU, load avg {load0:.1f}->{os.getloadavg()[0]:.1f}; bar < 60 s: "
          f"{'PASS' if dt < 60 else 'FAIL'}  [ARI {stmorph.ev.ari(a, 'senca'):.3f}]", flush=True)


def bench_ablation(data, seeds=(0, 1, 2), preset="default"):
    """Table 4 (full vs w/o cross-attention vs w/o hierarchy) and Table 5 (4, 8, 16 neighbours), mean of seeds,
    each run from the SencaConfig ``preset``.

    On HER2ST A1 with its H&E (features cached on disk after the first run) and
    on a 600-spot synthetic section with a rendered image whose "vessel-rich"
    region differs from stroma only in the image.
    """
    import stmorph
    from stmorph.ev._benchmark import find_sections, load_section
    from stmorph.tl.senca import senca

    cases = []
    a1 = [s for s in find_sections(data) if s.name.endswith("A1")] if data.exists() else []
    if a1:
        cases.append(("HER2ST A1", load_section(a1[0])))
    syn = stmorph.datasets.synthetic(600, image=True, random_state=0)
    cases.append(("synthetic 600 (image-only region)", syn))
    runs = [("full", {}), ("w/o cross-attention", {"cross_attention": False}),
            ("w/o hierarchical", {"hierarchical": False}), ("RNA only (no image)", {"compute_image_features": False}),
            ("8 neighbours", {"n_neighbors": 8}), ("16 neighbours", {"n_neighbors": 16})]
    print(f"\n== ablations (preset {preset!r}), mean (sd) over seeds {list(seeds)} ==", flush=True)
    print("| section | " + " | ".join(r for r, _ in runs) + " |")
    print("|---|" + "---|" * len(runs))
    for name, ad0 in cases:
        k = int(stmorph.ev._metrics.scored_labels(ad0).nunique())
        if "X_image_senca" not in ad0.obsm:  # compute (or load from the disk cache) once
            senca(ad0, k, progress=False, epochs=0)
        cells = []
        for _, kw in runs:
            vals = []
            for seed in seeds:
                a = ad0.copy()
                if kw.get("compute_image_features") is False:
                    del a.obsm["X_image_senca"]
                senca(a, k, progress=False, random_state=seed, preset=preset, **kw)
                vals.append(stmorph.ev.ari(a, "senca"))
            cells.append(f"{np.mean(vals):.3f} ({np.std(vals):.3f})")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


def bench_schedule(sizes=(2000, 4000), seeds=(0, 1, 2)):
    """Sections above ``full_section_max_spots`` with an image: ~500-spot spatial batches (the default) against
    32-spot mini-batches (``large_section_batch_spots=None``), the same number of steps; ARI and seconds per run.

    Synthetic sections with a rendered image whose "vessel-rich" region differs from stroma only in the image;
    image features computed once per section (cached), training and clustering timed.
    """
    import stmorph
    from stmorph.tl.senca import senca

    runs = [("~500-spot batches (default)", {}), ("32-spot mini-batches", {"large_section_batch_spots": None})]
    print(f"\n== large sections with an image: ARI mean (sd) and seconds per run over seeds {list(seeds)} ==",
          flush=True)
    print("| section | " + " | ".join(r for r, _ in runs) + " |")
    print("|---|" + "---|" * len(runs))
    for n in sizes:
        a0 = stmorph.datasets.synthetic(n, image=True, random_state=0)
        k = int(stmorph.ev._metrics.scored_labels(a0).nunique())
        senca(a0, k, progress=False, epochs=0)  # image features once
        cells = []
        for _, kw in runs:
            vals, secs = [], []
            for seed in seeds:
                a = a0.copy()
                t0 = time.perf_counter()
                senca(a, k, progress=False, random_state=seed, **kw)
                secs.append(time.perf_counter() - t0)
                vals.append(stmorph.ev.ari(a, "senca"))
            cells.append(f"{np.mean(vals):.3f} ({np.std(vals):.3f}), {np.mean(secs):.1f} s")
        print(f"| synthetic {n:,} (image-only region) | " + " | ".join(cells) + " |", flush=True)


def bench_rna_views(data, seeds_her2st=10, seeds_dlpfc=3):
    """Sections without an image: SENCA-st with two dropout views contrasted (the default) against the MSE alone
    (``rna_only_contrast=False``) and the expression baseline; ARI mean (sd) over seeds, k = scored labels."""
    import stmorph
    from stmorph.ev._benchmark import find_sections, load_section

    runs = [("two dropout views (default)", {}), ("MSE alone", {"rna_only_contrast": False})]
    print("\n== sections without an image: SENCA-st's RNA branch, ARI mean (sd) ==", flush=True)
    print("| section | seeds | " + " | ".join(r for r, _ in runs) + " | expression | SENCA-st s/run |")
    print("|---|---|" + "---|" * (len(runs) + 2))
    for sec in find_sections(data):
        a = load_section(sec)
        if stmorph.tl._methods.has_image(a):
            continue
        k = int(stmorph.ev._metrics.scored_labels(a).nunique())
        seeds = range(seeds_dlpfc if a.n_obs > 1000 else seeds_her2st)
        cells, secs = [], []
        for _, kw in runs:
            vals = []
            for seed in seeds:
                t0 = time.perf_counter()
                stmorph.tl.senca(a, k, random_state=seed, progress=False, **kw)
                if not kw:  # the default's time
                    secs.append(time.perf_counter() - t0)
                vals.append(stmorph.ev.ari(a, "senca"))
            cells.append(f"{np.mean(vals):.3f} ({np.std(vals):.3f})")
        ex = []
        for seed in seeds:
            stmorph.tl.run_methods(a, ["expression"], n_clusters=k, random_state=seed, progress=False)
            ex.append(stmorph.ev.ari(a, "expression"))
        print(f"| {sec.name} | 0-{len(seeds) - 1} | " + " | ".join(cells) +
              f" | {np.mean(ex):.3f} ({np.std(ex):.3f}) | {np.mean(secs):.1f} |", flush=True)


def bench_presets(data, seeds=(0, 1, 2), presets=("default", "mixture")):
    """SENCA-st's presets on every annotated section (with its H&E where there is one, as ``stmorph benchmark``
    runs it) beside the expression baseline: ARI mean (sd) over seeds, k = scored labels, seconds per run."""
    import stmorph
    from stmorph.ev._benchmark import find_sections, load_section

    print("\n== SENCA-st presets against the expression baseline, ARI mean (sd) ==", flush=True)
    print("| section | image | " + " | ".join(f"`{p}`" for p in presets) + " | expression | s/run (" +
          ", ".join(presets) + ") |")
    print("|---|---|" + "---|" * (len(presets) + 2))
    for sec in find_sections(data):
        a = load_section(sec)
        k = int(stmorph.ev._metrics.scored_labels(a).nunique())
        cells, secs = [], []
        for preset in presets:
            vals, ts = [], []
            for seed in seeds:
                t0 = time.perf_counter()
                stmorph.tl.senca(a, k, preset=preset, random_state=seed, progress=False)
                ts.append(time.perf_counter() - t0)
                vals.append(stmorph.ev.ari(a, "senca"))
            cells.append(f"{np.mean(vals):.3f} ({np.std(vals):.3f})")
            secs.append(f"{np.mean(ts):.1f}")
        ex = []
        for seed in seeds:
            stmorph.tl.run_methods(a, ["expression"], n_clusters=k, random_state=seed, progress=False)
            ex.append(stmorph.ev.ari(a, "expression"))
        image = "yes" if stmorph.tl._methods.has_image(a) else "no"
        print(f"| {sec.name} | {image} | " + " | ".join(cells) + f" | {np.mean(ex):.3f} ({np.std(ex):.3f}) | " +
              ", ".join(secs) + " |", flush=True)


def bench_large(n=50_000):
    """One run on a large synthetic section: local attention, kNN-restricted Ward; time and peak RSS."""
    import resource

    import stmorph
    from stmorph.tl.senca import senca

    print(f"\n== large section ({n} spots) ==", flush=True)
    a = stmorph.datasets.synthetic(n, image=False, random_state=0)
    a.obsm["X_image_senca"] = stand_in_features(a, dim=256)
    k = int(a.obs["annotation"].nunique())
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    t0, c0 = time.perf_counter(), time.process_time()
    senca(a, k, progress=False, device="cpu")
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    p = a.uns["senca"]["params"]
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"{n} spots: {dt:.1f} s wall ({cpu:.1f} s CPU; train {p['seconds_train']:.1f} s), "
          f"attention={p['attention_resolved']}, knn-ward={p['cluster_knn_connectivity']}, "
          f"peak RSS {rss:.2f} GB (before the call {rss0:.2f} GB), ARI {stmorph.ev.ari(a, 'senca'):.3f}", flush=True)


def bench_ari(data, only):
    import stmorph
    from stmorph.tl.senca import senca
    from stmorph.ev._benchmark import find_sections, load_section

    print(f"\n== ARI on {data} ==", flush=True)
    rows = []
    for sec in find_sections(data):
        short = sec.name.split("/")[-1]
        if only and short not in only and sec.name not in only:
            continue
        a = load_section(sec)
        k = int(stmorph.ev._metrics.scored_labels(a).nunique())
        has_img = stmorph.tl._methods.has_image(a)
        res = {"section": short, "n_spots": a.n_obs, "k": k, "image": has_img}
        t0 = time.perf_counter()
        methods = ["expression", "stmic"] if has_img else ["expression"]
        stmorph.tl.run_methods(a, methods, n_clusters=k, progress=False)
        res["t_baselines"] = time.perf_counter() - t0
        for m in methods:
            res[m] = stmorph.ev.ari(a, m)
        runs = [("senca", {})]
        if has_img:
            runs += [("senca_no_xattn", {"cross_attention": False}), ("senca_no_hier", {"hierarchical": False})]
        for key, kw in runs:
            t0 = time.perf_counter()
            senca(a, k, key_added=key, progress=False, **kw)
            res[f"t_{key}"] = time.perf_counter() - t0
            res[key] = stmorph.ev.ari(a, key)
            if key == "senca":
                res["t_image_features"] = a.uns["senca"]["params"]["seconds_image_features"]
        rows.append(res)
        print("  " + "  ".join(f"{c}={_fmt(v)}" for c, v in res.items()), flush=True)
    if not rows:
        print("  no annotated sections found")
        return
    cols = ["senca", "senca_no_xattn", "senca_no_hier", "stmic", "expression"]
    print("\n| section | spots | k | image | SENCA-st | SENCA-st w/o cross-attn | SENCA-st w/o hierarchical "
          "| stMIC | expression-only | SENCA-st s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        vals = " | ".join(_fmt(r.get(c, float("nan"))) for c in cols)
        print(f"| {r['section']} | {r['n_spots']} | {r['k']} | {'yes' if r['image'] else 'no'} | {vals} "
              f"| {r['t_senca']:.0f} |")
    her = [r for r in rows if r["section"][:1] in "ABCDEFGH" and len(r["section"]) == 2]
    if her:
        print(f"\nHER2ST sections here: mean SENCA-st ARI {np.mean([r['senca'] for r in her]):.3f} over "
              f"{len(her)} ({', '.join(r['section'] for r in her)}); "
              f"expression-only {np.mean([r['expression'] for r in her]):.3f}")
    print("\nPaper (for reference; 8 HER2ST sections, all with images, GPU):")
    for what, v in PAPER.items():
        print(f"  {what}: {v}")


def _fmt(v):
    if isinstance(v, float):
        return "n/a" if np.isnan(v) else f"{v:.3f}"
    return str(v)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--only", choices=["speed", "ari", "large", "ablation", "schedule", "rna-views", "presets"],
                    default=None)
    ap.add_argument("--sections", nargs="*", default=None, help="e.g. A1 B1 151673")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--preset", default="default", help="SencaConfig preset of the ablation runs (default, mixture)")
    args = ap.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads, python {sys.version.split()[0]}")
    if args.only in (None, "speed"):
        bench_speed(threads)
        bench_dlpfc_speed(args.data)
    if args.only in (None, "large"):
        bench_large()
    if args.only in (None, "ablation"):
        bench_ablation(args.data, preset=args.preset)
    if args.only in (None, "schedule"):
        bench_schedule()
    if args.only in (None, "rna-views"):
        if args.data.exists():
            bench_rna_views(args.data)
    if args.only in (None, "presets"):
        if args.data.exists():
            bench_presets(args.data)
    if args.only in (None, "ari"):
        if not args.data.exists():
            print(f"{args.data} not found: ARI part skipped")
        else:
            bench_ari(args.data, set(args.sections or []))


if __name__ == "__main__":
    main()
