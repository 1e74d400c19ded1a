"""Where and how the encoder runs: the device, the precision (bf16 autocast, float32, int8), the backend
(PyTorch or ONNX Runtime) and the CPU threads. Shared by the per-spot patch path (:mod:`._features`) and
the dense path (:mod:`._dense`).
"""

from __future__ import annotations

import os

from ..errors import DependencyError, InputError


def n_cores() -> int:
    """CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _resolve_device(device: str):
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        msg = f"device={device!r} is not a torch device; use 'auto', 'cpu' or 'cuda[:i]'."
        raise InputError(msg) from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        msg = "device='cuda' was requested but torch sees no CUDA GPU; use device='auto' or 'cpu'."
        raise InputError(msg)
    return dev


def cpu_has_native_bf16() -> bool:
    """True when the CPU has bfloat16 instructions (AVX512-BF16 or AMX), where bf16 autocast pays off."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:  # pragma: no cover - not Linux
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


PRECISIONS = ("auto", "float32", "bfloat16", "float16", "int8")
BACKENDS = ("auto", "torch", "onnxruntime")


def _amp_dtype(dev, precision: str = "auto"):
    """Autocast dtype, or None for plain float32.

    ``"auto"``: bf16 (else fp16) on CUDA; bf16 on CPUs with native bf16
    instructions (about 2x faster there); float32 otherwise.
    """
    import torch

    if precision not in PRECISIONS:
        msg = f"precision must be one of {PRECISIONS}; got {precision!r}."
        raise InputError(msg)
    if precision in ("float32", "int8"):  # int8 is ONNX Runtime's (see resolve_backend)
        return None
    if precision == "auto":
        if dev.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_native_bf16() else None
    if precision == "float16" and dev.type != "cuda":
        msg = "precision='float16' needs a CUDA device; use 'bfloat16' or 'float32' on CPU."
        raise InputError(msg)
    return getattr(torch, precision)


def resolve_backend(dev, backend: str, precision: str) -> str:
    """``"torch"`` or ``"onnxruntime"``.

    ``"auto"``: ONNX Runtime on CPU when it is installed and inference would
    run in float32 (no bf16 instructions, or ``precision="float32"``/``"int8"``):
    its fused kernels ran the forward 2.1x faster there (BENCHMARKS.md section 3b);
    PyTorch otherwise (CUDA; bf16 autocast on CPUs with bf16).
    """
    from . import _onnx

    if backend not in BACKENDS:
        raise InputError(f"backend must be one of {BACKENDS}; got {backend!r}.")
    fp32 = precision in ("float32", "int8") or (precision == "auto" and not cpu_has_native_bf16())
    if backend == "auto":
        backend = "onnxruntime" if dev.type == "cpu" and fp32 and _onnx.available() else "torch"
    if backend == "onnxruntime":
        if dev.type != "cpu":
            raise InputError("backend='onnxruntime' runs on CPU only; use device='cpu' or backend='torch'.")
        if not fp32:
            raise InputError(f"backend='onnxruntime' runs float32 or int8, not precision={precision!r}.")
        if not _onnx.available():
            raise DependencyError("backend='onnxruntime' needs onnxruntime and onnx: pip install onnxruntime onnx")
    elif precision == "int8":
        raise InputError("precision='int8' needs the ONNX Runtime backend (pip install onnxruntime onnx) on CPU.")
    return backend


def plan_threads(dev, cores: int | None = None) -> tuple[int, int]:
    """(inference streams, torch threads per stream) for a device.

    On CPU the cores are split into independent streams of one or two threads,
    each running whole batches, rather than one forward pass spread over all
    cores: a batch-parallel stream never waits at an intra-op barrier, which
    matters most when the machine is shared (measured in
    ``benchmarks/bench_features.py``: 2 streams x 1 thread ran 1.5-2x faster than
    1 stream x 2 threads on a busy 2-core machine). CUDA: one stream.
    """
    if dev.type == "cuda":
        return 1, 1
    cores = cores or n_cores()
    streams = min(cores, 8)
    return streams, max(1, cores // streams)
