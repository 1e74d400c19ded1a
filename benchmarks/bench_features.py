"""Speed and memory of stmorph.im.features on a real whole-slide JPEG.

Measures, in one run (ratios within one run are what count on a shared machine),
each figure printed beside the CPU's relevant instruction sets and the
float32 matmul peak measured in the same run:

- today's path kept as the baseline -- PyTorch eager float32 (BatchNorm folded,
  channels_last, 2 streams x 1 thread: ``features(backend="torch",
  precision="float32")``) -- against the default path on this CPU
  (``backend="auto"``: ONNX Runtime float32 where installed and the CPU runs
  float32), whole ``features()`` calls in interleaved rounds, with the cosine
  between their features; and the opt-in ``precision="int8"``;
- the default path's ``features()`` against its bare forward on pre-made
  batches (the compute bound; bar >= 0.85);
- bare-forward throughput of each inference option on the same batch;
- a naive loop like the stMIC notebook's (crop -> JPEG file -> read back ->
  resize -> predict one image at a time);
- resnet50 and ViT-L/16 (UNI's layout) with random weights (speed does not
  depend on the values), peak RSS.

Usage (from the repository root)::

    .venv/bin/python benchmarks/bench_features.py            # full run, 2025 spots
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


CPU_FLAGS = ("sse4_2", "fma", "avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8",
             "avx512_fp16")


def cpu_summary() -> tuple[str, list[str]]:
    """CPU model name and which of the instruction sets that matter for inference it has."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"model name\s*:\s*(.+)", text)
    flags = set(re.search(r"^flags\s*:\s*(.+)$", text, re.M).group(1).split()) if "flags" in text else set()
    return (model.group(1).strip() if model else "unknown CPU"), [f for f in CPU_FLAGS if f in flags]


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--image", type=Path, default=IMAGE)
    ap.add_argument("--n-spots", type=int, default=2025)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--reps", type=int, default=4, help="batches timed per bare-forward measurement")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds of baseline/default features() calls")
    ap.add_argument("--naive-spots", type=int, default=48)
    ap.add_argument("--resnet-spots", type=int, default=256)
    ap.add_argument("--vit-batch", type=int, default=8)
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
    from stmorph.im import _features, _onnx
    from stmorph.im.encoders import efficientnet_lite, resnet, vit

    cores = _features.n_cores()
    torch.set_num_threads(cores)
    cpu, flags = cpu_summary()
    has_bf16 = "avx512_bf16" in flags or "amx_bf16" in flags
    mm = 1024 if args.quick else 4096
    peaks = [matmul_gflops(mm)]

    def tag() -> str:  # printed beside every figure
        return f"  [CPU: {' '.join(flags) or 'none of ' + '/'.join(CPU_FLAGS)}; fp32 matmul peak {max(peaks):.0f} GFLOP/s]"

    ort_version = __import__("onnxruntime").__version__ if _onnx.available() else "not installed"
    fig: dict = {"cpu": cpu, "cpu_flags": flags, "cores": cores, "torch": torch.__version__, "onnxruntime": ort_version,
                 "load_avg_start": os.getloadavg()[0], "batch_size": args.batch_size}
    print(f"# stmorph features benchmark: {args.image.name}; {cpu}, {cores} cores; torch {torch.__version__}, "
          f"onnxruntime {ort_version}; load average {os.getloadavg()[0]:.1f}")
    print(f"# CPU instruction sets: {', '.join(flags)}; bf16 instructions: {has_bf16}")
    print(f"# float32 matmul {mm}^3 (all cores): {peaks[0]:.1f} GFLOP/s (re-measured during the run; best = peak)")

    adata, (w, h), pitch = make_adata(args.n_spots, args.image)
    size = stmorph.im.patch_size_px(adata, "spot")
    print(f"image {w} x {h}, {adata.n_obs} spots on a dense grid (pitch {pitch:.0f} px), patch {size} px")
    fig.update(n_spots=adata.n_obs, image_wh=[w, h], patch_px=size)

    enc = stmorph.im.get_encoder("efficientnet_lite2")
    gflop = encoder_flops(enc.model, enc.input_size) / 1e9
    fig["lite2_gflop_per_image"] = gflop
    slide = stmorph.im.slide_for(adata)
    first = next(iter(stmorph.im.iter_patches(slide, adata.obsm["spatial"][: args.batch_size], size,
                                               out_size=enc.input_size, batch_size=args.batch_size)))
    slide.close()
    x = enc.preprocess(first.patches)  # (B, 3, 260, 260) channels_last
    cpu_dev = torch.device("cpu")
    streams, per_stream = _features.plan_threads(cpu_dev)
    default_backend = _features.resolve_backend(cpu_dev, "auto", "auto")
    amp = _features._amp_dtype(cpu_dev, "auto")
    default_dtype = str(amp or "float32").replace("torch.", "")
    st = f"{streams} streams x {per_stream} thread"
    print(f"features() default on this CPU: backend={default_backend}, {default_dtype}, {st}")
    fig.update(default_backend=default_backend, default_dtype=default_dtype, streams=[streams, per_stream])

    # -- bare forward of each inference option, same batch, interleaved rounds --
    torch.set_num_threads(per_stream)
    with torch.inference_mode():
        ref_batch = enc(x).numpy()
    options = {f"torch eager float32, {st} (today's path)": (enc, contextlib.nullcontext)}
    if has_bf16:
        options[f"torch eager bf16 autocast, {st}"] = (enc, lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    if _onnx.available():
        options[f"onnxruntime float32, {st}"] = (_onnx.OrtRunner(enc, threads=per_stream), contextlib.nullcontext)
        calib = _features._calibration(stmorph.im.slide_for(adata), adata.obsm["spatial"], size, enc)
        options[f"onnxruntime int8 (high-res layers fp32), {st}"] = (
            _onnx.OrtRunner(enc, threads=per_stream, precision="int8", calib=calib), contextlib.nullcontext)
    trials = {k: 0.0 for k in options}
    agree = {}
    for _ in range(args.rounds):
        for name, (fn, ctx) in options.items():
            trials[name] = max(trials[name], bare_forward_streams(fn, x, max(1, args.reps // 2), streams, ctx=ctx))
    for name, (fn, ctx) in options.items():
        with torch.inference_mode(), ctx():
            agree[name] = float(cosine_rows(fn(x).float().numpy(), ref_batch).min())
    peaks.append(matmul_gflops(mm))
    print(f"\nefficientnet_lite2 ({gflop:.2f} GFLOP/image at {enc.input_size} px), bare forward on one batch of "
          f"{args.batch_size} real patches (best of {args.rounds} interleaved rounds):")
    for k, v in trials.items():
        print(f"  {k:<52s} {v:7.2f} patches/s = {v * gflop:6.1f} GFLOP/s ({100 * v * gflop / max(peaks):5.1f}% of "
              f"matmul); min cosine to float32 {agree[k]:.4f}{tag()}")
    fig.update(lite2_bare_options_patches_per_s=trials, lite2_bare_options_min_cosine=agree)

    # -- features(): today's path (baseline) vs the default, interleaved, whole calls --
    runs = {"baseline": dict(backend="torch", precision="float32"), "default": dict(backend="auto", precision="auto")}
    rates: dict[str, list[float]] = {k: [] for k in runs}
    feats: dict[str, np.ndarray] = {}
    reset_peak_rss()
    rss0 = peak_rss_mb()
    for _ in range(args.rounds):
        for k, kw in runs.items():
            t = time.perf_counter()
            stmorph.im.features(adata, "efficientnet_lite2", cache=False, progress=False, batch_size=args.batch_size,
                                key_added=f"X_{k}", **kw)
            rates[k].append(adata.n_obs / (time.perf_counter() - t))
            feats[k] = adata.obsm[f"X_{k}"]
    rss_feat = peak_rss_mb()
    peaks.append(matmul_gflops(mm))
    base, new = max(rates["baseline"]), max(rates["default"])
    cos = cosine_rows(feats["default"], feats["baseline"])
    assert feats["default"].shape == (adata.n_obs, 1280) and np.isfinite(feats["default"]).all()
    print(f"\nfeatures(efficientnet_lite2) on {adata.n_obs} spots, whole call (JPEG decode, crop, resize, normalise, "
          f"forward), best of {args.rounds} interleaved rounds:")
    print(f"  baseline (today's path: torch float32, {st}): {base:.2f} patches/s "
          f"(rounds: {', '.join(f'{r:.1f}' for r in rates['baseline'])}){tag()}")
    print(f"  default ({default_backend}, {default_dtype}, {st}): {new:.2f} patches/s "
          f"(rounds: {', '.join(f'{r:.1f}' for r in rates['default'])}){tag()}")
    print(f"BAR default / baseline = {new / base:.2f}x (target >= 2) at cosine min {cos.min():.6f} "
          f"mean {cos.mean():.6f} (target >= 0.99){tag()}")
    fig.update(features_baseline_patches_per_s=rates["baseline"], features_default_patches_per_s=rates["default"],
               features_speedup=new / base, features_cosine_min=float(cos.min()), features_cosine_mean=float(cos.mean()),
               peak_rss_mb_features=rss_feat, rss_mb_before_features=rss0)

    # the default path's compute bound: its bare forward on pre-made batches, before and after
    if default_backend == "onnxruntime":
        fn, ctx = _onnx.OrtRunner(enc, threads=per_stream), contextlib.nullcontext
    else:
        fn, ctx = enc, ((lambda: torch.autocast("cpu", dtype=amp)) if amp is not None else contextlib.nullcontext)
    bare = bare_forward_streams(fn, x, args.reps, streams, ctx=ctx)
    t = time.perf_counter()
    stmorph.im.features(adata, "efficientnet_lite2", cache=False, progress=False, batch_size=args.batch_size,
                        key_added="X_default2")
    feat_rate = adata.n_obs / (time.perf_counter() - t)
    bare = (bare + bare_forward_streams(fn, x, args.reps, streams, ctx=ctx)) / 2
    print(f"BAR default features / its bare forward = {feat_rate:.2f} / {bare:.2f} = {feat_rate / bare:.3f} "
          f"(target >= 0.85){tag()}")
    fig.update(default_features_patches_per_s=feat_rate, default_bare_patches_per_s=bare,
               default_features_over_bare=feat_rate / bare)

    if _onnx.available():  # opt-in int8: whole call including its calibration
        t = time.perf_counter()
        stmorph.im.features(adata, "efficientnet_lite2", cache=False, progress=False, batch_size=args.batch_size,
                            key_added="X_int8", precision="int8")
        q_rate = adata.n_obs / (time.perf_counter() - t)
        qc = cosine_rows(adata.obsm["X_int8"], feats["baseline"])
        print(f"  precision='int8' (opt-in; includes calibration on 64 patches): {q_rate:.2f} patches/s = "
              f"{q_rate / base:.2f}x baseline, cosine to float32 min {qc.min():.4f} mean {qc.mean():.4f}{tag()}")
        fig.update(int8_features_patches_per_s=q_rate, int8_cosine_min=float(qc.min()), int8_cosine_mean=float(qc.mean()))

    # -- naive loop ----------------------------------------------------------
    naive_model = efficientnet_lite.load_efficientnet_lite2(fuse=False).to(memory_format=torch.contiguous_format)
    torch.set_num_threads(cores)  # a naive script runs torch's defaults: all cores, float32
    naive = naive_loop(args.image, adata.obsm["spatial"][: args.naive_spots], size, naive_model, 260, 127.0, 128.0)
    torch.set_num_threads(per_stream)
    fig.update(naive_patches_per_s=naive, features_over_naive=new / naive)
    print(f"\nnaive loop (JPEG file per patch, one image per predict, {args.naive_spots} spots): {naive:.2f} patches/s; "
          f"features() default is {new / naive:.2f}x faster{tag()}")
    del naive_model

    # -- resnet50 (random weights) --------------------------------------------------
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        wpath = Path(tmp) / "resnet50_random.pth"
        torch.save(resnet.ResNet50(include_top=True).state_dict(), wpath)
        renc = stmorph.im.get_encoder("resnet50", weights=wpath)
        rgflop = encoder_flops(renc.model, renc.input_size) / 1e9
        sub = adata[: args.resnet_spots].copy()
        t = time.perf_counter()
        stmorph.im.features(sub, renc, cache=False, progress=False, batch_size=args.batch_size)
        r_rate = sub.n_obs / (time.perf_counter() - t)
    assert sub.obsm["X_image"].shape == (sub.n_obs, 2048)
    fig.update(resnet50_gflop_per_image=rgflop, resnet50_features_patches_per_s=r_rate)
    print(f"resnet50 ({rgflop:.2f} GFLOP/image at 224 px), features() default: {r_rate:.2f} patches/s on "
          f"{sub.n_obs} spots = {r_rate * rgflop:.1f} GFLOP/s{tag()}")

    # -- ViT-L/16 (UNI's layout, random weights): bare forward ------------------------
    torch.manual_seed(0)
    vcfg = vit.PRESETS["uni"].cfg
    vmodel = vit.VisionTransformer(vcfg).eval()
    vgflop = encoder_flops(vmodel, vcfg.img_size) / 1e9
    xv = torch.randn(args.vit_batch, 3, vcfg.img_size, vcfg.img_size)
    torch.set_num_threads(cores)
    v_rate = bare_forward(vmodel, xv, max(1, args.reps // 2))
    line = (f"ViT-L/16 (uni layout, {vgflop:.1f} GFLOP/image in linear layers at 224 px), bare forward batch "
            f"{args.vit_batch}, torch float32, 1 stream x {cores} threads: {v_rate:.2f} patches/s = "
            f"{v_rate * vgflop:.0f} GFLOP/s ({100 * v_rate * vgflop / max(peaks):.0f}% of matmul)")
    fig.update(vit_l16_gflop_per_image=vgflop, vit_l16_torch_fp32_patches_per_s=v_rate)
    if has_bf16:
        v_bf = bare_forward(vmodel, xv, max(1, args.reps // 2), ctx=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
        line += f"; bf16 autocast {v_bf:.2f} patches/s"
        fig["vit_l16_torch_bf16_patches_per_s"] = v_bf
    print(line + tag())
    torch.set_num_threads(per_stream)
    del vmodel

    peaks.append(matmul_gflops(mm))
    fig.update(matmul_gflops_all=peaks, matmul_gflops=max(peaks), load_avg_end=os.getloadavg()[0],
               peak_rss_mb_process=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(f"\nfloat32 matmul over the run: {', '.join(f'{p:.1f}' for p in peaks)} GFLOP/s; load average at the end "
          f"{os.getloadavg()[0]:.1f} on {cores} cores; process peak RSS {fig['peak_rss_mb_process']:.0f} MB")
    print(f"SUMMARY patches/s: efficientnet_lite2 baseline {base:.2f}, default {new:.2f} ({new / base:.2f}x, cosine "
          f"min {cos.min():.4f}); resnet50 {r_rate:.2f}; ViT-L/16 bare {v_rate:.2f}{tag()}")
    print("JSON " + json.dumps(fig, default=float))
    if args.json:
        args.json.write_text(json.dumps(fig, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
