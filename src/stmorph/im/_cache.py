"""On-disk cache of image features, so re-clustering never recomputes them.

One ``<key>.npy`` file per (image, coordinates, patch size, encoder, weights,
input size, preprocessing); the key is the SHA-256 of those parts, so any
change to one of them is a cache miss, never a stale hit. Files are written
atomically (temporary file in the same folder, then ``os.replace``).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from .._outputs import atomic_write

ENV_VAR = "STMORPH_CACHE_DIR"


def default_dir() -> Path:
    """``$STMORPH_CACHE_DIR`` or ``~/.cache/stmorph/features``."""
    env = os.environ.get(ENV_VAR)
    return Path(env).expanduser() if env else Path("~/.cache/stmorph/features").expanduser()


def array_sha256(a: np.ndarray) -> str:
    """SHA-256 of an array's shape, dtype and bytes."""
    a = np.ascontiguousarray(a)
    h = hashlib.sha256(f"{a.shape}|{a.dtype.str}|".encode())
    h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def image_identity(path: str | os.PathLike | None = None, array: np.ndarray | None = None) -> str:
    """Identity of an image: absolute path, size and mtime of a file; or the hash of an in-memory array."""
    if path is not None:
        path = os.path.abspath(os.fspath(path))
        st = os.stat(path)
        return f"file:{path}|{st.st_size}|{st.st_mtime_ns}"
    if array is not None:
        return f"array:{array_sha256(array)}"
    msg = "image_identity needs a path or an array"
    raise ValueError(msg)


def module_sha256(model) -> str:
    """SHA-256 of a torch module's state dict (names, shapes, dtypes, values), for custom encoders."""
    import torch

    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        t = t.detach().cpu().contiguous().reshape(-1)
        if t.numel():
            h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def make_key(*, image: str, xy: np.ndarray, patch_size_px: int, encoder: dict[str, Any]) -> str:
    """Cache key: SHA-256 over the image identity, the coordinate bytes, the patch size and the encoder params."""
    h = hashlib.sha256()
    h.update(b"stmorph-features-v1\0")
    h.update(image.encode() + b"\0")
    h.update(array_sha256(np.asarray(xy, dtype=np.float64)).encode() + b"\0")
    h.update(str(int(patch_size_px)).encode() + b"\0")
    h.update(json.dumps(encoder, sort_keys=True).encode())
    return h.hexdigest()


def load(cache_dir: str | os.PathLike, key: str, shape: tuple[int, int]) -> np.ndarray | None:
    """The cached float32 features, or None when absent, unreadable or of the wrong shape."""
    path = Path(cache_dir) / f"{key}.npy"
    if not path.is_file():
        return None
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None
    if arr.dtype != np.float32 or arr.shape != tuple(shape):
        return None
    return arr


def save(cache_dir: str | os.PathLike, key: str, arr: np.ndarray) -> Path:
    """Write ``arr`` as ``<cache_dir>/<key>.npy`` atomically; returns the path."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"{key}.npy"
    data = np.ascontiguousarray(arr, dtype=np.float32)

    def write(tmp):
        with open(tmp, "wb") as f:
            np.save(f, data, allow_pickle=False)

    atomic_write(path, write)
    return path
