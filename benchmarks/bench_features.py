"""Speed and memory of stmorph.im.features on a real whole-slide JPEG.

Measures, in one run (ratios in one run are what count on a shared machine):

- features() throughput (patches/s, whole call: decode + crop + resize +
  normalise + encoder) against the bare encoder forward on pre-made tensors of
  the same batch size, measured before and after features() (the compute bound);
- the ratio against a naive loop like the stMIC notebook's (crop, write each patch
  to a JPEG file, read it back, resize, predict one image at a time);
- achieved GFLOP/s of the encoder against a large float32 matrix multiply
  (the machine's practical peak), and the inference options tried to raise it;
- patches/s for efficientnet_lite2 and resnet50 (random weights: no pretrained
  ResNet-50 file is available offline, and speed does not depend on the values);
- peak RSS of each phase.

Usage (from the repository root)::

    .venv/bin/python benchmarks/bench_features.py            # full run, >= 2000 spots
    .venv/bin/python benchmarks/bench_features.py --quick    # smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
IMAGE = DATA / "her2st" / "ST-imgs" / "C" / "C2" / "5714_HE_BT_C2.jpg"
SPOT_DIAMETER = 145.0  # full-resolution pixels on the HER2ST C2 image


# -- measurement helpers -----------------------------------------------------
def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process (Linux)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss_mb() -> float:
    with contextlib.suppress(OSError):
        m = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
        if m:
            return int(m.group(1)) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def matmul_gflops(n: int = 4096, reps: int = 5, dtype=None) -> float:
    """Best-of GFLOP/s of an n x n matrix multiply (float32 unless ``dtype``; all threads)."""
    import torch

    from stmorph.im._features import n_cores

    threads = torch.get_num_threads()
    torch.set_num_threads(n_cores())
    try:
        return _matmul(torch, n, reps, dtype or torch.float32)
    finally:
        torch.set_num_threads(threads)


def _matmul(torch, n, reps, dtype):
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def encoder_flops(model, size: int) -> int:
    """FLOPs (2 x multiply-adds of convolutions and linear layers) of one image."""
    import torch

    total = [0]

    def hook(mod, inp, out):
        if isinstance(mod, torch.nn.Conv2d):
            kh, kw = mod.kernel_size
            total[0] += 2 * out.numel() * (mod.in_channels // mod.groups) * kh * kw
        elif isinstance(mod, torch.nn.Linear):
            total[0] += 2 * out.numel() * mod.in_features

    hooks = [m.register_forward_hook(hook) for m in model.modules()]
    with torch.inference_mode():
        model(torch.zeros(1, 3, size, size))
    for h in hooks:
        h.remove()
    return total[0]


def bare_forward(fn, x, reps: int, ctx=contextlib.nullcontext) -> float:
    """Images/s of ``fn(x)`` over ``reps`` batches after one warm-up batch."""
    import torch

    with torch.inference_mode(), ctx():
        fn(x)
        t = time.perf_counter()
        for _ in range(reps):
            fn(x)
        return reps * x.shape[0] / (time.perf_counter() - t)


def bare_forward_streams(fn, x, reps: int, streams: int, ctx=contextlib.nullcontext) -> float:
    """Images/s of ``streams`` threads each running ``fn(x)`` ``reps`` times (features()' CPU layout)."""
    import threading

    import torch

    if streams == 1:
        return bare_forward(fn, x, reps, ctx)

    def run(n):
        with torch.inference_mode(), ctx():
            for _ in range(n):
                fn(x)

    for n, timed in ((1, False), (reps, True)):  # warm-up round, then the timed one
        threads = [threading.Thread(target=run, args=(n,)) for _ in range(streams)]
        t = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    return streams * reps * x.shape[0] / (time.perf_counter() - t)


def make_adata(n_spots: int, image: Path):
    """AnnData with a dense square grid of spots inside the image."""
    import anndata as ad
    import scipy.sparse as sp
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None  # a whole-slide JPEG is large by design (open_slide does the same)
    with Image.open(image) as im:
        w, h = im.size
    side = int(np.ceil(np.sqrt(n_spots)))
    margin = SPOT_DIAMETER
    gx, gy = np.meshgrid(np.linspace(margin, w - margin, side), np.linspace(margin, h - margin, side))
    xy = np.c_[gx.ravel(), gy.ravel()][:n_spots]
    a = ad.AnnData(sp.csr_matrix((len(xy), 1), dtype=np.float32))
    a.obs_names = [f"g{i}" for i in range(len(xy))]
    a.obsm["spatial"] = xy
    a.uns["spatial"] = {"C2": {
        "images": {},
        "scalefactors": {"spot_diameter_fullres": SPOT_DIAMETER, "tissue_hires_scalef": 1.0, "tissue_lowres_scalef": 1.0},
        "metadata": {"source_image_path": str(image), "technology": "legacy_st", "spot_diameter_um": 100.0},
    }}
    return a, (w, h), float(np.diff(np.linspace(margin, w - margin, side))[0])


def naive_loop(image: Path, xy: np.ndarray, size: int, model, input_size: int, mean: float, std: float) -> float:
    """Patches/s of the stMIC-notebook way: crop -> JPEG file -> read back -> resize -> predict one image."""
    import torch
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None
    img = Image.open(image).convert("RGB")  # decoded once, not timed (favours the naive loop)
    img.load()
    r = size // 2
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        t = time.perf_counter()
        for i, (x, y) in enumerate(xy):
            x, y = int(round(x)), int(round(y))
            img.crop((x - r, y - r, x - r + size, y - r + size)).save(f"{tmp}/spot{i}.jpg")
        for i in range(len(xy)):
            patch = Image.open(f"{tmp}/spot{i}.jpg").convert("RGB").resize((input_size, input_size))
            arr = (np.asarray(patch, dtype=np.float32) - mean) / std  # (S, S, 3)
            model(torch.tensor(arr.transpose(2, 0, 1)[None]))  # (1, 3, S, S), one image per call
        return len(xy) / (time.perf_counter() - t)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--image", type=Path, default=IMAGE)
    ap.add_argument("--n-spots", type=int, default=2025)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--reps", type=int, default=4, help="batches timed per bare-forward measurement")
    ap.add_argument("--trial-reps", type=int, default=1, help="batches timed per option and round")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds of the inference-option trials")
    ap.add_argument("--naive-spots", type=int, default=48)
    ap.add_argument("--resnet-spots", type=int, default=256)
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    ap.add_argument("--json", type=Path, help="also write the figures as JSON")
    args = ap.parse_args(argv)
    if args.quick:
        args.n_spots, args.reps, args.rounds, args.naive_spots, args.resnet_spots = 96, 1, 1, 8, 32
    if not args.image.exists():
        print(f"image not found: {args.image} (needs ../shared/data)", file=sys.stderr)
        return 2

    import torch

    import stmorph
    from stmorph.im import _features
    from stmorph.im.encoders import efficientnet_lite, resnet
    from stmorph.im.encoders._layers import prepare_for_inference

    cores = _features.n_cores()
    torch.set_num_threads(cores)
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    has_bf16 = bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))
    fig: dict = {"load_avg_start": os.getloadavg()[0], "cores": cores, "torch": torch.__version__, "cpu_bf16": has_bf16, "batch_size": args.batch_size}
    print(f"# stmorph features benchmark: {args.image.name}, {cores} cores, torch {torch.__version__}, "
          f"CPU bf16 instructions: {has_bf16}, load average {os.getloadavg()[0]:.1f}")

    adata, (w, h), pitch = make_adata(args.n_spots, args.image)
    size = stmorph.im.patch_size_px(adata, "spot")
    print(f"image {w} x {h}, {adata.n_obs} spots on a dense grid (pitch {pitch:.0f} px), patch {size} px")
    fig.update(n_spots=adata.n_obs, image_wh=[w, h], patch_px=size)

    # -- practical peak: best of measurements spread over the run (shared machine) --
    mm = 1024 if args.quick else 4096
    torch.set_num_threads(cores)
    peaks = [matmul_gflops(mm)]
    peak = peaks[0]
    print(f"float32 matmul {mm}^3: {peak:.1f} GFLOP/s (re-measured later; the best is the practical peak)")

    # -- real patches for the bare forward ---------------------------------
    enc = stmorph.im.get_encoder("efficientnet_lite2")
    gflop = encoder_flops(enc.model, enc.input_size) / 1e9
    fig["lite2_gflop_per_image"] = gflop
    slide = stmorph.im.slide_for(adata)
    first = next(iter(stmorph.im.iter_patches(slide, adata.obsm["spatial"][: args.batch_size], size,
                                               out_size=enc.input_size, batch_size=args.batch_size)))
    slide.close()
    x = enc.preprocess(first.patches)  # (B, 3, 260, 260) channels_last

    # -- inference options tried (bare forward, same batch) ----------------
    # interleaved rounds, best round kept per option: the machine may be shared
    print(f"\nefficientnet_lite2: {gflop:.2f} GFLOP/image at {enc.input_size} px; bare forward, batch {args.batch_size} "
          f"(best of {args.rounds} interleaved rounds):")
    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    plain = efficientnet_lite.load_efficientnet_lite2(fuse=False).to(memory_format=torch.contiguous_format)
    plain_cl = efficientnet_lite.load_efficientnet_lite2(fuse=False)
    fused_nchw = prepare_for_inference(efficientnet_lite.load_efficientnet_lite2(fuse=False), channels_last=False)
    x_nchw = x.contiguous()
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        frozen = torch.jit.freeze(torch.jit.trace(enc.model, x))
    streams, per_stream = _features.plan_threads(torch.device("cpu"))
    st = f"{streams} streams x {per_stream} thread"
    one = f"1 stream x {cores} threads"
    options = [  # name, model, input, (streams, threads per stream), autocast
        (f"eval, BatchNorm separate, NCHW, {one}", plain, x_nchw, (1, cores), None),
        (f"eval, BatchNorm separate, channels_last, {one}", plain_cl, x, (1, cores), None),
        (f"BatchNorm folded, NCHW, {one}", fused_nchw, x_nchw, (1, cores), None),
        (f"BatchNorm folded, channels_last, {one}", enc, x, (1, cores), None),
        (f"BatchNorm folded, channels_last, jit.trace+freeze, {one}", frozen, x, (1, cores), None),
        ("BatchNorm folded, channels_last, 1 stream x 1 thread", enc, x, (1, 1), None),
        (f"BatchNorm folded, channels_last, {st}", enc, x, (streams, per_stream), None),
    ]
    if has_bf16:
        options += [
            (f"BatchNorm folded, channels_last, bf16, {one}", enc, x, (1, cores), bf16),
            ("BatchNorm folded, channels_last, bf16, 1 stream x 1 thread", enc, x, (1, 1), bf16),
            (f"BatchNorm folded, channels_last, bf16, {st}", enc, x, (streams, per_stream), bf16),
        ]
    trials = {name: 0.0 for name, *_ in options}
    for _ in range(args.rounds):
        for name, fn, xin, (k, threads), ctx in options:
            torch.set_num_threads(threads)
            rate = bare_forward_streams(fn, xin, args.trial_reps, k, ctx=ctx or contextlib.nullcontext)
            trials[name] = max(trials[name], rate)
    torch.set_num_threads(per_stream)
    fig["lite2_trials_patches_per_s"] = trials
    peaks.append(matmul_gflops(mm))
    peak = max(peaks)
    for k, v in trials.items():
        print(f"  {k:<58s} {v:7.2f} patches/s  {v * gflop:6.1f} GFLOP/s  ({100 * v * gflop / peak:5.1f}% of matmul)")
    del plain, plain_cl, fused_nchw, frozen
    amp = _features._amp_dtype(torch.device("cpu"), "auto")
    used = (lambda: torch.autocast("cpu", dtype=amp)) if amp is not None else contextlib.nullcontext
    fig["features_dtype"] = str(amp or "float32").replace("torch.", "")
    print(f"features() default on this CPU: BatchNorm folded, channels_last, {st}, {fig['features_dtype']}")

    # -- features() against the bare forward before and after -------------
    bare_before = bare_forward_streams(enc, x, args.reps, streams, ctx=used)
    reset_peak_rss()
    rss0 = peak_rss_mb()
    t = time.perf_counter()
    stmorph.im.features(adata, "efficientnet_lite2", cache=False, progress=True, batch_size=args.batch_size)
    t_feat = time.perf_counter() - t
    rss_feat = peak_rss_mb()
    bare_after = bare_forward_streams(enc, x, args.reps, streams, ctx=used)
    peaks.append(matmul_gflops(mm))
    peak = max(peaks)
    f = adata.obsm["X_image"]
    assert f.shape == (adata.n_obs, 1280) and np.isfinite(f).all()
    feat_rate = adata.n_obs / t_feat
    bare = (bare_before + bare_after) / 2
    fig.update(lite2_features_patches_per_s=feat_rate, lite2_features_seconds=t_feat, lite2_bare_before=bare_before,
               lite2_bare_after=bare_after, lite2_features_over_bare=feat_rate / bare,
               lite2_gflops=bare * gflop, lite2_gflops_frac_of_matmul=bare * gflop / peak, peak_rss_mb_features=rss_feat,
               rss_mb_before_features=rss0)
    print(f"\nfeatures(efficientnet_lite2) on {adata.n_obs} spots: {t_feat:.1f} s = {feat_rate:.2f} patches/s "
          f"(whole call: JPEG decode, crop, resize, normalise, forward); peak RSS {rss_feat:.0f} MB "
          f"(+{rss_feat - rss0:.0f} MB over the {rss0:.0f} MB before the call)")
    print(f"bare forward on pre-made tensors ({st}, same batch and dtype): {bare_before:.2f} (before) / "
          f"{bare_after:.2f} (after) patches/s")
    print(f"BAR features / bare forward = {feat_rate / bare:.3f}  (target >= 0.85)")
    print(f"BAR encoder {bare * gflop:.1f} GFLOP/s = {100 * bare * gflop / peak:.1f}% of the float32 matmul peak "
          f"{peak:.1f} GFLOP/s")

    # -- naive loop ----------------------------------------------------------
    naive_model = efficientnet_lite.load_efficientnet_lite2(fuse=False).to(memory_format=torch.contiguous_format)
    torch.set_num_threads(cores)  # a naive script runs torch's defaults: all cores, float32
    naive = naive_loop(args.image, adata.obsm["spatial"][: args.naive_spots], size, naive_model, 260, 127.0, 128.0)
    torch.set_num_threads(per_stream)
    fig.update(naive_patches_per_s=naive, features_over_naive=feat_rate / naive)
    print(f"BAR naive loop (JPEG file per patch, one image per predict, {args.naive_spots} spots): {naive:.2f} patches/s;"
          f" features() is {feat_rate / naive:.2f}x faster")
    del naive_model

    # -- resnet50 --------------------------------------------------------------
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        wpath = Path(tmp) / "resnet50_random.pth"
        torch.save(resnet.ResNet50(include_top=True).state_dict(), wpath)
        renc = stmorph.im.get_encoder("resnet50", weights=wpath)
        rgflop = encoder_flops(renc.model, renc.input_size) / 1e9
        sub = adata[: args.resnet_spots].copy()
        reset_peak_rss()
        rss0_r = peak_rss_mb()
        t = time.perf_counter()
        stmorph.im.features(sub, renc, cache=False, progress=True, batch_size=args.batch_size)
        r_rate = sub.n_obs / (time.perf_counter() - t)
        rss_r = peak_rss_mb()
        slide = stmorph.im.slide_for(sub)
        rb = next(iter(stmorph.im.iter_patches(slide, sub.obsm["spatial"][: args.batch_size], size,
                                                out_size=renc.input_size, batch_size=args.batch_size)))
        slide.close()
        r_bare = bare_forward_streams(renc, renc.preprocess(rb.patches), max(1, args.reps // 2), streams, ctx=used)
    assert sub.obsm["X_image"].shape == (sub.n_obs, 2048)
    fig.update(resnet50_gflop_per_image=rgflop, resnet50_features_patches_per_s=r_rate, resnet50_bare=r_bare,
               resnet50_gflops=r_bare * rgflop, peak_rss_mb_resnet50=rss_r)
    print(f"\nresnet50 ({rgflop:.2f} GFLOP/image at 224 px): features() {r_rate:.2f} patches/s on {sub.n_obs} spots, "
          f"bare {r_bare:.2f} patches/s = {r_bare * rgflop:.1f} GFLOP/s ({100 * r_bare * rgflop / peak:.1f}% of matmul); "
          f"peak RSS {rss_r:.0f} MB (+{rss_r - rss0_r:.0f} MB)")
    peaks.append(matmul_gflops(mm))
    bf16_peak = matmul_gflops(mm, dtype=torch.bfloat16) if has_bf16 else float("nan")
    fig.update(matmul_gflops_all=peaks, matmul_gflops=max(peaks), matmul_bf16_gflops=bf16_peak,
               load_avg_end=os.getloadavg()[0])
    if has_bf16:
        print(f"bf16 matmul {mm}^3 (the bf16 peak the bf16 encoder runs against): {bf16_peak:.1f} GFLOP/s; "
              f"efficientnet_lite2 reaches {100 * bare * gflop / bf16_peak:.1f}% of it, "
              f"resnet50 {100 * r_bare * rgflop / bf16_peak:.1f}%")
    print(f"float32 matmul measurements over the run: {', '.join(f'{p:.1f}' for p in peaks)} GFLOP/s; "
          f"load average at the end {os.getloadavg()[0]:.1f} on {cores} cores")
    fig["peak_rss_mb_process"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\nSUMMARY patches/s: efficientnet_lite2 {feat_rate:.2f}, resnet50 {r_rate:.2f}; "
          f"process peak RSS {fig['peak_rss_mb_process']:.0f} MB")
    print("JSON " + json.dumps(fig, default=float))
    if args.json:
        args.json.write_text(json.dumps(fig, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
