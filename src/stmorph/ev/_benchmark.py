"""Benchmark harness: every annotated section under a folder, every method, several seeds.

Sections are found by layout, so the harness runs on annotated sections it has
never seen:

* **HER2ST / legacy ST** (Andersson et al. 2021): a folder with
  ``ST-cnts/S.tsv.gz`` (or ``S.tsv``), ``ST-spotfiles/S_selection.tsv`` and
  ``ST-pat/lbl/S_labeled_coordinates.tsv``; the H&E is taken from
  ``ST-imgs/<letter>/<S>/`` when present (with ``scalefactors.json``'s
  ``pixel_scale`` when the image is a rescaled rendering).
* **Space Ranger** (Visium): any folder with ``filtered_feature_bc_matrix.h5``,
  ``spatial/`` and ``labels.tsv`` (barcode, label); a full-resolution H&E
  (``.tif``/``.tiff``/``.jpg``/``.png``) lying next to the matrix (or in the
  sample folder holding ``outs/``) is used as the section's image (the largest
  such file). Without one, methods that need the full-resolution image are
  recorded as skipped.

For each section the number of clusters is the number of distinct scored labels
(everything but missing labels and ``ignore``). Each method runs once per seed
through an injectable runner (default :func:`stmorph.tl.run_methods`); a method
that cannot run on a section (e.g. an image method on a section without an
image) is recorded as *skipped* with the reason, never a crash.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .._outputs import atomic_write
from ..errors import InputError, OutputExistsError, StmorphError
from ._metrics import DEFAULT_IGNORE, ari, nmi, scored_labels

__all__ = ["Section", "find_sections", "load_section", "run_benchmark", "summarize", "benchmark_markdown",
           "read_peers", "peers_markdown", "DEFAULT_METHODS"]

#: Run by default: every registered method (``"all"``).
DEFAULT_METHODS = ("all",)
IMAGE_EXT = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".btf", ".svs", ".ndpi", ".mrxs", ".scn", ".bif")
CSV_COLUMNS = ["section", "method", "seed", "ARI", "NMI", "seconds", "status", "n_spots", "n_clusters", "reason"]


@dataclass
class Section:
    """One annotated section found on disk."""

    name: str
    layout: str  # "legacy_st" or "visium"
    path: Path
    files: dict[str, Path] = field(default_factory=dict)
    pixel_scale: float = 1.0

    @property
    def image(self) -> Path | None:
        return self.files.get("image")


def _find_image(folder: Path) -> tuple[Path | None, float]:
    if not folder.is_dir():
        return None, 1.0
    scale = 1.0
    named = None
    sf = folder / "scalefactors.json"
    if sf.is_file():
        try:
            meta = json.loads(sf.read_text())
            scale = float(meta.get("pixel_scale", 1.0))
            named = meta.get("image")
        except (ValueError, TypeError) as exc:
            msg = f"scalefactors.json is not valid JSON with a numeric pixel_scale ({exc})."
            raise InputError(msg, sf) from exc
    if named and (folder / named).is_file():
        return folder / named, scale
    imgs = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXT and p.is_file())
    return (imgs[0] if imgs else None), (scale if imgs else 1.0)


def _legacy_sections(root: Path, base: Path) -> list[Section]:
    out = []
    lbl_dir = root / "ST-pat" / "lbl"
    for lbl in sorted(lbl_dir.glob("*_labeled_coordinates.tsv")):
        s = lbl.name[: -len("_labeled_coordinates.tsv")]
        counts = next((p for p in (root / "ST-cnts" / f"{s}.tsv.gz", root / "ST-cnts" / f"{s}.tsv") if p.is_file()),
                      None)
        spots = root / "ST-spotfiles" / f"{s}_selection.tsv"
        if counts is None or not spots.is_file():
            continue
        img, scale = _find_image(root / "ST-imgs" / s[:1] / s)
        files = {"counts": counts, "spots": spots, "labels": lbl}
        if img is not None:
            files["image"] = img
        name = _rel(root, base, s)
        out.append(Section(name=name, layout="legacy_st", path=root, files=files, pixel_scale=scale))
    return out


def _rel(folder: Path, base: Path, leaf: str | None = None) -> str:
    try:
        rel = folder.resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        rel = folder.name
    rel = "" if rel == "." else rel
    parts = [p for p in (rel, leaf) if p]
    return "/".join(parts) or folder.resolve().name


def _visium_fullres(d: Path) -> Path | None:
    """A full-resolution H&E next to the matrix (or in the sample folder holding outs/): the largest image file."""
    folders = [d] + ([d.parent] if d.name == "outs" else [])
    imgs = [p for f in folders for p in f.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXT]
    return max(imgs, key=lambda p: p.stat().st_size) if imgs else None


def find_sections(data_dir: str | os.PathLike) -> list[Section]:
    """Every annotated section under ``data_dir`` (searched recursively), sorted by name."""
    base = Path(data_dir)
    if not base.is_dir():
        msg = "data folder not found."
        raise InputError(msg, base)
    found: list[Section] = []
    for dirpath, dirnames, filenames in os.walk(base, followlinks=True):
        d = Path(dirpath)
        dirnames.sort()
        if (d / "ST-pat" / "lbl").is_dir() and (d / "ST-cnts").is_dir():
            found += _legacy_sections(d, base)
        if "filtered_feature_bc_matrix.h5" in filenames and (d / "spatial").is_dir():
            labels = d / "labels.tsv"
            if not labels.is_file() and d.name == "outs" and (d.parent / "labels.tsv").is_file():
                labels = d.parent / "labels.tsv"
            if labels.is_file():
                name = _rel(d.parent if d.name == "outs" else d, base)
                files = {"h5": d / "filtered_feature_bc_matrix.h5", "labels": labels}
                img = _visium_fullres(d)
                if img is not None:
                    files["image"] = img
                found.append(Section(name=name, layout="visium", path=d, files=files))
    return sorted(found, key=lambda s: s.name)


def load_section(section: Section):
    """Read a section with :mod:`stmorph.read`; labels land in ``obs["annotation"]``."""
    from .. import read

    if section.layout == "legacy_st":
        f = section.files
        return read.legacy_st(f["counts"], f["spots"], image=f.get("image"), pixel_scale=section.pixel_scale,
                              labels=f["labels"], library_id=section.name.replace("/", "_"))
    if section.layout == "visium":
        return read.visium(section.path, image=section.files.get("image"), labels=section.files["labels"],
                           library_id=section.name.replace("/", "_"))
    msg = f"unknown section layout {section.layout!r}."
    raise InputError(msg, section.path)


def _default_runner(adata, methods, *, n_clusters, random_state):
    from ..tl import run_methods

    return run_methods(adata, methods, n_clusters=n_clusters, random_state=random_state, progress=False)


def run_benchmark(
    data_dir: str | os.PathLike | None = None,
    methods: Sequence[str] = DEFAULT_METHODS,
    *,
    seeds: int | Iterable[int] = 3,
    out: str | os.PathLike | None = None,
    sections: Sequence[Section] | None = None,
    only: Sequence[str] | None = None,
    ignore: Sequence[str] = DEFAULT_IGNORE,
    runner: Callable | None = None,
    loader: Callable | None = None,
    force: bool = False,
    log: Callable[[str], None] | None = None,
    command: str | None = None,
    machine: str | None = None,
    code: str | None = None,
    peers: str | os.PathLike | None = None,
    client=None,
) -> pd.DataFrame:
    """Run ``methods`` on every annotated section, ``seeds`` times, and score them.

    Parameters
    ----------
    data_dir
        Folder searched by :func:`find_sections` (unless ``sections`` is given).
    methods
        Method names passed to the runner (``stmorph``, ``expression``, ``image``, ``stmic``, ``senca``...);
        ``"all"`` (default): every registered method.
    seeds
        Number of seeds (0, 1, ... N-1) or an explicit list.
    out
        Folder for ``benchmark.csv`` and ``benchmark.md`` (rewritten after every run, atomically).
    only
        Keep only sections whose name contains one of these strings.
    ignore
        Labels left out of scoring and of the cluster count.
    runner
        ``runner(adata, [method], n_clusters=..., random_state=...) -> {method: seconds}`` writing
        ``obs[method]``; default :func:`stmorph.tl.run_methods`. A :class:`~stmorph.errors.StmorphError`
        (missing image, missing dependency) marks the run *skipped* with its message; any other exception
        marks it *failed* (traceback on stderr) and the benchmark goes on.
    loader
        ``loader(section) -> AnnData``; default :func:`load_section`.
    force
        Overwrite existing outputs in ``out``.
    command, machine, code
        Recorded at the top of ``benchmark.md`` (code: stmorph version / git commit).
    peers
        A markdown file of peers' ARIs (:func:`read_peers`, e.g. ``../shared/docs/peers.md``): ``benchmark.md``
        then ends with a table of stmorph's methods beside them.
    client
        A ``distributed.Client`` (e.g. :func:`stmorph.cohort.make_client`): each section runs as one task
        on its cluster (``runner`` and ``loader`` must then be picklable); default: here, one after another.

    Returns
    -------
    One row per (section, method, seed): ``section, method, seed, ARI, NMI, seconds, status, n_spots,
    n_clusters, reason``.
    """
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    runner = runner or _default_runner
    loader = loader or load_section
    seed_list = list(range(int(seeds))) if isinstance(seeds, int | np.integer) else [int(s) for s in seeds]
    if not seed_list:
        msg = "seeds must be at least 1."
        raise InputError(msg)
    if "all" in methods:  # every registered method; the runner takes any other name it knows
        from ..tl import available_methods

        methods = [m for x in methods for m in (available_methods() if x == "all" else (x,))]
    methods = list(dict.fromkeys(methods))
    if not methods:
        msg = "no method given."
        raise InputError(msg)
    if sections is None:
        if data_dir is None:
            msg = "give data_dir or sections."
            raise InputError(msg)
        sections = find_sections(data_dir)
    if only:
        sections = [s for s in sections if any(o in s.name for o in only)]
    if not sections:
        msg = ("no annotated section found (looked for HER2ST ST-cnts/ST-spotfiles/ST-pat/lbl and Space Ranger "
               "folders with filtered_feature_bc_matrix.h5, spatial/ and labels.tsv).")
        raise InputError(msg, data_dir)
    out_dir = Path(out) if out is not None else None
    if out_dir is not None:
        for f in ("benchmark.csv", "benchmark.md"):
            if (out_dir / f).exists() and not force:
                msg = f"{f} already exists; pass --force to overwrite."
                raise OutputExistsError(msg if out_dir is None else f"{out_dir / f}: {msg}")
            if (out_dir / f).exists() and not _written_by_stmorph(out_dir / f):
                msg = f"{f} was not written by stmorph benchmark; --force only replaces its own tables."
                raise OutputExistsError(f"{out_dir / f}: {msg}")
        out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    peer_table = read_peers(peers) if peers is not None else None
    meta = {"methods": methods, "seeds": seed_list, "ignore": list(ignore), "command": command, "machine": machine, "code": code,
            "peers": peer_table, "peers_source": str(peers) if peers is not None else None,
            "sections": [f"{s.name} ({s.layout}, {'image ' + s.image.name if s.image else 'no full-resolution image'})"
                         for s in sections]}
    log(f"benchmark: {len(sections)} section(s): {', '.join(s.name for s in sections)}")
    if client is not None:  # one dask.distributed task per section (stmorph cohort's engine)
        from distributed import as_completed

        futures = {client.submit(_section_rows, sec, methods, seed_list, ignore, runner, loader, pure=False): sec
                   for sec in sections}
        for fut in as_completed(futures):
            sec = futures[fut]
            try:
                new = fut.result()
            except Exception as exc:  # noqa: BLE001 - the worker died: the section's runs failed
                new = [_row(sec.name, m, seed, status="failed", reason=f"{type(exc).__name__}: {_one_line(exc)}")
                       for m in methods for seed in seed_list]
            rows += new
            log(f"  {sec.name}: " + ", ".join(f"{r['method']} seed {r['seed']} {r['status']}"
                                              + (f" ARI {r['ARI']:.3f}" if r["status"] == "ok" else "") for r in new))
            _write(rows, out_dir, meta)
        order = {s.name: i for i, s in enumerate(sections)}
        rows.sort(key=lambda r: order[r["section"]])
        _write(rows, out_dir, meta)
        return pd.DataFrame(rows, columns=CSV_COLUMNS)
    for sec in sections:
        rows += _section_rows(sec, methods, seed_list, ignore, runner, loader, log,
                              on_row=lambda new: _write(rows + new, out_dir, meta))
        _write(rows, out_dir, meta)
    return pd.DataFrame(rows, columns=CSV_COLUMNS)


def _section_rows(sec: Section, methods, seed_list, ignore, runner, loader, log=None, on_row=None) -> list[dict]:
    """Every (method, seed) row of one section (a dask task with ``run_benchmark(client=...)``)."""
    log = log or (lambda m: None)
    rows: list[dict] = []
    t0 = time.perf_counter()
    try:
        adata = loader(sec)
        truth = scored_labels(adata, "annotation", ignore=ignore)
    except StmorphError as exc:
        log(f"  {sec.name}: cannot read: {exc}")
        for m in methods:
            for seed in seed_list:
                rows.append(_row(sec.name, m, seed, status="failed", reason=f"cannot read section: {exc}"))
        return rows
    k = int(truth.nunique())
    log(f"  {sec.name}: {adata.n_obs} spots, {k} scored labels, read in {time.perf_counter() - t0:.1f}s")
    for seed in seed_list:
        for m in methods:
            row = _row(sec.name, m, seed, n_spots=adata.n_obs, n_clusters=k)
            t1 = time.perf_counter()
            try:
                if m in adata.obs:
                    del adata.obs[m]
                secs = runner(adata, [m], n_clusters=k, random_state=seed) or {}
                if m not in adata.obs:
                    msg = f"the runner returned without writing obs[{m!r}]."
                    raise RuntimeError(msg)
                row["seconds"] = float(secs.get(m, time.perf_counter() - t1))
                row["ARI"] = ari(adata, m, annotation="annotation", ignore=ignore)
                row["NMI"] = nmi(adata, m, annotation="annotation", ignore=ignore)
                row["status"] = "ok"
                log(f"    {m:<11} seed {seed}: ARI {row['ARI']:.3f}  NMI {row['NMI']:.3f}  {row['seconds']:.1f}s")
            except StmorphError as exc:
                row["status"], row["reason"] = "skipped", _one_line(exc)
                log(f"    {m:<11} seed {seed}: skipped: {row['reason']}")
            except Exception as exc:  # noqa: BLE001 - a failing method must not stop the benchmark
                row["status"], row["reason"] = "failed", f"{type(exc).__name__}: {_one_line(exc)}"
                log(f"    {m:<11} seed {seed}: FAILED: {row['reason']}")
                traceback.print_exc(file=sys.stderr)
            rows.append(row)
            if on_row is not None:
                on_row(rows)
    return rows


def _written_by_stmorph(path: Path) -> bool:
    """Whether ``path`` is a benchmark.csv/benchmark.md this module wrote (its header line)."""
    try:
        with open(path, encoding="utf-8") as f:
            first = f.readline().rstrip("\r\n")
    except (OSError, UnicodeDecodeError):
        return False
    return first == (",".join(CSV_COLUMNS) if path.suffix == ".csv" else "# stmorph benchmark")


def _one_line(exc: BaseException) -> str:
    s = " ".join(str(exc).split())
    return s if len(s) <= 300 else s[:297] + "..."


def _row(section, method, seed, *, status="", reason="", n_spots=np.nan, n_clusters=np.nan) -> dict:
    return {"section": section, "method": method, "seed": seed, "ARI": np.nan, "NMI": np.nan, "seconds": np.nan,
            "status": status, "n_spots": n_spots, "n_clusters": n_clusters, "reason": reason}


def _atomic_write(path: Path, text: str) -> None:
    atomic_write(path, lambda p: Path(p).write_text(text, encoding="utf-8"))


def _write(rows: list[dict], out_dir: Path | None, meta: dict) -> None:
    if out_dir is None:
        return
    df = pd.DataFrame(rows, columns=CSV_COLUMNS)
    _atomic_write(out_dir / "benchmark.csv", df.to_csv(index=False, float_format="%.6g"))
    _atomic_write(out_dir / "benchmark.md", benchmark_markdown(df, **meta))


def _fmt(values: pd.Series) -> str:
    v = values.dropna().to_numpy(dtype=float)
    if v.size == 0:
        return "-"
    if v.size == 1:
        return f"{v[0]:.3f}"
    return f"{v.mean():.3f} ± {v.std(ddof=1):.3f}"


def summarize(df: pd.DataFrame, metric: str = "ARI") -> pd.DataFrame:
    """Per method: mean and median over sections of the per-section mean, and mean seconds per run."""
    ok = df[df["status"] == "ok"]
    per_sec = ok.groupby(["method", "section"], sort=False)[metric].mean()
    methods = list(dict.fromkeys(df["method"]))
    rows = []
    for m in methods:
        v = per_sec.loc[m] if m in per_sec.index.get_level_values(0) else pd.Series(dtype=float)
        secs = ok.loc[ok["method"] == m, "seconds"]
        rows.append({"method": m, "sections": int(v.size), f"mean {metric}": v.mean() if v.size else np.nan,
                     f"median {metric}": v.median() if v.size else np.nan,
                     "mean seconds": secs.mean() if secs.size else np.nan})
    return pd.DataFrame(rows)


def benchmark_markdown(df: pd.DataFrame, *, methods=None, seeds=None, ignore=None, command=None, sections=None,
                       machine: str | None = None, code: str | None = None, peers: pd.DataFrame | None = None,
                       peers_source: str | None = None) -> str:
    """The ``benchmark.md`` text: per-section tables (mean ± sd across seeds), per-method summary, skips."""
    methods = list(methods or dict.fromkeys(df["method"]))
    secs = list(dict.fromkeys(df["section"]))
    n_seeds = len(seeds) if seeds is not None else df["seed"].nunique()
    lines = ["# stmorph benchmark", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    if machine:
        lines += [f"Machine: {machine}", ""]
    if code:
        lines += [f"Code: {code}", ""]
    lines += [
        f"Seeds: {n_seeds} ({', '.join(map(str, seeds)) if seeds is not None else ''}); "
        f"cluster count per section = number of distinct scored labels; "
        f"labels ignored in scoring: {', '.join(ignore) if ignore else 'none'} (and unlabelled spots).",
        "Cells: mean ± sd across seeds (a single value when one seed ran).",
        "Each section is read once; work the runner caches in the AnnData (image features) is done by the first "
        "run that needs it and reused by later methods and seeds, so its time counts once, in that first run.", "",
    ]
    if sections:
        lines += ["Sections found: " + "; ".join(sections), ""]
    notes: dict[str, int] = {}

    def cell(sub: pd.DataFrame, metric: str) -> str:
        if sub.empty:
            return "not run"
        ok = sub[sub["status"] == "ok"]
        if ok.empty:
            reason = sub["reason"].iloc[0] or sub["status"].iloc[0]
            key = f"{sub['status'].iloc[0]}: {reason}"
            if key not in notes:
                notes[key] = len(notes) + 1
            return f"{sub['status'].iloc[0]} [{notes[key]}]"
        s = _fmt(ok[metric])
        if len(ok) < len(sub):
            s += f" ({len(sub) - len(ok)} run(s) not ok)"
        return s

    for metric in ("ARI", "NMI"):
        lines += [f"## {metric} per section", ""]
        lines += ["| section | spots | clusters | " + " | ".join(methods) + " |",
                  "|---|---:|---:|" + "---:|" * len(methods)]
        for s in secs:
            sub = df[df["section"] == s]
            n_sp = sub["n_spots"].dropna()
            n_cl = sub["n_clusters"].dropna()
            lines.append(
                f"| {s} | {int(n_sp.iloc[0]) if len(n_sp) else '-'} | {int(n_cl.iloc[0]) if len(n_cl) else '-'} | "
                + " | ".join(cell(sub[sub["method"] == m], metric) for m in methods) + " |"
            )
        lines.append("")
    lines += ["## Summary per method", "",
              "Mean and median over sections of the per-section mean across seeds; seconds = mean wall time "
              "of one run as reported by the runner.", "",
              "| method | sections | mean ARI | median ARI | mean NMI | median NMI | mean seconds |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    sa, sn = summarize(df, "ARI"), summarize(df, "NMI")
    for m in methods:
        a = sa[sa["method"] == m]
        n = sn[sn["method"] == m]
        if a.empty:
            continue
        a, n = a.iloc[0], n.iloc[0]
        lines.append(f"| {m} | {a['sections']} | {_num(a['mean ARI'])} | {_num(a['median ARI'])} | "
                     f"{_num(n['mean NMI'])} | {_num(n['median NMI'])} | {_num(a['mean seconds'], 1)} |")
    lines.append("")
    if peers is not None:
        table = peers_markdown(df, peers, methods, source=peers_source or "peers")
        if table:
            lines += [table]
    if notes:
        lines += ["## Notes", ""] + [f"[{i}] {k}" for k, i in notes.items()] + [""]
    return "\n".join(lines)


def _num(x, nd: int = 3) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def read_peers(path: str | os.PathLike) -> pd.DataFrame:
    """Peers' ARIs from a markdown table such as ``../shared/docs/peers.md``.

    The first table whose header starts with ``section`` is read: a row label like
    ``HER2ST A1 (5)`` or ``DLPFC 151673 (7)`` becomes the section name ``her2st/A1`` /
    ``dlpfc/151673`` (rows that name no single section, e.g. means, are left out);
    each cell's first number is the peer's ARI (bold marks and notes are ignored).
    Returns columns ``section, peer, ARI``.
    """
    import re

    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        msg = f"cannot read the peers file ({exc.strerror or exc})."
        raise InputError(msg, path) from exc
    rows: list[dict] = []
    header = None
    for line in lines:
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.strip().startswith("|") else None
        if cells is None:
            if header is not None and rows:
                break
            header = None if header is None or not line.strip() else header
            continue
        if header is None:
            if cells[0].lower().startswith("section"):
                header = cells
            continue
        if set(cells[0]) <= set("-: "):
            continue
        m = re.match(r"^\*?\*?([A-Za-z0-9]+)\s+([A-Za-z0-9]+)\s*\(\d+\)", cells[0])
        if not m:
            continue
        section = f"{m.group(1).lower()}/{m.group(2)}"
        for peer, cell in zip(header[1:], cells[1:]):
            num = re.search(r"-?\d+\.\d+", cell)
            if num:
                rows.append({"section": section, "peer": peer, "ARI": float(num.group())})
    if not rows:
        msg = "no table with a 'section' column and per-section rows such as 'HER2ST A1 (5)' found."
        raise InputError(msg, path)
    return pd.DataFrame(rows, columns=["section", "peer", "ARI"])


def peers_markdown(df: pd.DataFrame, peers: pd.DataFrame, methods: Sequence[str] | None = None,
                   source: str = "peers") -> str:
    """A table of stmorph's methods (mean ARI over seeds) beside the peers' ARI on the same sections,
    with the best peer per section and a mean over the sections both cover."""
    ok = df[df["status"] == "ok"]
    ours = ok.groupby(["section", "method"])["ARI"].mean().unstack("method")
    methods = [m for m in (methods or list(dict.fromkeys(df["method"]))) if m in ours.columns]
    theirs = peers.pivot_table(index="section", columns="peer", values="ARI", aggfunc="first")
    sections = [s for s in ours.index if s in theirs.index]
    if not sections or not methods:
        return ""
    names = list(dict.fromkeys(peers["peer"]))
    lines = [f"## Beside the peers ({source})", "",
             "ARI, mean over seeds for stmorph's methods; the peers' figures are quoted from the file named above "
             "(their protocol: same sections, k = number of scored labels). Best of each row in bold.", "",
             "| section | " + " | ".join(methods) + " | " + " | ".join(names) + " |",
             "|---|" + "---:|" * (len(methods) + len(names))]
    for sec in sections:
        vals = [ours.loc[sec].get(m, np.nan) for m in methods] + [theirs.loc[sec].get(p, np.nan) for p in names]
        best = np.nanmax(vals) if np.isfinite(vals).any() else np.nan
        cells = [("**" + _num(v) + "**") if np.isfinite(v) and v == best else _num(v) for v in vals]
        lines.append(f"| {sec} | " + " | ".join(cells) + " |")
    groups: dict[str, list[str]] = {}
    for sec in sections:
        groups.setdefault(sec.split("/")[0], []).append(sec)
    for g, secs in groups.items():
        vals = [float(ours.loc[secs, m].mean()) if m in ours.columns and ours.loc[secs, m].notna().all() else np.nan
                for m in methods]
        vals += [float(theirs.loc[secs, p].mean()) if p in theirs.columns and theirs.loc[secs, p].notna().all()
                 else np.nan for p in names]
        best = np.nanmax(vals) if np.isfinite(vals).any() else np.nan
        cells = [("**" + _num(v) + "**") if np.isfinite(v) and v == best else _num(v) for v in vals]
        lines.append(f"| mean of {g} ({len(secs)}) | " + " | ".join(cells) + " |")
    return "\n".join(lines + [""])
