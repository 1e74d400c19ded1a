"""``stmorph run INPUT --method ... --out DIR``: find spatial domains in one section.

INPUT is a Space Ranger ``outs/`` folder, an ``.h5ad`` file, a SpatialData
``.zarr`` store (``--image`` then names its image element), or the counts
table of a legacy Spatial Transcriptomics section (with ``--spots`` and
optionally ``--labels``). From a SpatialData store the results also go to
DIR/result.zarr: a new store with the input's spot shapes and small images
and a table of counts and domains; the input store is never written.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
import warnings
from collections.abc import Mapping
from pathlib import Path

from ..errors import InputError
from ._options import add_method_options, given_options

#: What ``stmorph run`` runs without ``--method``.
DEFAULT_METHODS = ["stmorph"]
#: The seed's bounds: numpy, torch and h5py all take it.
MAX_SEED = 2**32 - 1


def method_choices() -> tuple[str, ...]:
    """``--method``'s choices: every registered method and group, and ``all``."""
    from ..tl import _methods

    return tuple(dict.fromkeys([*_methods.available_methods(), *_methods.method_groups(), "all"]))


def _seed(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = -1
    if not 0 <= v <= MAX_SEED:
        msg = f"must be a whole number from 0 to {MAX_SEED}; got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return v


def add_common_options(p, *, report: bool = False) -> None:
    """Options shared by ``run`` and ``demo``: the methods' own (declared where they register) and the run's.
    ``report``: whether report.html is written unless ``--no-report`` (else only with ``--report``)."""
    add_method_options(p)
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=_seed, default=0, help="random seed (same input + seed = same labels)")
    g.add_argument("--force", action="store_true", help="replace an existing output folder")
    g.add_argument("--quiet", action="store_true",
                   help="no progress lines, progress bars, warnings or summary (warnings are kept in run.json)")
    g.add_argument("--no-plot", action="store_true", help="skip spatial_domains.png")
    if report:
        g.add_argument("--no-report", dest="report", action="store_false",
                       help="skip report.html (results first, a card per domain, zoomable H&E; opens offline)")
    else:
        g.add_argument("--report", action="store_true",
                       help="also write report.html (results first, a card per domain, zoomable H&E; opens offline)")
    g.add_argument("--gene-sets", default=None, metavar="GMT",
                   help="local GMT file for pre-ranked GSEA per domain in report.html")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "run",
        help="find spatial domains in one section",
        description=__doc__,
    )
    p.add_argument("input", help="Space Ranger outs/ folder, .h5ad file, SpatialData .zarr store, or legacy ST counts (.tsv[.gz])")
    p.add_argument("--method", "-m", action="append", choices=method_choices(), default=None,
                   help="method(s) to run; repeat for several (default: stmorph; stmic includes both of its "
                        "baselines)")
    p.add_argument("--out", "-o", required=True, help="output folder (must not exist unless --force)")
    g = p.add_argument_group("input")
    g.add_argument("--image", default=None, metavar="FILE",
                   help="full-resolution H&E (TIFF/BigTIFF/pyramidal, JPEG, PNG)")
    g.add_argument("--spots", default=None, metavar="FILE", help="legacy ST: spot selection table (*_selection.tsv)")
    g.add_argument("--labels", default=None, metavar="FILE",
                   help="annotations: legacy ST *_labeled_coordinates.tsv, or a barcode<TAB>label file for Visium")
    g.add_argument("--bin-size", type=_bin_size, default=16, metavar="UM",
                   help="Visium HD: bin side in micrometres (2, 8, 16, or a multiple of one of them, re-binned; "
                        "default 16)")
    g.add_argument("--pixel-scale", type=_pixel_scale, default=1.0,
                   help="legacy ST: factor from the spot table's pixels to the given image's pixels, "
                        "or 'auto' (scalefactors.json beside the image)")
    add_common_options(p)
    p.set_defaults(func=main)


def _bin_size(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value <= 0:
        msg = f"expected a whole number of micrometres (2, 8, 16, 32 ...), got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return value


def _pixel_scale(text: str):
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        import argparse

        msg = f"expected a positive number or 'auto', got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return value


def resolve_methods(chosen: list[str] | None) -> list[str]:
    from ..tl._methods import resolve_methods as resolve

    return resolve(chosen, DEFAULT_METHODS, groups_first=True)


def read_input(path: str, *, image=None, spots=None, labels=None, pixel_scale: float = 1.0, bin_size: int = 16):
    """Read INPUT by its kind: Space Ranger folder (Visium HD when it has ``binned_outputs/``), .h5ad, or legacy
    ST counts."""
    from .. import read

    p = Path(path)
    if not p.exists():
        raise InputError("no such file or folder", p)
    if p.is_dir() and p.name.lower().endswith(".zarr"):  # a SpatialData store; --image names its image element
        if spots is not None or labels is not None:
            raise InputError("--spots and --labels are not read from a SpatialData store", p)
        return read.spatialdata(p, image=Path(image).name if image is not None else None)
    if p.is_dir():
        if spots is not None:
            raise InputError("--spots is for legacy ST counts files, but INPUT is a folder", p)
        folder = p / "outs" if (p / "outs").is_dir() and not (p / "filtered_feature_bc_matrix.h5").exists() else p
        if (folder / "binned_outputs").is_dir():
            return read.visium_hd(folder, bin_size=bin_size, image=image,
                                  labels=labels if labels is not None else "auto")
        return read.visium(folder, image=image, labels=labels if labels is not None else "auto")
    name = p.name.lower()
    if name.endswith(".h5ad"):
        return read.h5ad(p, image=image)
    if name.endswith((".tsv", ".tsv.gz", ".csv", ".csv.gz", ".txt", ".txt.gz")):
        if spots is None:
            msg = "a counts table needs --spots (the *_selection.tsv of the same section)"
            raise InputError(msg, p)
        return read.legacy_st(p, spots, image=image, pixel_scale=pixel_scale, labels=labels)
    msg = "unrecognised input: give a Space Ranger outs/ folder, an .h5ad file, or legacy ST counts (.tsv.gz) with --spots"
    raise InputError(msg, p)


def method_options(args, methods: list[str]) -> dict:
    """The options ``run_methods`` gets from ``args``: those given, checked against the chosen methods (an
    option none of them uses is refused here, before any work), and the seed."""
    from ..tl._methods import check_options

    given = given_options(args)
    check_options(methods, given)
    return {**given, "random_state": args.seed}


def _rebase(obj, old: str, new: str):
    """Replace the path prefix ``old`` by ``new`` in every string of a nested structure."""
    if isinstance(obj, dict):
        return {k: _rebase(v, old, new) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rebase(v, old, new) for v in obj]
    if isinstance(obj, str) and old in obj:
        return obj.replace(old, new)
    return obj


def _from_store(adata) -> bool:
    """Whether ``adata`` was read from a SpatialData store that is still there (``stmorph run STORE.zarr``)."""
    from .._spatial import library

    try:
        origin = library(adata).get("metadata", {}).get("spatialdata") or {}
    except (InputError, KeyError):  # no or several libraries: not a section read from a store
        return False
    store = origin.get("store")
    return isinstance(store, str) and store not in ("", "None") and Path(store).is_dir()


def execute(adata, methods, out_tmp: Path, options: dict, run_info: dict, *, plot: bool, quiet: bool,
            rebase: tuple[str, str] | None = None, report: bool = False, gene_sets=None) -> dict:
    """Run the methods on ``adata`` and write every output into ``out_tmp``; returns run.json's content.

    ``rebase=(old, new)`` rewrites paths under ``old`` (inputs staged inside the
    temporary output folder) to where they will live once the folder is in place.
    The figure is drawn by :mod:`stmorph.pl` and the report built by :mod:`stmorph.report`
    here; :func:`stmorph._outputs.write_run_outputs` only writes them. Each warning is shown
    once, as it is given (unless ``quiet``), and kept in run.json's ``warnings`` (after ``run_info``'s own).
    """
    from .. import tl
    from .._outputs import package_versions, write_run_outputs

    say = progress_printer(quiet)
    seen = list(run_info.get("warnings", []))
    figures, pages = {}, {}
    with warnings_once(seen, show=not quiet):
        t0 = time.perf_counter()
        seconds = tl.run_methods(adata, methods, progress=not quiet, skip_unavailable=False, **options)
        t1 = time.perf_counter()
        image_params = dict(adata.uns.get("X_image", {}).get("params", {})) if "X_image" in adata.uns else {}
        steps_s = adata.uns["stmorph_run"]["steps_s"]
        run_info = {
            **run_info,
            "methods": methods,
            # the image is recorded where the result says it is (metadata), not a temporary path
            "parameters": {k: v for k, v in options.items() if k != "image"},
            "n_spots": int(adata.n_obs),
            "n_genes": int(adata.n_vars),
            "n_domains": {m: int(adata.obs[m].nunique()) for m in methods},
            # what each method did (its clustering, k, refinement, modalities): "parameters" above are the run's
            # options, some of which (e.g. cluster_method) only some methods use
            "method_params": {m: dict(adata.uns[m].get("params", {})) for m in methods
                              if isinstance(adata.uns.get(m), Mapping)},
            "encoder": image_params,
            "timings_s": {**run_info.get("timings_s", {}), **steps_s, "methods_total": t1 - t0},
            "methods_s": seconds,
            # steps whose output served several methods: shown once, in no method's own time
            "shared_s": {k: steps_s[k] for k in adata.uns["stmorph_run"]["shared_steps"]},
        }
        if "annotation" in adata.obs and adata.obs["annotation"].notna().any():
            from .. import ev

            run_info["ari"] = {m: ev.ari(adata, m) for m in methods}
            run_info["nmi"] = {m: ev.nmi(adata, m) for m in methods}
        if plot and methods:
            from .. import pl

            say("figure: spatial_domains.png ...")
            t2 = time.perf_counter()
            keys = (["annotation"] if "annotation" in adata.obs and adata.obs["annotation"].notna().any() else [])
            figures["spatial_domains.png"] = pl.domains(adata, [*keys, *methods])
            run_info["timings_s"]["figure"] = time.perf_counter() - t2
        if report:  # built before the rebase: the staged input image is still where the paths say
            from ..report import build_report

            t2 = time.perf_counter()
            shown = {**run_info, "warnings": list(seen), "packages": package_versions()}
            shown = _rebase(shown, *rebase) if rebase is not None else shown
            pages["report.html"] = build_report(adata, shown, gene_sets=gene_sets, log=None if quiet else say)
            run_info["timings_s"]["report"] = time.perf_counter() - t2
    run_info["warnings"] = seen
    if rebase is not None:
        for key in list(adata.uns.keys()):
            adata.uns[key] = _rebase(adata.uns[key], *rebase)
        run_info = _rebase(run_info, *rebase)
    writers = {}
    if _from_store(adata):  # a SpatialData store in, one out: the results over the same shapes and H&E
        from .._write_spatialdata import write_spatialdata

        writers["result.zarr"] = lambda p: write_spatialdata(adata, p, keys=methods)
    say("writing outputs ...")
    t2 = time.perf_counter()
    write_run_outputs(adata, out_tmp, methods, run_info, figures=figures, pages=pages, writers=writers)
    run_info["timings_s"]["write_outputs"] = time.perf_counter() - t2
    return run_info


def progress_printer(quiet: bool):
    """A function printing one progress line on stderr, or doing nothing when ``quiet``."""
    if quiet:
        return lambda message: None
    return lambda message: print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def warnings_once(seen: list[str], *, show: bool = True):
    """Inside the block every warning is shown as it is given, each message once: not again when given
    again, nor when ``seen`` already holds it. The messages are appended to ``seen`` (for run.json); with
    ``show=False`` (``--quiet``) that is all."""
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        printer = warnings.showwarning

        def once(message, category, filename, lineno, file=None, line=None):
            text = str(message)
            if text not in seen:
                seen.append(text)
                if show:
                    printer(message, category, filename, lineno, file, line)

        warnings.showwarning = once
        yield seen


def input_paths(args) -> list:
    """Every file or folder the command reads: ``--force`` never replaces a folder that is or holds one."""
    names = ("input", "image", "spots", "labels", "weights", "gene_sets")
    return [v for v in (getattr(args, n, None) for n in names) if isinstance(v, str) and v and v != "auto"]


def check_report_options(args) -> None:
    """``--gene-sets`` needs the report; a bad GMT file fails before any work."""
    if args.gene_sets is None:
        return
    if not args.report:
        msg = "--gene-sets is used by the report: add --report (stmorph run) or drop --no-report (stmorph demo)"
        raise InputError(msg, Path(args.gene_sets))
    from ..ev import load_gene_sets

    load_gene_sets(args.gene_sets)


#: Steps the commands time themselves, around the methods (shown in the summary's "other steps").
RUN_STEPS = ("synthetic", "write_input", "read", "figure", "report", "write_outputs")


def _seconds(times: Mapping[str, float]) -> str:
    return ", ".join(f"{k.replace('_', ' ')} {v:.1f} s" for k, v in times.items())


def summary(info: dict, out: Path, *, total_s: float | None = None) -> str:
    """What the command prints when it is done: each method's domains, own time and ARI; the shared steps
    (timed once, in no method's time) and the command's other steps, so that the times add up to
    ``total_s``; how many warnings were shown; the report's path last."""
    lines = [f"stmorph: {info['n_spots']} spots x {info['n_genes']} genes -> {out}"]
    width = max([11, *(len(m) for m in info["methods"])])
    for m in info["methods"]:
        ari = info.get("ari", {}).get(m)
        extra = f"  ARI {ari:.3f}" if ari is not None else ""
        lines.append(f"  {m:<{width}} {info['n_domains'][m]:>3} domains  {info['methods_s'][m]:7.1f} s{extra}")
    shared = {k: v for k, v in info.get("shared_s", {}).items() if v >= 0.05}
    if shared:
        lines.append(f"  shared steps (once, in no method's time): {_seconds(shared)}")
    timings = info.get("timings_s", {})
    other = {k: timings[k] for k in RUN_STEPS if timings.get(k, 0.0) >= 0.05}
    if other:
        lines.append(f"  other steps: {_seconds(other)}")
    if total_s is not None:
        lines.append(f"  total {total_s:.1f} s")
    n = len(info.get("warnings", []))
    if n:
        lines.append(f"  {n} warning{'s' if n > 1 else ''}, shown above and kept in run.json")
    if "report" in timings:
        lines.append(f"report: {out / 'report.html'}")
    return "\n".join(lines)


def run_section(args, command: str) -> dict:
    """What ``stmorph run`` does with its parsed ``args``: read, run the methods, write ``args.out``
    atomically (``--force`` rules as usual); returns run.json's content. ``stmorph cohort`` runs each
    section through here, so a cohort's section folders are exactly what ``stmorph run`` writes."""
    from .._outputs import atomic_dir, check_space_for, check_writable

    out = Path(args.out)
    inputs = input_paths(args)
    check_writable(args.out, force=args.force, inputs=inputs)  # before any work
    check_report_options(args)
    methods = resolve_methods(args.method)
    options = method_options(args, methods)  # an option the methods do not use: refused before any work
    t0 = time.perf_counter()
    with warnings_once(seen := [], show=not args.quiet):
        adata = read_input(args.input, image=args.image, spots=args.spots, labels=args.labels,
                           pixel_scale=args.pixel_scale, bin_size=getattr(args, "bin_size", 16))
    info = {"command": command,
            "input": str(Path(args.input).resolve()), "timings_s": {"read": time.perf_counter() - t0},
            "warnings": seen}
    from .. import __version__

    info["stmorph_version"] = __version__
    check_space_for(adata, out, methods)  # a disk too full for the outputs fails before the methods run
    with atomic_dir(out, force=args.force, inputs=inputs) as tmp:
        info = execute(adata, methods, tmp, options, info, plot=not args.no_plot, quiet=args.quiet,
                       report=args.report, gene_sets=args.gene_sets)
    return info


def main(args) -> int:
    command = "stmorph " + " ".join(sys.argv[1:]) if sys.argv else "stmorph run"
    t0 = time.perf_counter()
    info = run_section(args, command)
    if not args.quiet:
        print(summary(info, Path(args.out), total_s=time.perf_counter() - t0))
    return 0
