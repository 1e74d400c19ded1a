"""Writing a run's outputs safely: atomic folders and files, h5ad-safe metadata, provenance.

Nothing the user had is overwritten or lost: an output folder is built next to
its destination under a temporary name and renamed into place only when
complete; an existing destination is replaced only with ``force=True``, and
then only after the new one is complete.
"""

from __future__ import annotations

import contextlib
import errno
import io
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

from .errors import InputError, OutputError, OutputExistsError, StmorphError

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


#: errno values that mean the device (or the user's quota) is full.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def free_bytes(folder: str | os.PathLike) -> int | None:
    """Bytes free for this user on the file system of ``folder`` (or of its first existing parent)."""
    folder = Path(os.path.abspath(folder))
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return int(shutil.disk_usage(folder).free)
    except OSError:
        return None


def _size(n: float) -> str:
    for unit, k in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= k:
            return f"{n / k:.1f} {unit}"
    return f"{int(n)} bytes"


def disk_full_error(folder: str | os.PathLike, need: int | None = None, writing: str | None = None,
                    free: int | None = None) -> OutputError:
    """The one-line error of a full disk: the folder, what was being written, the space needed and ``free``
    (the bytes free before writing; default: now)."""
    free = free_bytes(folder) if free is None else free
    parts = [f"{folder}: no space left on the device" + (f" while writing {writing}" if writing else "")]
    if need:
        parts.append(f"the outputs need about {_size(need)}")
    if free is not None:
        parts.append(f"{_size(free)} {'was free before writing' if need else 'free'}")
    return OutputError("; ".join(parts) + "; free some space or choose another output folder (nothing was replaced).")


def check_free_space(folder: str | os.PathLike, need: int) -> None:
    """OutputError (one line) when the file system of ``folder`` has less than ``need`` bytes free."""
    free = free_bytes(folder)
    if free is not None and need > free:
        msg = (f"{folder}: not enough free space for the outputs: they need about {_size(need)}, the device has "
               f"{_size(free)} free; free some space or choose another output folder.")
        raise OutputError(msg)


def _output_error(exc: OSError, path: Path) -> OutputError:
    if exc.errno in DISK_FULL:
        return disk_full_error(path.parent, writing=Path(exc.filename).name if exc.filename else None)
    where = f" ({exc.filename})" if exc.filename else ""
    text = " ".join(str(exc.strerror or exc).split())
    return OutputError(f"cannot write {path}: {text}{where}.")


def printable(path: str | os.PathLike) -> str:
    """``path`` with the bytes that are not UTF-8 shown as ``\\xNN`` (printable, storable)."""
    try:
        return os.fsencode(path).decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that is no escaped byte
        return os.fspath(path).encode("utf-8", "backslashreplace").decode("ascii")


def check_utf8_name(path: str | os.PathLike, what: str = "file") -> None:
    """InputError when ``path`` is not valid UTF-8: stmorph records input names in result.h5ad, whose text
    is UTF-8 only, so such a name failed when the results were written, after all the work."""
    raw = os.fsencode(path)
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        msg = (f"the {what} name is not valid UTF-8 (byte 0x{raw[exc.start]:02x}); stmorph records names in its "
               "outputs as UTF-8 text: rename it (e.g. convmv -f latin1 -t utf8 --notest NAME).")
        raise InputError(msg, printable(path)) from None




def check_name_length(path: str | os.PathLike) -> None:
    """OutputError when ``path``, or the name stmorph stages it under, is longer than the file system allows."""
    path = Path(os.path.abspath(path))
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    try:
        name_max = os.pathconf(parent, "PC_NAME_MAX")
        path_max = os.pathconf(parent, "PC_PATH_MAX")
    except (OSError, ValueError):
        name_max, path_max = 255, 4096
    for part in path.parts[1:-1]:
        if len(os.fsencode(part)) > name_max:
            msg = f"{printable(path)}: the folder name {printable(part)[:40]}... is longer than {name_max} bytes."
            raise OutputError(msg)
    # staging_dir: ".<name>.old-<owner>-" and mkdtemp's 8 characters; _strand: "<name>.stmorph-<date>-<time>-<n>"
    extra = max(len(".") + len(".old-") + len(_owner_tag()) + 8, len(".stmorph-20260101-000000-99"))
    longest = len(os.fsencode(path.name)) + extra
    if longest > name_max:
        most = max(1, name_max - longest + len(os.fsencode(path.name)))
        msg = (f"{printable(path)}: the output name is {len(os.fsencode(path.name))} bytes long, too long: stmorph "
               f"builds it under a temporary name {longest - len(os.fsencode(path.name))} bytes longer and the file "
               f"system allows {name_max}; choose a name of at most {most} bytes.")
        raise OutputError(msg)
    if len(os.fsencode(path)) + 64 > path_max:
        msg = f"{printable(path)[:60]}...: the output path is {len(os.fsencode(path))} bytes long, too long."
        raise OutputError(msg)


def check_can_write_in(folder: str | os.PathLike) -> None:
    """OutputError (one line) unless a file can be created in the existing ``folder``: tried with a temporary
    file, removed at once (permission bits do not tell for root, a read-only mount or ACLs)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".stmorph-write-check-", dir=folder)
    except OSError as exc:
        why = "the disk is full" if exc.errno in DISK_FULL else (exc.strerror or str(exc)).lower()
        msg = f"{printable(folder)}: cannot write in this folder ({why}); choose another folder or make it writable."
        raise OutputError(msg) from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)


def check_writable(path: str | os.PathLike, *, force: bool, inputs: Sequence[str | os.PathLike | None] = ()) -> Path:
    """Fail early, before any work, when ``path`` exists and may not be replaced, or cannot be made.

    An existing ``path`` is replaced only with ``force``, and only when stmorph wrote it (its marker)
    and it holds nothing else; never the working directory or a parent of it, the home folder, or a
    folder that is or contains one of ``inputs``. ``path`` and every one of ``inputs`` must be valid
    UTF-8 (:func:`check_utf8_name`), and ``path`` short enough to stage (:func:`check_name_length`).
    """
    if isinstance(path, str) and not path.strip():
        msg = ("the output folder name is empty or blank (that would be the working directory); give a new folder "
               "name.")
        raise OutputExistsError(msg)
    for given in inputs:
        if given is not None and str(given) != "":
            check_utf8_name(given, "input")
    check_utf8_name(path, "output")
    check_name_length(path)
    path = Path(path)
    if not (path.exists() or path.is_symlink()):
        _check_creatable(path)
        return path
    if not force:
        msg = f"{path} already exists; choose another output or pass"
        raise OutputExistsError(f"{msg} force=True to replace it.", cli=f"{msg} --force to replace it.")
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
        ours = str(exc.filename or "").startswith(str(tmp)) or exc.errno in (*DISK_FULL, errno.EROFS)
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


def _storable(text: str) -> str:
    """``text`` as UTF-8 can hold it: a file name's bytes that are not UTF-8 (lone surrogates) as ``\\xNN``."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return printable(text)
    return text


def h5ad_safe(obj: Any) -> Any:
    """A copy of ``obj`` that anndata can write: None -> "None", tuples -> lists, paths -> str, and the bytes
    of file names that are not UTF-8 as ``\\xNN`` (h5py stores UTF-8 text only)."""
    if isinstance(obj, Mapping):
        return {_storable(str(k)): h5ad_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [h5ad_safe(v) for v in obj]
        if items and all(isinstance(v, (int, float, np.number)) and not isinstance(v, bool) for v in items):
            return np.asarray(items)
        if all(isinstance(v, str) for v in items):
            return np.asarray(items, dtype=object) if items else np.asarray([], dtype=str)
        return {str(i): v for i, v in enumerate(items)}
    if obj is None:
        return "None"
    if isinstance(obj, str):
        return _storable(obj)
    if isinstance(obj, os.PathLike):
        return _storable(os.fspath(obj))
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


class _RecordingFile(io.RawIOBase):
    """A binary file for h5py's ``fileobj`` driver that never fails a write towards HDF5.

    The first failed write (disk full, quota, I/O error) is kept in :attr:`error` and every later write
    is only counted, so HDF5 finishes and closes the file normally; :func:`_write_h5ad_file` then raises
    that error. (HDF5 left in an error state by a failed write or flush printed dozens of "Exception
    ignored" tracebacks and crashed the interpreter at exit.) Reads past what reached the disk return zeros.
    """

    @staticmethod
    def _open(path):
        return open(path, "w+b", buffering=0)  # noqa: SIM115 - closed in close()

    def __init__(self, path):
        super().__init__()
        self._f = self._open(path)
        self.error: OSError | None = None
        self._pos = 0
        self._size = 0

    def readable(self):
        return True

    def writable(self):
        return True

    def seekable(self):
        return True

    def seek(self, pos, whence=0):
        self._pos = pos if whence == 0 else self._pos + pos if whence == 1 else self._size + pos
        return self._pos

    def tell(self):
        return self._pos

    def readinto(self, buf):
        n = max(0, min(len(buf), self._size - self._pos))
        got = 0
        if n:
            self._f.seek(self._pos)
            got = self._f.readinto(memoryview(buf)[:n]) or 0
            if got < n:
                memoryview(buf)[got:n] = bytes(n - got)
        self._pos += n
        return n

    def write(self, b):
        m = memoryview(b).cast("B")
        n = m.nbytes
        if self.error is None:
            try:
                self._f.seek(self._pos)
                while m.nbytes:
                    m = m[self._f.write(m):]
            except OSError as exc:
                self.error = exc
        self._pos += n
        self._size = max(self._size, self._pos)
        return n

    def truncate(self, size=None):
        self._size = self._pos if size is None else int(size)
        if self.error is None:
            try:
                self._f.truncate(self._size)
            except OSError as exc:
                self.error = exc
        return self._size

    def flush(self):
        pass

    def close(self):
        if not self.closed:
            self._f.close()
        super().close()


def _write_elem():
    try:
        from anndata.io import write_elem
    except ImportError:  # anndata < 0.11
        from anndata.experimental import write_elem
    return write_elem


def _write_h5ad_file(adata, path: str | os.PathLike, compression: str = "gzip") -> None:
    """``adata.write_h5ad(path)`` through a :class:`_RecordingFile`: an error while writing (a full disk) is
    raised as one OSError naming the file, after HDF5 has closed it cleanly."""
    import h5py

    write_elem = _write_elem()
    adata.strings_to_categoricals()
    kwargs = {"compression": compression}
    fh = _RecordingFile(path)
    try:
        with h5py.File(fh, "w") as f:
            f.attrs["encoding-type"] = "anndata"
            f.attrs["encoding-version"] = "0.1.0"
            write_elem(f, "X", adata.X, dataset_kwargs=kwargs)
            for key in ("obs", "var"):
                write_elem(f, key, getattr(adata, key), dataset_kwargs=kwargs)
            for key in ("obsm", "varm", "obsp", "varp", "layers", "uns"):
                write_elem(f, key, dict(getattr(adata, key)), dataset_kwargs=kwargs)
    except Exception:
        if fh.error is None:
            raise
    finally:
        fh.close()
    if fh.error is not None:
        exc = fh.error
        raise OSError(exc.errno, exc.strerror or str(exc), os.fspath(path)) from None


def estimate_h5ad_bytes(adata) -> int:
    """About how many bytes :func:`write_h5ad` writes for ``adata`` (gzip: counts shrink to about a third,
    images to about two thirds, float embeddings hardly at all); a little under rather than over, so a
    check against it refuses only a write that cannot fit."""
    import scipy.sparse as sp

    def arrays(obj):
        if isinstance(obj, Mapping):
            for v in obj.values():
                yield from arrays(v)
        elif sp.issparse(obj):
            yield from (obj.data, getattr(obj, "indices", np.empty(0)))
        elif isinstance(obj, np.ndarray):
            yield obj
        elif isinstance(obj, pd.DataFrame):
            for col in obj.columns:
                yield np.asarray(obj[col].cat.codes if isinstance(obj[col].dtype, pd.CategoricalDtype) else
                                 obj[col].to_numpy(dtype=object if obj[col].dtype == object else None))

    def packed(a) -> float:
        a = np.asarray(a)
        if a.dtype == object:
            return 0.3 * sum(len(str(v)) for v in a.ravel()[:100_000]) * max(1, a.size / 100_000)
        if a.dtype.kind == "f" and a.ndim == 2 and a.shape[1] > 1:
            return 0.8 * a.nbytes  # embeddings
        if a.ndim == 3:
            return 0.6 * a.nbytes  # images
        return 0.3 * a.nbytes  # counts, indices, codes

    n = 0.0
    for part in (adata.X, dict(adata.obsm), dict(adata.varm), dict(adata.layers), dict(adata.obsp),
                 dict(adata.varp), adata.uns, adata.obs, adata.var):
        n += sum(packed(a) for a in arrays(part))
    n += 0.3 * sum(len(str(v)) for v in adata.obs_names) + 0.3 * sum(len(str(v)) for v in adata.var_names)
    return int(n) + 64 * 2**10


def estimate_run_bytes(adata, methods: Sequence[str] = (), pages: Mapping[str, str] | None = None,
                       n_figures: int = 1) -> int:
    """About how many bytes :func:`write_run_outputs` writes: result.h5ad, domains.csv, figures, pages."""
    csv = adata.n_obs * (sum(len(str(v)) for v in adata.obs_names[:1000]) / max(1, min(1000, adata.n_obs))
                         + 4 * len(methods) + 2)
    figures = n_figures * 1_000_000
    text = sum(len(t.encode("utf-8", "replace")) for t in (pages or {}).values())
    return estimate_h5ad_bytes(adata) + int(csv) + figures + text


def check_space_for(adata, out: str | os.PathLike, methods: Sequence[str] = ()) -> None:
    """Before any work: OutputError when the device of ``out`` cannot take even the outputs of ``adata``
    as read (counts, coordinates, images; the embeddings the methods add come on top)."""
    check_free_space(Path(os.path.abspath(out)).parent, estimate_run_bytes(adata, methods))


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
    return atomic_write(path, lambda p: _write_h5ad_file(out, p))


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
    need = estimate_run_bytes(adata, methods, pages, len(figures or {}))
    folder = out.parent  # the folder the user named; ``out`` is the staging folder inside it
    free = free_bytes(folder)
    check_free_space(folder, need)
    writing = "result.h5ad"
    try:
        files = {"result": write_h5ad(adata, out / writing)}
        writing = "domains.csv"
        files["domains"] = write_domains_csv(adata, methods, out / writing)
        for writing, write in (writers or {}).items():
            write(out / writing)
            files[writing] = out / writing
        for writing, fig in (figures or {}).items():
            files[Path(writing).stem] = write_figure(fig, out / writing)
        for writing, text in (pages or {}).items():
            files[Path(writing).stem] = atomic_write(out / writing,
                                                     lambda p, t=text: Path(p).write_text(t, encoding="utf-8"))
        writing = "run.json"
        info = dict(run_info)
        info["packages"] = package_versions()
        info["outputs"] = sorted(p.name for p in files.values()) + ["run.json"]
        files["run"] = write_json(info, out / writing)
    except OSError as exc:
        if exc.errno not in DISK_FULL or isinstance(exc, StmorphError):
            raise
        raise disk_full_error(folder, need, writing, free) from None
    return files
