"""On-disk cache of image features, so re-clustering never recomputes them.

One ``<key>.npy`` file per (image, coordinates, patch size, encoder, weights,
input size, preprocessing); the key is the SHA-256 of those parts, so any
change to one of them is a cache miss, never a stale hit. An image file is
identified by its content (:func:`file_fingerprint`), not its modification time. Files are written
atomically (temporary file in the same folder, then ``os.replace``). A cache
that cannot be written, or a damaged entry, gives a warning, never an error:
the features are computed (again) and the run goes on.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
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


#: Files up to this size are hashed whole for their identity; larger ones by :func:`file_fingerprint`'s sample.
WHOLE_FILE_HASH_BYTES = 256 * 2**20
_SAMPLE_BLOCKS = 256
_SAMPLE_BLOCK = 4096
_EDGE = 2**20
_FINGERPRINTS: dict[tuple, str] = {}


def file_fingerprint(path: str | os.PathLike) -> str:
    """A hash of a file's content: SHA-256 of the whole file up to :data:`WHOLE_FILE_HASH_BYTES`; of a larger
    one, SHA-256 of its first and last MiB (the header, a TIFF's tile offsets and byte counts) and of 256
    blocks spread evenly through it, plus its change time (``st_ctime_ns``, which every write moves and no
    tool sets back), since a sample can miss an edit. Remembered per process while size and times stay."""
    path = os.path.abspath(os.fspath(path))
    st = os.stat(path)
    memo = (path, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if memo in _FINGERPRINTS:
        return _FINGERPRINTS[memo]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if st.st_size <= WHOLE_FILE_HASH_BYTES:
            for chunk in iter(lambda: f.read(2**20), b""):
                h.update(chunk)
            kind = "sha256"
        else:
            h.update(f.read(_EDGE))
            step = (st.st_size - 2 * _EDGE) // (_SAMPLE_BLOCKS + 1)
            for k in range(1, _SAMPLE_BLOCKS + 1):
                f.seek(_EDGE + k * step)
                h.update(f.read(_SAMPLE_BLOCK))
            f.seek(st.st_size - _EDGE)
            h.update(f.read(_EDGE))
            kind = f"sample-sha256-ctime{st.st_ctime_ns}"
    _FINGERPRINTS[memo] = digest = f"{kind}:{h.hexdigest()}"
    return digest


def image_identity(path: str | os.PathLike | None = None, array: np.ndarray | None = None) -> str:
    """Identity of an image: absolute path, size and content (:func:`file_fingerprint`) of a file, so an edit
    in place that keeps the size and modification time is a cache miss; or the hash of an in-memory array."""
    if path is not None:
        path = os.path.abspath(os.fspath(path))
        st = os.stat(path)
        if os.path.isdir(path):  # an image stored as a folder (OME-Zarr): its entries' sizes and times
            parts = sorted((os.path.relpath(os.path.join(d, n), path), os.stat(os.path.join(d, n)).st_size,
                            os.stat(os.path.join(d, n)).st_mtime_ns) for d, _, names in os.walk(path) for n in names)
            return f"file:{path}|{st.st_size}|tree:{hashlib.sha256(repr(parts).encode()).hexdigest()}"
        return f"file:{path}|{st.st_size}|{file_fingerprint(path)}"
    if array is not None:
        return f"array:{array_sha256(array)}"
    msg = "image_identity needs a path or an array"
    raise ValueError(msg)


def slide_identity(slide) -> str:
    """:func:`image_identity` of a :class:`~stmorph.im.Slide`: its file, or the RGB pixels of an in-memory image
    (the pixels the patches are cut from)."""
    if slide.path:
        return image_identity(path=slide.path)
    return image_identity(array=slide.read_region(0, 0, slide.width, slide.height))


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
    h.update(b"stmorph-features-v2\0")
    h.update(image.encode() + b"\0")
    h.update(array_sha256(np.asarray(xy, dtype=np.float64)).encode() + b"\0")
    h.update(str(int(patch_size_px)).encode() + b"\0")
    h.update(json.dumps(encoder, sort_keys=True).encode())
    return h.hexdigest()


def _discard(path: Path, why: str) -> None:
    warnings.warn(f"feature cache entry {path} {why}; discarded, the features are computed again.", stacklevel=3)
    with contextlib.suppress(OSError):
        if path.is_file() and not path.is_symlink():
            path.unlink()


def load(cache_dir: str | os.PathLike, key: str, shape: tuple[int, int]) -> np.ndarray | None:
    """The cached float32 features, or None when absent.

    An entry that cannot be read, is truncated, has the wrong shape or dtype, or holds non-finite
    values is discarded with a warning (None: the caller recomputes); a cache never stops a run.
    """
    path = Path(cache_dir) / f"{key}.npy"
    try:
        if not path.exists():
            return None
        if not path.is_file():
            warnings.warn(f"feature cache entry {path} is not a file; ignored.", stacklevel=2)
            return None
        arr = np.load(path, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - a damaged cache file must never stop a run
        _discard(path, f"cannot be read ({type(exc).__name__}: {' '.join(str(exc).split()) or 'empty'})")
        return None
    if not isinstance(arr, np.ndarray) or arr.dtype != np.float32 or arr.shape != tuple(shape):
        _discard(path, f"holds {getattr(arr, 'dtype', '?')} {getattr(arr, 'shape', '?')}, not float32 {tuple(shape)}")
        return None
    if not np.isfinite(arr).all():
        _discard(path, f"holds {int(np.count_nonzero(~np.isfinite(arr)))} non-finite value(s)")
        return None
    return arr


def save(cache_dir: str | os.PathLike, key: str, arr: np.ndarray) -> Path | None:
    """Write ``arr`` as ``<cache_dir>/<key>.npy`` atomically; returns the path.

    A cache that cannot be written (read-only, full, not a folder) gives a warning and None: the
    features already computed are used all the same.
    """
    cache_dir = Path(cache_dir)
    path = cache_dir / f"{key}.npy"
    data = np.ascontiguousarray(arr, dtype=np.float32)

    def write(tmp):
        with open(tmp, "wb") as f:
            np.save(f, data, allow_pickle=False)

    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(path, write)
    except OSError as exc:
        warnings.warn(f"feature cache {cache_dir} cannot be written ({exc.strerror or exc}); the features are not "
                      f"cached (set ${ENV_VAR} to a writable folder).", stacklevel=2)
        return None
    return path
