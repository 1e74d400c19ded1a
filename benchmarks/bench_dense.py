"""Dense image features (stmorph.im.dense_features) at Visium HD scale, against the patch path.

Writes a synthetic H&E-like tiled BigTIFF (``--size`` px a side at ``--mpp`` um/px, a round piece of
tissue covering most of it, white glass around) to a temporary folder, lays square bins of
``--bin-um`` over the tissue, and measures in one run:

- per stage: the tissue mask, tile reading + resizing, encoding, pooling; throughput in mm^2 of
  encoded tissue per minute and bins per second; peak RSS;
- the patch path (``features(method="patch")``, same encoder, same two windows: the bin and
  6 bin pitches) on a random subset of the same bins, extrapolated to all bins, and the ratio;
- the border effect that sets the default overlap: per-cell relative error of a tile's map
  against an untiled map, for margins of 0-384 px;
- the CPU's instruction sets and its float32 matmul GFLOP/s (helpers of ``bench_features.py``).

Usage (from the repository root)::

    .venv/bin/python benchmarks/bench_dense.py                 # 20,000 px = 6.5 mm, 8 um bins (~440k bins)
    .venv/bin/python benchmarks/bench_dense.py --size 6000     # quick
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_features import cpu_summary, matmul_gflops, peak_rss_mb, reset_peak_rss

TILE = 512


def he_tile(y0: int, x0: int, size: int, side: int, rng_seed: int) -> np.ndarray:
    """One TIFF tile of a deterministic H&E-like texture inside a disc (radius 0.46 side); white outside."""
    rng = np.random.default_rng(rng_seed)
    yy, xx = np.mgrid[y0: y0 + size, x0: x0 + size].astype(np.float32)
    c = side / 2
    inside = (yy - c) ** 2 + (xx - c) ** 2 < (0.46 * side) ** 2
    # eosin background varying slowly (regions), haematoxylin nuclei as dark dots
    region = 0.5 + 0.5 * np.sin(xx / 1500.0) * np.cos(yy / 1100.0)
    img = np.empty((size, size, 3), np.float32)
    img[..., 0] = 235 - 30 * region
    img[..., 1] = 150 + 40 * region
    img[..., 2] = 190 + 10 * region
    img += rng.normal(0, 8, img.shape).astype(np.float32)
    n = int(size * size / 400 * (0.5 + region.mean()))
    ys, xs = rng.integers(0, size, n), rng.integers(0, size, n)
    dot = np.zeros((size, size), np.float32)
    np.add.at(dot, (ys, xs), 1.0)
    from scipy.ndimage import uniform_filter

    dot = np.clip(uniform_filter(dot, 5) * 25, 0, 1)
    img = img * (1 - dot[..., None]) + dot[..., None] * np.array([90, 60, 140], np.float32)
    img[~inside] = 245 + rng.normal(0, 2, ((~inside).sum(), 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def write_tiff(path: Path, side: int) -> None:
    import tifffile

    def tiles():
        for y0 in range(0, side, TILE):
            for x0 in range(0, side, TILE):
                yield he_tile(y0, x0, TILE, side, y0 * 100003 + x0)

    tifffile.imwrite(path, tiles(), shape=(side, side, 3), dtype=np.uint8, tile=(TILE, TILE), photometric="rgb",
                     compression="zlib", compressionargs={"level": 1}, bigtiff=True)


def make_bins(side: int, mpp: float, bin_um: float, path: Path):
    import anndata as ad
    import scipy.sparse as sp

    step = bin_um / mpp
    g = np.arange(step / 2, side, step)
    gx, gy = np.meshgrid(g, g)
    xy = np.c_[gx.ravel(), gy.ravel()]
    c = side / 2
    xy = xy[((xy - c) ** 2).sum(1) < (0.46 * side) ** 2]  # bins under tissue, as Space Ranger's filtered ones
    a = ad.AnnData(sp.csr_matrix((len(xy), 1), dtype=np.float32))
    a.obs_names = [f"b{i}" for i in range(len(xy))]
    a.obsm["spatial"] = xy
    a.uns["spatial"] = {"hd": {
        "images": {},
        "scalefactors": {"spot_diameter_fullres": step, "tissue_hires_scalef": 1.0, "tissue_lowres_scalef": 1.0},
        "metadata": {"source_image_path": str(path), "technology": "visium_hd", "spot_diameter_um": bin_um,
                     "microns_per_pixel": mpp},
    }}
    return a


def border_effect(slide, enc, f: float, margins=(0, 64, 128, 192, 256, 320, 384)) -> list[tuple[int, float, float]]:
    """Per-cell relative error of the core cells of cropped inputs against a map with 128 px more margin."""
    import torch

    from stmorph.im._dense import _read_scaled

    ref_margin = max(margins) + 128  # the reference itself sees more than the largest margin tested
    big = 512 + 2 * ref_margin
    c = slide.width / f / 2
    x0 = int(c - big / 2) // 32 * 32
    img = _read_scaled(slide, x0, x0, big, f)
    m = enc.model.forward_features

    def fmap(a):
        with torch.inference_mode():
            return m(enc.preprocess(np.ascontiguousarray(a)[None]))[0].float().numpy()

    full = fmap(img)
    k0 = ref_margin // 32
    ref = full[:, k0: k0 + 16, k0: k0 + 16]
    out = []
    for mg in margins:
        lo = ref_margin - mg
        got = fmap(img[lo: lo + 512 + 2 * mg, lo: lo + 512 + 2 * mg])[:, mg // 32: mg // 32 + 16, mg // 32: mg // 32 + 16]
        err = np.linalg.norm(got - ref, axis=0) / np.maximum(np.linalg.norm(ref, axis=0), 1e-12)
        out.append((mg, float(err.mean()), float(err.max())))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=20000, help="image side in pixels (default 20000)")
    ap.add_argument("--mpp", type=float, default=0.325,
                    help="image pixel size in um (default 0.325: 20,000 px = 6.5 mm, ~440k bins of 8 um)")
    ap.add_argument("--bin-um", type=float, default=8.0, help="bin side in um (default 8)")
    ap.add_argument("--patch-sample", type=int, default=128, help="bins timed on the patch path (default 128)")
    ap.add_argument("--no-border", action="store_true", help="skip the border-effect measurement")
    ap.add_argument("--section", action="store_true",
                    help="also time the run with the context window pooled over the section (pool='section', as "
                         "the stmorph method asks) and print its cost as a ratio to the plain run")
    ap.add_argument("--json", type=Path, help="write the figures here as JSON")
    args = ap.parse_args(argv)

    import torch

    import stmorph as st
    from stmorph.im._features import n_cores

    warnings.simplefilter("ignore", UserWarning)
    model, flags = cpu_summary()
    gflops = matmul_gflops(2048)
    print(f"# CPU: {model}, {n_cores()} cores; flags: {' '.join(flags) or 'none'}; load {os.getloadavg()[0]:.2f}")
    print(f"# float32 matmul 2048^3 (all cores): {gflops:.1f} GFLOP/s; torch {torch.__version__}")
    fig: dict = {"cpu": model, "cores": n_cores(), "flags": flags, "matmul_gflops": gflops, "size": args.size}
    with tempfile.TemporaryDirectory(prefix="stmorph-bench-dense-") as tmp:
        path = Path(tmp) / "he.tif"
        t = time.perf_counter()
        write_tiff(path, args.size)
        print(f"wrote {args.size} x {args.size} tiled TIFF ({path.stat().st_size / 2**20:.0f} MiB) in "
              f"{time.perf_counter() - t:.1f} s (not timed below)")
        a = make_bins(args.size, args.mpp, args.bin_um, path)
        tissue_mm2 = np.pi * (0.46 * args.size * args.mpp / 1000) ** 2
        print(f"{a.n_obs:,} bins of {args.bin_um:g} um under {tissue_mm2:.1f} mm^2 of tissue "
              f"({args.size * args.mpp / 1000:.1f} mm image at {args.mpp} um/px)")
        fig.update(n_bins=a.n_obs, tissue_mm2_true=tissue_mm2)

        reset_peak_rss()
        rss0 = peak_rss_mb()
        t = time.perf_counter()
        st.im.dense_features(a, "efficientnet_lite2", cache=False, progress=False)
        wall = time.perf_counter() - t
        p = a.uns["X_image"]["params"]
        rss = peak_rss_mb()
        enc_mm2 = p["tissue_mm2"]
        print(f"\ndense_features (efficientnet_lite2, mpp {p['mpp']} = {p['downsample']}x down, "
              f"{p['tile_px']} px tiles + {p['overlap_px']} px overlap = {p['tile_input_px']} px input, "
              f"{p['dtype']}):")
        for k in ("seconds_plan", "seconds_read", "seconds_encode", "seconds_pool"):
            print(f"  {k[8:]:<8s} {p[k]:8.1f} s" + ("  (tissue mask + tile plan)" if k == "seconds_plan" else
                                                  "  (reader thread, overlaps encoding)" if k == "seconds_read" else ""))
        print(f"  total    {wall:8.1f} s; tiles: {p['n_tiles']} touched, {p['n_tiles_encoded']} encoded, "
              f"{p['n_tiles_background']} background (skipped); encoded cores {enc_mm2:.1f} mm^2")
        print(f"  throughput: {tissue_mm2 / wall * 60:.1f} mm^2 tissue/min ({enc_mm2 / wall * 60:.1f} mm^2 encoded "
              f"cores/min), {a.n_obs / wall:,.0f} bins/s; peak RSS {rss:,.0f} MB (before: {rss0:,.0f} MB; the two "
              f"outputs alone: {2 * a.n_obs * p['dim'] * 4 / 2**20:,.0f} MB)")
        fig.update(dense_seconds=wall, dense_params={k: v for k, v in p.items() if not isinstance(v, list)},
                   mm2_per_min=tissue_mm2 / wall * 60, peak_rss_mb=rss)

        if args.section:
            t = time.perf_counter()
            st.im.dense_features(a, "efficientnet_lite2", pool=("mean", "section"), key_added=("X_s", "X_s_ctx"),
                                 cache=False, progress=False)
            ws = time.perf_counter() - t
            ps = a.uns["X_s_ctx"]["params"]
            print(f"\nsame, context window pooled over the section: {ws:.1f} s (pool {ps['seconds_pool']:.1f} s) = "
                  f"{ws / wall:.2f}x the plain run; {ps['n_section_fallback']} windows with no cell in the section")
            fig.update(section_seconds=ws, section_ratio=ws / wall)
            for k in ("X_s", "X_s_ctx"):
                del a.obsm[k]

        rng = np.random.default_rng(0)
        sub = a[np.sort(rng.choice(a.n_obs, min(args.patch_sample, a.n_obs), replace=False))].copy()
        for k in ("X_image", "X_image_context"):
            del sub.obsm[k]
        t = time.perf_counter()
        ctx = f"{6 * args.bin_um:g}um"  # 6 bin pitches, as "6spacing" is on all bins (not on the sparser sample)
        st.im.features(sub, "efficientnet_lite2", patch=("spot", ctx), key_added=("X_image", "X_image_context"),
                       method="patch", cache=False, progress=False)
        tp = time.perf_counter() - t
        per_bin = tp / sub.n_obs
        full = per_bin * a.n_obs
        print(f"\npatch path (same encoder, windows 'spot' + {ctx!r}, backend "
              f"{sub.uns['X_image']['params']['backend']}): {sub.n_obs} bins in {tp:.1f} s = {1 / per_bin:.1f} bins/s "
              f"-> {full / 3600:.1f} h for all {a.n_obs:,} bins; dense is {full / wall:.0f}x faster")
        fig.update(patch_bins_per_s=1 / per_bin, patch_extrapolated_s=full, ratio=full / wall)

        if not args.no_border:
            from stmorph.im.encoders import get_encoder
            from stmorph.im.slide import open_slide

            enc = get_encoder("efficientnet_lite2")
            with open_slide(path) as s:
                rows = border_effect(s, enc, p["downsample"])
            print("\nborder effect (EfficientNet-Lite2, 512 px core, per-cell relative error vs an untiled map):")
            for mg, mean, mx in rows:
                print(f"  margin {mg:4d} px: mean {mean:.4f}  max {mx:.4f}")
            fig["border"] = rows
    gflops2 = matmul_gflops(2048)
    print(f"\n# float32 matmul at the end: {gflops2:.1f} GFLOP/s; load {os.getloadavg()[0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps(fig, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
