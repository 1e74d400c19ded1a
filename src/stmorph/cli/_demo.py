"""``stmorph demo --out DIR``: every method on built-in synthetic tissue, end to end.

Generates a synthetic Visium-like section (named ``demo``) with a full-resolution
H&E-like image, writes it as a Space Ranger ``outs/`` folder under ``DIR/input``,
reads it back like any user's data and runs the methods on it, writes the outputs
of ``stmorph run`` and DIR/report.html, then prints each method's ARI against the
synthetic truth and, last, the report's path.
"""

from __future__ import annotations

import time
from pathlib import Path

from ._run import (add_common_options, check_report_options, execute, input_paths, method_choices, method_options,
                   progress_printer, resolve_methods, summary, warnings_once)

#: The synthetic section's name (its library id: the report's title).
SECTION = "demo"


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="run every method on built-in synthetic tissue and write its report",
                       description=__doc__)
    p.add_argument("--out", "-o", required=True, help="output folder (must not exist unless --force)")
    p.add_argument("--n-spots", type=int, default=2000, help="spots in the synthetic section (default 2000)")
    p.add_argument("--method", "-m", action="append", choices=method_choices(),
                   default=None, help="method(s) to run (default: all)")
    add_common_options(p, report=True)
    p.set_defaults(func=main)


def main(args) -> int:
    from .. import __version__, datasets, read
    from .._outputs import atomic_dir, check_writable

    t_start = time.perf_counter()
    out = Path(args.out)
    inputs = input_paths(args)
    check_writable(args.out, force=args.force, inputs=inputs)
    check_report_options(args)
    methods = resolve_methods(args.method or ["all"])
    options = method_options(args, methods)
    say = progress_printer(args.quiet)
    timings = {}
    seen: list[str] = []
    with atomic_dir(out, force=args.force, inputs=inputs) as tmp:
        with warnings_once(seen, show=not args.quiet):
            say(f"synthetic tissue: {args.n_spots} spots ...")
            t0 = time.perf_counter()
            tissue = datasets.synthetic(args.n_spots, random_state=args.seed)
            timings["synthetic"] = time.perf_counter() - t0
            say("writing it as a Space Ranger folder ...")
            t0 = time.perf_counter()
            datasets.write_visium(tissue, tmp / "input")
            timings["write_input"] = time.perf_counter() - t0
            del tissue
            t0 = time.perf_counter()
            adata = read.visium(tmp / "input", image=tmp / "input" / "image.tif", library_id=SECTION)
            timings["read"] = time.perf_counter() - t0
        info = {"command": "stmorph demo", "stmorph_version": __version__, "input": "synthetic",
                "n_spots_requested": args.n_spots, "timings_s": timings, "warnings": seen}
        # the input is read from the temporary folder while the run is in progress; the
        # outputs record where it will live once the folder is renamed into place
        info = execute(adata, methods, tmp, options, info, plot=not args.no_plot,
                       quiet=args.quiet, rebase=(str(tmp), str(out.resolve())), report=args.report,
                       gene_sets=args.gene_sets)
    if not args.quiet:
        print(summary(info, out, total_s=time.perf_counter() - t_start))
    return 0
