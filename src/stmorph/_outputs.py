"""Writing a run's outputs safely: atomic folders and files, h5ad-safe metadata, provenance.

Nothing the user had is overwritten or lost: an output folder is built next to
its destination under a temporary name and renamed into place only when
complete; an existing destination is replaced only with ``force=True``, and
then only after the new one is complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .errors import OutputExistsError

_PACKAGES = ("stmorph", "numpy", "scipy", "pandas", "anndata", "scanpy", "scikit-learn", "igraph",
             "leidenalg", "torch", "tifffile", "zarr", "pillow", "matplotlib", "gseapy")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _public_modes(root: Path) -> None:
    """Give a finished output the permissions of a normally created one (mkdtemp/mkstemp use 0700/0600)."""
    mask = _umask()
    for dirpath, _, files in os.walk(root):
        os.chmod(dirpath, 0o777 & ~mask)
        for f in files:
            os.chmod(os.path.join(dirpath, f), 0o666 & ~mask)


def check_writable(path: str | os.PathLike, *, force: bool) -> Path:
    """Fail early, before any work, when ``path`` exists and ``force`` is not set."""
    path = Path(path)
    if path.exists() and not force:
        msg = f"{path} already exists; choose another output or pass --force (force=True) to replace it."
        raise OutputExistsError(msg)
    if path.exists() and not path.is_dir():
        msg = f"{path} exists and is not a folder; refusing to replace a file with a folder."
        raise OutputExistsError(msg)
    return path


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, force: bool = False) -> Iterator[Path]:
    """Build a folder under a temporary name beside ``path``; rename it into place on success.

    On error the temporary folder is removed and ``path`` is left as it was.
    """
    path = check_writable(path, force=force).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _public_modes(tmp)
    old = None
    if path.exists():
        check_writable(path, force=force)
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
        os.replace(path, old / "previous")
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Call ``write(tmp_path)`` then rename the temporary file to ``path`` (same folder)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def h5ad_safe(obj: Any) -> Any:
    """A copy of ``obj`` that anndata can write: None -> "None", tuples -> lists, paths -> str."""
    if isinstance(obj, Mapping):
        return {str(k): h5ad_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [h5ad_safe(v) for v in obj]
        if items and all(isinstance(v, (int, float, np.number)) and not isinstance(v, bool) for v in items):
            return np.asarray(items)
        if all(isinstance(v, str) for v in items):
            return np.asarray(items, dtype=object) if items else np.asarray([], dtype=str)
        return {str(i): v for i, v in enumerate(items)}
    if obj is None:
        return "None"
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def write_h5ad(adata, path: str | os.PathLike) -> Path:
    """Write ``adata`` atomically; in-memory full-resolution images are not stored."""
    out = adata.copy()
    uns = dict(out.uns)
    if isinstance(uns.get("spatial"), Mapping):
        spatial = {}
        for lib, d in uns["spatial"].items():
            d = dict(d)
            if isinstance(d.get("images"), Mapping):
                d["images"] = {k: v for k, v in d["images"].items() if k != "fullres"}
            spatial[lib] = d
        uns["spatial"] = spatial
    out.uns = h5ad_safe(uns)
    return atomic_write(path, lambda p: out.write_h5ad(p, compression="gzip"))


def write_domains_csv(adata, keys: Sequence[str], path: str | os.PathLike) -> Path:
    """``barcode`` plus one column per method."""
    table = pd.DataFrame({k: adata.obs[k].astype(str).to_numpy() for k in keys}, index=adata.obs_names)
    table.index.name = "barcode"
    return atomic_write(path, lambda p: table.to_csv(p))


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            continue
    return out


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return str(obj)


def write_json(data: Mapping, path: str | os.PathLike) -> Path:
    text = json.dumps(data, indent=2, default=_json_default, sort_keys=False)
    return atomic_write(path, lambda p: Path(p).write_text(text + "\n"))


def write_run_outputs(
    adata,
    out: str | os.PathLike,
    methods: Sequence[str],
    run_info: Mapping[str, Any],
    *,
    plot: bool = True,
) -> dict[str, Path]:
    """Write a run's outputs into the (temporary) folder ``out``.

    ``result.h5ad``, ``domains.csv`` (barcode + one column per method),
    ``spatial_domains.png`` (the methods side by side over the H&E) and
    ``run.json`` (``run_info`` plus package versions).
    """
    out = Path(out)
    files = {"result": write_h5ad(adata, out / "result.h5ad"),
             "domains": write_domains_csv(adata, methods, out / "domains.csv")}
    if plot and methods:
        from . import pl

        keys = list(methods)
        if "annotation" in adata.obs and adata.obs["annotation"].notna().any():
            keys = ["annotation", *keys]
        fig = pl.domains(adata, keys)
        files["spatial_domains"] = atomic_write(
            out / "spatial_domains.png", lambda p: fig.savefig(p, dpi=150, bbox_inches="tight", format="png")
        )
        import matplotlib.pyplot as plt

        plt.close(fig)
    info = dict(run_info)
    info["packages"] = package_versions()
    info["outputs"] = sorted(p.name for p in files.values()) + ["run.json"]
    files["run"] = write_json(info, out / "run.json")
    return files
