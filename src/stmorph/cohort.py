"""Cohorts: many sections, each run as ``stmorph run`` would, as tasks of a dask.distributed cluster.

A *manifest* is a CSV file with a header: ``section`` (the output folder's name) and ``input`` are
required; every other column is the ``stmorph run`` option of that long name (``image``, ``spots``,
``labels``, ``pixel_scale``, ``method``, ``n_clusters``, ``seed`` ...; ``-`` or ``_`` alike). An empty
cell leaves the option at its default. Relative paths are taken from the manifest's folder.
``method`` may name several methods separated by ``+``, ``;`` or spaces; on/off options (``refine``,
``no_plot``, ``report``) take ``true``/``false``.

:func:`run_cohort` validates the whole manifest before any work, then submits one task per section
(:func:`run_one`, which calls :func:`stmorph.cli._run.run_section`, the code path of ``stmorph run``)
to a ``dask.distributed`` client: a ``LocalCluster`` of single-threaded worker processes by default,
or an existing scheduler by address. A failing section is recorded and never stops the others. The
cohort folder gets ``cohort.csv`` (one row per section) and ``cohort.md``; a section whose folder holds
a complete ``run.json`` made with the same options is skipped, so re-running resumes a killed cohort.
With ``joint=True`` the sections are also loaded (one task each) and embedded *together*
(:func:`stmorph.tl.joint_domains`: shared genes and PCA axes, Harmony between sections, one clustering),
so that a domain's number means the same tissue type in every section: ``joint.csv`` (section, barcode,
domain) and the joint columns of the cohort table (``n_domains_joint``, ``ari_joint``, ``nmi_joint``,
``joint_section_specific``).
Needs the optional extra ``stmorph[cohort]`` (``dask[distributed]``; ``stmorph[joint]`` for Harmony).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shlex
import time
from pathlib import Path

from ._outputs import overlapping_input
from .errors import DependencyError, InputError, OutputExistsError, StmorphError

__all__ = ["COHORT_REPORT", "COHORT_TABLE", "JOINT_TABLE", "Section", "load_one", "make_client", "needs_gpu",
           "read_manifest", "run_cohort", "run_joint", "run_one"]

COHORT_TABLE = "cohort.csv"
COHORT_REPORT = "cohort.md"
JOINT_TABLE = "joint.csv"
#: ``stmorph run`` options that belong to the cohort (``--out``, ``--force``) or make no sense per section.
_REFUSED = {"out": "the output folder is DIR/<section>", "force": "give --force to stmorph cohort",
            "quiet": "sections always run quietly", "help": "not an option of a section",
            "version": "not an option of a section"}
#: Options that name files: relative paths are taken from the manifest's folder.
_PATH_OPTIONS = ("input", "image", "spots", "labels", "weights", "gene_sets")
_TRUE = {"1", "true", "yes", "y", "on"}
_FALSE = {"0", "false", "no", "n", "off"}
_SECTION_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]*$")


class _RaisingParser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print usage and exit
        raise _ParseError(message)


class _ParseError(Exception):
    pass


def _run_parser() -> argparse.ArgumentParser:
    """The ``stmorph run`` parser, raising instead of exiting."""
    from .cli import _run

    top = _RaisingParser(prog="stmorph")
    sub = top.add_subparsers(dest="command", parser_class=_RaisingParser)
    _run.add_parser(sub)
    return sub.choices["run"]


def _options(parser) -> dict[str, argparse.Action]:
    """Long option name with underscores (``pixel_scale``, ``no_plot``) -> its action."""
    out = {}
    for action in parser._actions:
        for opt in action.option_strings:
            if opt.startswith("--"):
                out[opt[2:].replace("-", "_")] = action
    return out


class Section:
    """One manifest row: its name, its ``stmorph run`` arguments (without ``--out``) and where it came from."""

    def __init__(self, name: str, argv: list[str], row: int):
        self.name, self.argv, self.row = name, argv, row

    def __repr__(self) -> str:
        return f"Section({self.name!r}, {self.argv!r})"


def _cell_args(column: str, value: str, action: argparse.Action, base: Path) -> list[str]:
    opt = "--" + column.replace("_", "-")
    if column in _PATH_OPTIONS:
        path = Path(value).expanduser()
        value = str(path if path.is_absolute() else base / path)
    if isinstance(action, argparse.BooleanOptionalAction) or action.nargs == 0:
        v = value.strip().lower()
        if v not in _TRUE | _FALSE:
            msg = f"expected true or false, got {value!r}"
            raise _ParseError(msg)
        if isinstance(action, argparse.BooleanOptionalAction):
            long = next(o for o in action.option_strings if o.startswith("--") and not o.startswith("--no-"))
            return [long if v in _TRUE else "--no-" + long[2:]]
        return [opt] if v in _TRUE else []
    parts = [p for p in re.split(r"[+;\s]+", value.strip()) if p]
    if isinstance(action, argparse._AppendAction):
        return [a for p in parts for a in (opt, p)]
    if action.nargs == "+":  # a list, e.g. sigma_um "100 200"
        return [opt, *parts]
    return [opt, value]


def read_manifest(path: str | os.PathLike) -> list[Section]:
    """Read and validate a cohort manifest; every problem is one :class:`InputError` naming the file,
    row (the line number in the file) and column. Every path cell (input, image, spots, labels, weights,
    gene_sets) must name a file or folder that exists, so a missing one is found before any work."""
    path = Path(path)
    if not path.is_file():
        raise InputError("no such manifest file" if not path.exists() else "the manifest is not a file", path)
    base = path.resolve().parent
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"cannot read the manifest: {exc}", path) from None
    rows = [(i, r) for i, r in enumerate(rows, start=1) if any(c.strip() for c in r)]
    if not rows:
        raise InputError("the manifest is empty; it needs a header with 'section' and 'input'", path)
    _, header = rows[0]
    header = [h.strip().replace("-", "_") for h in header]
    for need in ("section", "input"):
        if need not in header:
            raise InputError(f"the manifest's header has no '{need}' column (it has: {', '.join(header)})", path)
    parser = _run_parser()
    options = _options(parser)
    seen_cols = set()
    for col in header:
        if col in seen_cols:
            raise InputError(f"row 1, column {col}: the column appears twice", path)
        seen_cols.add(col)
        if col in ("section", "input"):
            continue
        if col in _REFUSED:
            raise InputError(f"row 1, column {col}: not allowed in a manifest ({_REFUSED[col]})", path)
        if col not in options:
            raise InputError(f"row 1, column {col}: unknown column: not an option of stmorph run", path)
    sections, names, paths = [], {}, []
    for line, row in rows[1:]:
        if len(row) != len(header):
            raise InputError(f"row {line}: {len(row)} cells for {len(header)} columns", path)
        cells = {h: c.strip() for h, c in zip(header, row)}
        name = cells["section"]
        if not name:
            raise InputError(f"row {line}, column section: empty section name", path)
        if not _SECTION_NAME.match(name) or name in (COHORT_TABLE, COHORT_REPORT, JOINT_TABLE):
            msg = (f"row {line}, column section: {name!r} cannot be a folder name here "
                   "(letters, digits, _ . + -; not starting with '.' or '-')")
            raise InputError(msg, path)
        if name in names:
            raise InputError(f"row {line}, column section: duplicate section {name!r} (also row {names[name]})", path)
        names[name] = line
        if not cells["input"]:
            raise InputError(f"row {line}, column input: empty input", path)
        inp = Path(cells["input"]).expanduser()
        argv = [str(inp if inp.is_absolute() else base / inp)]
        for col, value in cells.items():
            if col in _PATH_OPTIONS and value not in ("", "auto"):
                given = Path(value).expanduser()
                paths.append((line, col, value, given if given.is_absolute() else base / given))
            if col in ("section", "input") or value == "":
                continue
            try:
                args = _cell_args(col, value, options[col], base)
                parser.parse_args([argv[0], "--out", "x", *args])
            except _ParseError as exc:
                raise InputError(f"row {line}, column {col}: {exc}", path) from None
            argv += args
        sections.append(Section(name, argv, line))
    if not sections:
        raise InputError("the manifest lists no sections", path)
    for line, col, value, resolved in paths:  # once the manifest itself is valid: the files it names
        if not resolved.exists():
            raise InputError(f"row {line}, column {col}: no such file or folder: {value}", path)
    return sections


# --------------------------------------------------------------------------- one section (a task)


def _command(argv: list[str], out: Path) -> str:
    return "stmorph run " + shlex.join([argv[0], "--out", str(out), *argv[1:]])


def _row_from_info(name: str, status: str, info: dict, seconds: float | None, error: str = "") -> dict:
    row = {"section": name, "status": status,
           "seconds": round(seconds if seconds is not None else float(info.get("timings_s", {}).get("total", 0)), 2),
           "n_spots": info.get("n_spots"), "error": error}
    for m, k in info.get("n_domains", {}).items():
        row[f"n_domains_{m}"] = k
    for key in ("ari", "nmi"):
        for m, v in (info.get(key) or {}).items():
            row[f"{key}_{m}"] = None if v is None else round(float(v), 4)
    return row


def _complete_run(folder: Path) -> dict | None:
    """run.json of a finished ``stmorph run`` in ``folder``, or None."""
    try:
        info = json.loads((folder / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not (isinstance(info, dict) and "stmorph_version" in info and isinstance(info.get("outputs"), list)):
        return None
    if not all((folder / o).exists() for o in info["outputs"]):
        return None
    return info


def run_one(name: str, argv: list[str], out: str, force: bool = False) -> dict:
    """Run one section as ``stmorph run ARGV --out OUT --quiet`` and return its cohort-table row.

    Never raises for the section's own failures: the row has ``status="failed"`` and the error's
    first line. This is the function a dask worker runs.
    """
    import warnings

    from .cli._run import run_section

    t0 = time.perf_counter()
    out_path = Path(out)
    try:
        args = _run_parser().parse_args([argv[0], "--out", str(out_path), *argv[1:], "--quiet"])
        args.force = force
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            warnings.showwarning = _not_shown  # run_section still records its warnings in run.json
            info = run_section(args, _command(argv, out_path))
        return {**_row_from_info(name, "ok", info, time.perf_counter() - t0), "worker": _worker()}
    except Exception as exc:  # noqa: BLE001 - a section's failure is data, not a crash
        text = exc.cli_message() if isinstance(exc, StmorphError) else f"{type(exc).__name__}: {exc}"
        line = " ".join(text.split()) or type(exc).__name__
        return {**_row_from_info(name, "failed", {}, time.perf_counter() - t0, line), "worker": _worker()}


def _not_shown(message, category, filename, lineno, file=None, line=None) -> None:
    """A ``warnings.showwarning`` that prints nothing."""


def _worker() -> str:
    """The address of the dask worker running this task ("" outside one)."""
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):
        return ""


# --------------------------------------------------------------------------- the cohort


def make_client(scheduler: str | None, workers: int | None, what: str = "stmorph cohort"):
    """``(client, cluster)``: a client of the scheduler at ``scheduler``, or of a new ``LocalCluster`` of
    ``workers`` single-threaded processes (default: the usable cores; ``cluster`` is then to be closed too)."""
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        msg = f"{what} needs dask.distributed: pip install 'stmorph[cohort]'"
        raise DependencyError(msg) from None
    if scheduler:
        try:
            return Client(scheduler, timeout="20s"), None
        except (OSError, TimeoutError) as exc:
            raise InputError(f"cannot connect to the dask scheduler {scheduler}: {exc}") from None
    n = workers or max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None)
    return Client(cluster), cluster


def _table_columns(rows: list[dict]) -> list[str]:
    first = ["section", "status", "seconds", "n_spots"]
    rest = sorted({k for r in rows for k in r} - {*first, "error", "worker"},
                  key=lambda k: (("n_domains_", "ari_", "nmi_").index(k[:k.index("_", 3) + 1])
                                 if k.startswith(("n_domains_", "ari_", "nmi_")) else 9, k))
    return [*first, *rest, "worker", "error"]


def _write_table(rows: list[dict], out: Path) -> None:
    from ._outputs import atomic_write

    cols = _table_columns(rows)

    def write(p):
        with open(p, "w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, cols, extrasaction="ignore")
            w.writeheader()
            for r in rows:
                w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})

    atomic_write(out / COHORT_TABLE, write)


def _write_report(rows: list[dict], out: Path, manifest: Path, where: str, wall: float,
                  joint: dict | None = None) -> None:
    from ._outputs import atomic_write

    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "skipped", "failed")}
    cols = [c for c in _table_columns(rows) if c not in ("error", "n_spots", "worker")]
    lines = ["# stmorph cohort", "",
             (f"Manifest `{manifest}`, {len(rows)} sections on {where}: {counts['ok']} run, "
              f"{counts['skipped']} skipped (already complete), {counts['failed']} failed; {wall:.1f} s wall."), "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    if joint:
        theta = "" if joint.get("theta") is None else f" (theta {joint['theta']:g})"
        lines[3:3] = [(f"Joint domains (`{JOINT_TABLE}`): method {joint['method']}, batch correction "
                       f"{joint['batch_correction']}{theta}, "
                       f"{'' if joint.get('refit', True) else 'no '}refit per section, "
                       f"{joint['n_clusters']} domains shared by "
                       f"{len(joint['sections'])} sections, seed {joint['random_state']}; {joint['seconds']:.1f} s."), ""]
    for r in rows:
        lines.append("| " + " | ".join("" if r.get(c) is None else str(r.get(c)) for c in cols) + " |")
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:
        lines += ["", "## Failures", ""] + [f"- `{r['section']}`: {r['error']}" for r in failed]
    text = "\n".join(lines) + "\n"
    atomic_write(out / COHORT_REPORT, lambda p: Path(p).write_text(text, encoding="utf-8"))


def _check_out(out: Path) -> None:
    """The cohort folder can be created, or is one that stmorph made, or is empty."""
    from ._outputs import _check_creatable, stmorph_entries

    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise OutputExistsError(f"{out} exists and is not a folder; choose another --out.")
        if any(out.iterdir()) and stmorph_entries(out) is None:
            msg = f"{out} exists and was not made by stmorph cohort; choose another --out."
            raise OutputExistsError(msg)
    else:
        _check_creatable(out)


def _create_out(out: Path) -> None:
    from ._outputs import _output_error, record_entries

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _output_error(exc, out) from None
    record_entries(out, [COHORT_TABLE, COHORT_REPORT])


def load_one(argv: list[str]):
    """Read a section as ``stmorph run ARGV`` reads it (a dask task of the joint run); warnings dropped."""
    import warnings

    from .cli._run import read_input

    args = _run_parser().parse_args([argv[0], "--out", "x", *argv[1:]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return read_input(args.input, image=args.image, spots=args.spots, labels=args.labels,
                          pixel_scale=args.pixel_scale)


def run_joint(sections: list[Section], out: Path, client, rows: dict[str, dict], *, method: str = "stmorph",
              n_clusters: int | None = None, batch_correction: str | None = "harmony", refit: bool = True,
              theta: float | None = None, log=None) -> dict:
    """Load every section as a task, embed them jointly (:func:`stmorph.tl.joint_domains`) and write
    ``out/joint.csv``; the joint columns go into ``rows``. A section that cannot be read is left out
    (its row says so). Returns the joint run's parameters and seconds."""
    import pandas as pd

    from . import ev
    from ._outputs import atomic_write
    from .tl import joint_domains

    t0 = time.perf_counter()
    parsed = {s.name: _run_parser().parse_args([s.argv[0], "--out", "x", *s.argv[1:]]) for s in sections}
    if n_clusters is None:
        given = {getattr(a, "n_clusters", None) for a in parsed.values()}
        n_clusters = given.pop() if len(given) == 1 else None
    seed = parsed[sections[0].name].seed
    futures = {s.name: client.submit(load_one, s.argv, pure=False,
                                     key=f"stmorph-load-{s.name}-{os.getpid()}-{time.time_ns()}") for s in sections}
    adatas = {}
    for name, fut in futures.items():
        try:
            adatas[name] = fut.result()
        except Exception as exc:  # noqa: BLE001 - a section that cannot be read is left out of the joint run
            text = exc.cli_message() if isinstance(exc, StmorphError) else f"{type(exc).__name__}: {exc}"
            line = " ".join(text.split())
            rows[name]["error"] = "; ".join(e for e in (rows[name].get("error"), f"joint: {line}") if e)
            if log:
                log(f"{name}: left out of the joint domains: {line}")
    if not adatas:
        raise InputError("joint domains: no section could be read")
    joint_domains(adatas, method=method, n_clusters=n_clusters, batch_correction=batch_correction, refit=refit,
                  **({} if theta is None else {"theta": float(theta)}), random_state=seed)
    frames = []
    specific = dict(zip(adatas, next(iter(adatas.values())).uns["joint"]["params"]["section_specific"]))
    for name, a in adatas.items():
        rows[name]["n_domains_joint"] = int(a.obs["joint"].nunique())
        rows[name]["joint_section_specific"] = round(float(specific[name]), 4)
        if "annotation" in a.obs and a.obs["annotation"].notna().any():
            rows[name]["ari_joint"] = round(float(ev.ari(a, "joint")), 4)
            rows[name]["nmi_joint"] = round(float(ev.nmi(a, "joint")), 4)
        frames.append(pd.DataFrame({"section": name, "barcode": a.obs_names, "joint": a.obs["joint"].astype(str)}))
    table = pd.concat(frames, ignore_index=True)
    atomic_write(out / JOINT_TABLE, lambda p: table.to_csv(p, index=False))
    params = {k: v for k, v in next(iter(adatas.values())).uns["joint"]["params"].items()
              if k not in ("refine", "refit")}
    params["refit"] = refit
    info = {**params, "seconds": round(time.perf_counter() - t0, 2)}
    if log:
        log(f"joint domains: {len(adatas)} sections, {params['n_clusters']} domains ({info['seconds']:.1f} s)")
    return info


def needs_gpu(section: Section) -> bool:
    """Whether the section computes image features on its device: one of its methods reads image
    patches and its ``device`` is not ``cpu``. Such sections ask for the ``--gpu-resource``."""
    from .cli._run import resolve_methods
    from .tl._methods import get_method

    args = _run_parser().parse_args([section.argv[0], "--out", "x", *section.argv[1:]])
    return getattr(args, "device", "auto") != "cpu" and any(get_method(m).patches for m in resolve_methods(args.method))


def run_cohort(manifest: str | os.PathLike, out: str | os.PathLike, *, scheduler: str | None = None,
               workers: int | None = None, force: bool = False, gpu_resource: str | None = None,
               joint: bool = False, joint_method: str = "stmorph", joint_clusters: int | None = None,
               batch_correction: str | None = "harmony", joint_refit: bool = True, joint_theta: float | None = None,
               log=None) -> list[dict]:
    """Run every section of ``manifest`` into ``out/<section>/``; returns the cohort table's rows.

    Parameters
    ----------
    manifest
        The manifest CSV (see the module's description).
    out
        The cohort folder: created when absent; an existing one is resumed.
    scheduler
        Address of a running dask scheduler (``tcp://host:port``); default: a ``LocalCluster``.
    workers
        Worker processes of the ``LocalCluster`` (default: the usable CPU cores).
    gpu_resource
        With ``scheduler``: sections that compute image features on a GPU (:func:`needs_gpu`) ask for one
        unit of this worker resource (workers started with ``dask worker ... --resources GPU=1``).
    force
        Run every section again, replacing its folder (under ``stmorph run --force``'s rules);
        without it a complete section is skipped.
    joint, joint_method, joint_clusters, batch_correction, joint_refit, joint_theta
        Also find joint domains over all sections (:func:`run_joint`): the method (``stmorph`` or
        ``expression``), the number of domains (default: the manifest's ``n_clusters`` when every section
        gives the same one, else chosen from the data), the batch correction (``harmony`` or None),
        whether each section's domains are refitted in its own embedding (``refit`` of
        :func:`stmorph.tl.joint_domains`) and Harmony's diversity penalty (default
        :data:`stmorph.tl._joint.HARMONY_THETA`; higher when the domains follow the sections).
    log
        Called with one line per finished section.
    """
    t_start = time.perf_counter()
    manifest = Path(manifest)
    sections = read_manifest(manifest)
    out = Path(out).expanduser().absolute()
    for s in sections:  # an output inside an input would be replaced by a later --force
        inputs = [given for given in s.argv if Path(given).is_absolute()]
        hit = overlapping_input(out, inputs)
        if hit is not None:
            raise InputError(f"row {s.row}: --out {out} overlaps the input {hit} (symbolic links followed)", manifest)
    _check_out(out)
    if gpu_resource and not scheduler:
        msg = (f"--gpu-resource {gpu_resource} needs --scheduler: a cluster whose GPU workers were started "
               f"with --resources {gpu_resource}=1")
        raise InputError(msg)
    from ._outputs import record_entries

    rows: dict[str, dict] = {}
    todo = []
    for s in sections:
        folder = out / s.name
        info = None if force else _complete_run(folder)
        if info is not None and info.get("command") == _command(s.argv, folder):
            rows[s.name] = _row_from_info(s.name, "skipped", info, float(sum(
                v for k, v in info.get("timings_s", {}).items() if isinstance(v, (int, float)) and k in (
                    "read", "methods_total", "write_outputs"))))
        elif info is not None:
            msg = f"{folder} holds a run with other options; pass --force to replace it"
            rows[s.name] = _row_from_info(s.name, "failed", {}, 0.0, msg)
        else:
            todo.append(s)
        if s.name in rows and log:
            log(f"{s.name}: {rows[s.name]['status']}")

    def table():
        return [rows[s.name] for s in sections if s.name in rows]

    where = "nothing (all done)"
    joint_info = None
    if not todo and not joint:
        _create_out(out)
    else:
        client, cluster = make_client(scheduler, workers)
        try:
            _create_out(out)
        except BaseException:
            client.close()
            if cluster is not None:
                cluster.close()
            raise
        where = f"dask scheduler {scheduler}" if scheduler else f"a LocalCluster of {len(cluster.workers)} processes"
        try:
            from distributed import as_completed

            futures = {client.submit(run_one, s.name, s.argv, str(out / s.name), force, pure=False,
                                     resources={gpu_resource: 1} if gpu_resource and needs_gpu(s) else None,
                                     key=f"stmorph-section-{s.name}-{os.getpid()}-{time.time_ns()}"): s
                       for s in todo}
            for fut in as_completed(futures):
                s = futures[fut]
                try:
                    row = fut.result()
                except Exception as exc:  # noqa: BLE001 - the worker died, the task could not run
                    line = " ".join(f"{type(exc).__name__}: {exc}".split())
                    row = _row_from_info(s.name, "failed", {}, None, line)
                rows[s.name] = row
                if row["status"] == "ok":
                    record_entries(out, [s.name])
                _write_table(table(), out)
                if log:
                    err = f": {row['error']}" if row["error"] else ""
                    log(f"{s.name}: {row['status']} ({row['seconds']:.1f} s){err}")
            if joint:
                record_entries(out, [JOINT_TABLE])
                joint_info = run_joint(sections, out, client, rows, method=joint_method, n_clusters=joint_clusters,
                                       batch_correction=batch_correction, refit=joint_refit, theta=joint_theta,
                                       log=log)
        finally:
            client.close()
            if cluster is not None:
                cluster.close()
    result = table()
    _write_table(result, out)
    _write_report(result, out, manifest, where, time.perf_counter() - t_start, joint_info)
    return result
