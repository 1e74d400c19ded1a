"""Writing a run's outputs safely: atomic folders and files, h5ad-safe metadata, provenance.

Nothing the user had is overwritten or lost: an output folder is built next to
its destination under a temporary name and renamed into place only when
complete; an existing destination is replaced only with ``force=True``, and
then only after the new one is complete.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import platform
import re
import shutil
import socket
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .errors import OutputError, OutputExistsError, StmorphError

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


#: Written by :func:`atomic_dir` into every folder stmorph builds: what it wrote there. ``--force``
#: replaces only a folder holding this marker (or the ``run.json`` of an older stmorph) and nothing else.
MARKER = ".stmorph"
#: What an older stmorph (before the marker) wrote into a ``run``/``demo`` folder besides run.json's outputs.
_LEGACY_NAMES = ("result.h5ad", "domains.csv", "spatial_domains.png", "report.html", "run.json", "input")


def stmorph_entries(folder: str | os.PathLike) -> set[str] | None:
    """Names stmorph wrote into ``folder`` (from its marker), or None when stmorph did not write it."""
    folder = Path(folder)
    try:
        info = json.loads((folder / MARKER).read_text(encoding="utf-8"))
        if isinstance(info, dict) and info.get("written_by") == "stmorph":
            return {str(n) for n in info.get("entries", [])} | {MARKER}
    except (OSError, ValueError, UnicodeDecodeError):
        pass
    try:  # an output folder of stmorph before the marker existed: its run.json
        info = json.loads((folder / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if isinstance(info, dict) and "stmorph_version" in info and isinstance(info.get("outputs"), list):
        return {str(n) for n in info["outputs"]} | set(_LEGACY_NAMES)
    return None


def record_entries(folder: str | os.PathLike, names: Sequence[str] | None = None) -> Path:
    """Write ``folder``'s marker: with ``names=None`` (a folder stmorph just built) everything in it,
    else what the marker already lists plus ``names`` (files stmorph added to its own folder)."""
    folder = Path(folder)
    if names is None:
        entries = {p.name for p in folder.iterdir()}
    else:
        entries = (stmorph_entries(folder) or set()) | set(names)
    entries = sorted(entries - {MARKER})
    from . import __version__

    data = {"written_by": "stmorph", "version": __version__, "entries": entries}
    return atomic_write(folder / MARKER, lambda p: Path(p).write_text(json.dumps(data, indent=1) + "\n"))


def _is_within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def _forms(path: str | os.PathLike) -> set[Path]:
    """``path`` as given (made absolute) and with every symbolic link resolved."""
    path = Path(path).expanduser()
    return {Path(os.path.abspath(path)), path.resolve()}


def overlapping_input(path: str | os.PathLike, inputs: Sequence[str | os.PathLike | None]) -> str | None:
    """The first of ``inputs`` that is ``path``, lies inside it or holds it (symbolic links followed), or None."""
    targets = _forms(path)
    for given in inputs:
        if given is None or str(given) == "":
            continue
        for i in _forms(given):
            if any(_is_within(i, t) or _is_within(t, i) for t in targets):
                return str(given)
    return None


def _protected(path: Path, inputs: Sequence[str | os.PathLike | None]) -> str | None:
    """Why ``path`` may never be replaced (the working directory, an ancestor of it, an input), or None."""
    targets = _forms(path)
    cwd = Path.cwd().resolve()
    for t in targets:
        if _is_within(cwd, t):
            return "is the working directory or one of its parents"
        if t == Path(t.anchor) or t == Path.home().resolve():
            return "is the home or root folder"
    for given in inputs:
        if given is None or str(given) == "":
            continue
        real = Path(given).expanduser()
        for i in {Path(os.path.abspath(real)), real.resolve()}:
            for t in targets:
                if _is_within(i, t):
                    return f"is or contains the input {given}"
    return None


def _check_creatable(path: Path) -> None:
    """``path`` (absent) can be created: its first existing parent is a folder this user may write in."""
    parent = Path(os.path.abspath(path)).parent
    while not (parent.exists() or parent.is_symlink()) and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        msg = f"cannot create {path}: {parent} is a file, not a folder."
        raise OutputError(msg)
    if not os.access(parent, os.W_OK | os.X_OK):
        msg = f"cannot create {path}: no permission to write in {parent}."
        raise OutputError(msg)


def _output_error(exc: OSError, path: Path) -> OutputError:
    where = f" ({exc.filename})" if exc.filename else ""
    return OutputError(f"cannot write {path}: {exc.strerror or exc}{where}.")


def check_writable(path: str | os.PathLike, *, force: bool, inputs: Sequence[str | os.PathLike | None] = ()) -> Path:
    """Fail early, before any work, when ``path`` exists and may not be replaced.

    An existing ``path`` is replaced only with ``force``, and only when stmorph wrote it (its marker)
    and it holds nothing else; never the working directory or a parent of it, the home folder, or a
    folder that is or contains one of ``inputs``.
    """
    if isinstance(path, str) and not path.strip():
        msg = "the output folder is an empty string (that would be the working directory); give a new folder name."
        raise OutputExistsError(msg)
    path = Path(path)
    if not (path.exists() or path.is_symlink()):
        _check_creatable(path)
        return path
    if not force:
        msg = f"{path} already exists; choose another output or pass --force (force=True) to replace it."
        raise OutputExistsError(msg)
    if not path.is_dir() or path.is_symlink():
        msg = f"{path} exists and is not a folder stmorph wrote; refusing to replace it, even with --force."
        raise OutputExistsError(msg)
    why = _protected(path, inputs)
    if why is not None:
        msg = f"{path} {why}; --force never replaces it: choose a new output folder."
        raise OutputExistsError(msg)
    entries = stmorph_entries(path)
    if entries is None:
        msg = (f"{path} was not written by stmorph (no {MARKER} marker or stmorph run.json); --force only replaces "
               "stmorph's own output folders: choose a new output folder.")
        raise OutputExistsError(msg)
    try:
        foreign = sorted(p.name for p in path.iterdir() if p.name not in entries)
    except OSError as exc:
        msg = f"{path} cannot be listed ({exc.strerror}); refusing to replace it."
        raise OutputExistsError(msg) from None
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        msg = (f"{path} holds files stmorph did not write ({shown}); --force does not delete them: move them "
               "out or choose a new output folder.")
        raise OutputExistsError(msg)
    return path


def _proc_stat(pid: int) -> list[str]:
    """Fields of ``/proc/<pid>/stat`` after the command name (Linux; empty when unknown): state first."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2:].split()
    except (OSError, ValueError):
        return []


def _proc_start(pid: int) -> str:
    """Start time of process ``pid`` in clock ticks since boot (Linux), "" when unknown."""
    fields = _proc_stat(pid)
    return fields[19] if len(fields) > 19 else ""


_HOST = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:24] or "host"
#: Wall-clock time this process started (Linux: from /proc; else when stmorph was imported).
_STARTED = time.time()
with contextlib.suppress(OSError, ValueError, IndexError, StopIteration):
    _btime = int(next(x for x in Path("/proc/stat").read_text().splitlines() if x.startswith("btime")).split()[1])
    _STARTED = _btime + int(_proc_start(os.getpid())) / os.sysconf("SC_CLK_TCK")
#: The name of a staging folder: ``.<name>.<kind>-<host>_<pid>_<ticks>-<random>``; every part is required.
_OWNER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<host>[A-Za-z0-9]+)_(?P<pid>\d+)_(?P<ticks>\d+)-"
                    r"[A-Za-z0-9_]+$")
#: Written by :func:`staging_dir` into every staging folder it makes: only a folder holding this file,
#: naming the folder it stages and its owner, may ever be removed by :func:`clean_stale`.
STAGING_MARKER = ".stmorph-staging"


def _owner_tag() -> str:
    return f"{_HOST}_{os.getpid()}_{_proc_start(os.getpid()) or 0}-"


def _staging_info(name: str, kind: str) -> dict:
    return {"written_by": "stmorph", "kind": kind, "for": name, "owner": _owner_tag().rstrip("-")}


def staging_dir(dest: str | os.PathLike, kind: str = "tmp", *, parent: str | os.PathLike | None = None) -> Path:
    """A new hidden staging folder for ``dest`` (``kind`` ``tmp``: being built; ``old``: the previous
    one moved aside), in ``parent`` (default: beside ``dest``), with this process in its name and
    :data:`STAGING_MARKER` inside, so that :func:`clean_stale` can tell it from anything else."""
    dest = Path(dest)
    folder = Path(tempfile.mkdtemp(prefix=f".{dest.name}.{kind}-{_owner_tag()}",
                                   dir=dest.parent if parent is None else parent))
    try:
        (folder / STAGING_MARKER).write_text(json.dumps(_staging_info(dest.name, kind)) + "\n", encoding="utf-8")
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder


def _is_staging(folder: Path, m: re.Match) -> bool:
    """``folder`` holds the staging marker that :func:`staging_dir` wrote for the name it carries."""
    try:
        info = json.loads((folder / STAGING_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    owner = f"{m['host']}_{m['pid']}_{m['ticks']}"
    return (isinstance(info, dict) and info.get("written_by") == "stmorph" and info.get("kind") == m["kind"]
            and info.get("for") == m["name"] and info.get("owner") == owner)


def _owner_alive(host: str, pid: str, ticks: str) -> bool:
    if host != _HOST:
        return True  # another machine's run (shared file system): cannot tell, so never touched
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        pass
    fields = _proc_stat(int(pid))
    if fields and fields[0] in ("Z", "X"):
        return False  # killed and not yet reaped (an orphan whose init does not reap): its run is over
    now = fields[19] if len(fields) > 19 else ""
    return ticks == "0" or not now or now == ticks


def clean_stale(path: str | os.PathLike) -> list[Path]:
    """Remove the staging folders that interrupted runs (SIGKILL, power loss) left beside ``path``.

    A folder is removed only when stmorph made it for ``path``: its name is
    ``.<path's name>.tmp-<host>_<pid>_<start>-*`` (or ``.old-``) with this machine as host, it holds the
    :data:`STAGING_MARKER` naming the same folder and owner, and that process is over. A leftover
    ``.old-`` folder (the previous output while being replaced) is removed only when ``path`` exists
    again; otherwise it holds the only copy and is left where it is, with a warning. Every removal is
    reported as a warning; anything else, whatever its name, is never touched.
    """
    path = Path(path)
    removed: list[Path] = []
    try:
        siblings = list(path.parent.iterdir())
    except OSError:
        return removed
    for d in siblings:
        m = _OWNER.match(d.name)
        if m is None or m["name"] != path.name or d.is_symlink() or not d.is_dir():
            continue
        try:
            if _owner_alive(m["host"], m["pid"], m["ticks"]) or not _is_staging(d, m):
                continue
        except OSError:
            continue
        if m["kind"] == "old" and not path.exists():
            warnings.warn(f"{d}/previous may hold the previous {path.name} of an interrupted run; left in place.",
                          stacklevel=3)
            continue
        shutil.rmtree(d, ignore_errors=True)
        if not d.exists():
            removed.append(d)
            warnings.warn(f"removed {d}: the staging folder of an interrupted stmorph run (process {m['pid']}, "
                          "now ended).", stacklevel=3)
    return removed


def _strand(tmp: Path, path: Path, why: str) -> OutputExistsError:
    """Give a finished result that cannot be put in place a visible name and say where it is."""
    kept = tmp  # a name clean_stale would take for an interrupted run's: renamed when at all possible
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for i in range(100):
        cand = path.with_name(f"{path.name}.stmorph-{stamp}" + (f"-{i}" if i else ""))
        if cand.exists() or cand.is_symlink():
            continue
        with contextlib.suppress(OSError):
            os.rename(tmp, cand)
            kept = cand
        break
    return OutputExistsError(f"{path} {why}; the finished results are kept in {kept}: move them where you want them.")


def _remove_empty(folders: Sequence[Path]) -> None:
    """Remove the folders a failed run created for its output, deepest first, while they are empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, force: bool = False,
               inputs: Sequence[str | os.PathLike | None] = ()) -> Iterator[Path]:
    """Build a folder under a temporary name beside ``path``; rename it into place on success.

    On error (SIGINT, and SIGTERM under the command line) the temporary folder is removed and ``path``
    is left as it was; temporary folders of earlier interrupted runs are removed first
    (:func:`clean_stale`). The finished folder gets stmorph's marker (:data:`MARKER`), which is what
    a later ``force=True`` checks for. When ``path`` cannot take the finished folder (another process
    created it meanwhile) the results are kept under a visible name that the error gives.
    """
    path = check_writable(path, force=force, inputs=inputs).resolve()
    created = [p for p in (path.parent, *path.parent.parents) if not p.exists()]  # deepest first
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(path)
        tmp = staging_dir(path)
    except OSError as exc:
        raise _output_error(exc, path) from None
    try:
        yield tmp
        (tmp / STAGING_MARKER).unlink()
        record_entries(tmp)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        ours = str(exc.filename or "").startswith(str(tmp)) or exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS)
        if isinstance(exc, StmorphError) or not ours:
            raise
        raise _output_error(exc, path) from exc  # disk full, quota: while writing the outputs
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        raise
    _public_modes(tmp)
    old = None
    if path.exists() or path.is_symlink():
        try:
            check_writable(path, force=force, inputs=inputs)
        except OutputExistsError:
            raise _strand(tmp, path, "was created or changed by another process during this run") from None
        try:
            old = staging_dir(path, "old")
            os.replace(path, old / "previous")
        except OSError as exc:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            raise _strand(tmp, path, f"could not be moved aside ({exc.strerror})") from None
    try:
        os.replace(tmp, path)
    except OSError as exc:
        if old is not None and not path.exists():
            with contextlib.suppress(OSError):
                os.replace(old / "previous", path)
        raise _strand(tmp, path, f"could not take the finished folder ({exc.strerror})") from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def swap_into_place(tmp: str | os.PathLike, out: str | os.PathLike) -> None:
    """Put the finished folder ``tmp`` at ``out`` (same file system), replacing an existing ``out`` that the
    caller has checked may be replaced.

    The old ``out`` is first moved aside to ``.<name>.old-<owner>*/previous`` beside it, then ``tmp`` is
    renamed to ``out`` and only then the old one removed: at every moment the previous folder or the new
    one is complete on disk (a killed process leaves the old one where :func:`clean_stale` finds it). When
    the rename fails the old folder is put back and the error raised.
    """
    tmp, out = Path(tmp), Path(out)
    if not (out.exists() or out.is_symlink()):
        os.replace(tmp, out)
        return
    old = staging_dir(out, "old")
    try:
        os.replace(out, old / "previous")
    except BaseException:
        shutil.rmtree(old, ignore_errors=True)
        raise
    try:
        os.replace(tmp, out)
    except BaseException:
        if not (out.exists() or out.is_symlink()):
            os.replace(old / "previous", out)
            shutil.rmtree(old, ignore_errors=True)
        raise
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
    """Write ``adata`` atomically; in-memory full-resolution images and empty metadata are not stored.

    ``adata`` is not modified and its arrays are not copied: the file is written from a new AnnData
    that shares them (a copy doubled the peak memory of a Visium HD run, whose image features alone
    are 2.4 GB per key at 463,000 bins); only ``uns`` is rebuilt.
    """
    import anndata as ad

    if adata.is_view:
        adata = adata.copy()
    uns = dict(adata.uns)
    if isinstance(uns.get("spatial"), Mapping):
        spatial = {}
        for lib, d in uns["spatial"].items():
            d = dict(d)
            if isinstance(d.get("images"), Mapping):
                d["images"] = {k: v for k, v in d["images"].items() if k != "fullres"}
            if isinstance(d.get("metadata"), Mapping):  # no image is no key, not the string "None"
                d["metadata"] = {k: v for k, v in d["metadata"].items() if v is not None}
            spatial[lib] = d
        uns["spatial"] = spatial
    out = ad.AnnData(X=adata.X, obs=adata.obs, var=adata.var, uns=h5ad_safe(uns), obsm=dict(adata.obsm),
                     varm=dict(adata.varm), obsp=dict(adata.obsp), varp=dict(adata.varp), layers=dict(adata.layers))
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


def write_figure(fig, path: str | os.PathLike, *, dpi: int = 150) -> Path:
    """Write a matplotlib figure atomically (format from the suffix) and close it."""
    path = Path(path)
    fmt = path.suffix.lstrip(".") or "png"
    try:
        return atomic_write(path, lambda p: fig.savefig(p, dpi=dpi, bbox_inches="tight", format=fmt))
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


def write_run_outputs(
    adata,
    out: str | os.PathLike,
    methods: Sequence[str],
    run_info: Mapping[str, Any],
    *,
    figures: Mapping[str, Any] | None = None,
    pages: Mapping[str, str] | None = None,
    writers: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """Write a run's outputs into the (temporary) folder ``out``.

    ``result.h5ad``, ``domains.csv`` (barcode + one column per method), each of ``writers``
    (``{name: function(path)}`` writing that file or folder, e.g. ``result.zarr`` by
    :func:`stmorph.write_spatialdata`), each of ``figures`` (``{file name: matplotlib figure}``, drawn by
    the caller with :mod:`stmorph.pl`, e.g. ``spatial_domains.png``), each of ``pages``
    (``{file name: text}``, e.g. ``report.html``) and ``run.json`` (``run_info`` plus package versions
    and the list of files).
    """
    out = Path(out)
    files = {"result": write_h5ad(adata, out / "result.h5ad"),
             "domains": write_domains_csv(adata, methods, out / "domains.csv")}
    for name, write in (writers or {}).items():
        write(out / name)
        files[name] = out / name
    for name, fig in (figures or {}).items():
        files[Path(name).stem] = write_figure(fig, out / name)
    for name, text in (pages or {}).items():
        files[Path(name).stem] = atomic_write(out / name, lambda p, t=text: Path(p).write_text(t, encoding="utf-8"))
    info = dict(run_info)
    info["packages"] = package_versions()
    info["outputs"] = sorted(p.name for p in files.values()) + ["run.json"]
    files["run"] = write_json(info, out / "run.json")
    return files
