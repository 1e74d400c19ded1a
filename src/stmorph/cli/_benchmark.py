"""``stmorph benchmark --data DIR --methods ... --seeds N --out OUT``: score methods on annotated sections.

Finds every annotated section under DIR (HER2ST layout: ST-cnts/, ST-spotfiles/,
ST-pat/lbl/, images under ST-imgs/; Space Ranger folders with
filtered_feature_bc_matrix.h5, spatial/ and labels.tsv), runs each method with
n_clusters = number of scored labels for each seed, and writes benchmark.csv
(section, method, seed, ARI, NMI, seconds, ...) and benchmark.md.
"""

from __future__ import annotations

import platform
import shlex
import sys
from pathlib import Path

from ..errors import InputError
from ..ev._benchmark import DEFAULT_METHODS
from ._options import add_method_options, given_options


def add_parser(sub) -> None:
    p = sub.add_parser("benchmark", help="ARI/NMI of every method on every annotated section under a folder",
                       description=__doc__)
    p.add_argument("--data", required=True, metavar="DIR", help="folder searched recursively for annotated sections")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), metavar="METHOD",
                   help="methods to run, each scored on its own (space or comma separated; default: all)")
    p.add_argument("--peers", default=None, metavar="FILE",
                   help="markdown table of peers' ARIs per section (e.g. ../shared/docs/peers.md): "
                        "benchmark.md then shows stmorph's methods beside them")
    p.add_argument("--seeds", type=int, default=3, metavar="N", help="seeds 0..N-1 per method (default 3)")
    p.add_argument("--out", required=True, metavar="OUT", help="folder for benchmark.csv and benchmark.md")
    p.add_argument("--sections", nargs="+", default=None, metavar="NAME",
                   help="only sections whose name contains one of these (e.g. her2st/A1 151673)")
    p.add_argument("--ignore", nargs="*", default=["undetermined"], metavar="LABEL",
                   help="labels left out of scoring and of the cluster count (default: undetermined)")
    # every method's options, as stmorph run has them; the number of domains is each section's label count
    add_method_options(p, exclude=("n_clusters",))
    p.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="run each section as a task of this running dask scheduler (as stmorph cohort does)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="run the sections on a LocalCluster of N single-threaded worker processes")
    p.add_argument("--list", action="store_true", help="only list the sections found and exit")
    p.add_argument("--force", action="store_true", help="overwrite an existing benchmark.csv/benchmark.md")
    p.set_defaults(func=main)


def _methods(values) -> list[str]:
    """Methods to score, in the order given: a method's name is that method alone (``stmic`` is not its group
    here: each baseline is scored as its own column), a group's name its members, ``all`` every method."""
    from ..tl._methods import resolve_methods

    out: list[str] = []
    for v in values:
        out += [m for part in v.split(",") if part.strip() for m in resolve_methods(part.strip())]
    return list(dict.fromkeys(out))


def machine_description() -> str:
    import os

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemTotal")).split()[1])
        mem = f", {kb / 1024**2:.0f} GiB RAM"
    except (OSError, StopIteration, ValueError):
        pass
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{platform.system()} {platform.machine()}, {cpu}, {n} CPU core(s){mem}, Python {platform.python_version()}"


def code_description() -> str:
    import subprocess

    from .. import __version__

    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "."],
                               cwd=here.parent, capture_output=True, text=True, timeout=10).stdout.strip()
        return f"stmorph {__version__} (git {sha}{', with uncommitted changes' if dirty else ''})"
    except (OSError, subprocess.SubprocessError):
        return f"stmorph {__version__}"


def main(args) -> int:
    from ..ev import _benchmark as bm

    sections = bm.find_sections(args.data)
    if args.sections:
        sections = [s for s in sections if any(o in s.name for o in args.sections)]
    if args.list:
        for s in sections:
            img = f"image {s.image}" if s.image else "no full-resolution image"
            print(f"{s.name}\t{s.layout}\t{img}\t{s.path}")
        return 0
    methods = _methods(args.methods)
    if args.seeds < 1:
        raise InputError(f"--seeds must be at least 1; got {args.seeds}")
    from ..tl._methods import check_options

    # an option none of the methods uses is refused before any work; each run gets what its method takes
    per_method = check_options(methods, given_options(args))

    def runner(adata, ms, *, n_clusters, random_state):
        from ..tl import run_methods

        options = {k: v for m in ms for k, v in per_method.get(m, {}).items()}
        return run_methods(adata, ms, n_clusters=n_clusters, random_state=random_state, progress=False, **options)

    command = "stmorph " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["benchmark"] else None
    if args.workers is not None and args.workers < 1:
        raise InputError(f"--workers must be at least 1; got {args.workers}")
    client = cluster = None
    if args.scheduler or args.workers:  # the sections as dask.distributed tasks, on stmorph cohort's engine
        from ..cohort import make_client

        client, cluster = make_client(args.scheduler, args.workers, what="stmorph benchmark --scheduler/--workers")
    try:
        df = bm.run_benchmark(sections=sections, methods=methods, seeds=args.seeds, out=args.out, ignore=args.ignore,
                              runner=runner, force=args.force, command=command, data_dir=args.data,
                              machine=machine_description(), code=code_description(), peers=args.peers, client=client)
    finally:
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()
    out = Path(args.out)
    print((out / "benchmark.md").read_text())
    print(f"wrote {out / 'benchmark.csv'} and {out / 'benchmark.md'}", file=sys.stderr)
    return 1 if (df["status"] == "failed").any() else 0
