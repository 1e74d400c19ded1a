"""``stmorph cohort MANIFEST --out DIR``: run many sections as dask.distributed tasks.

MANIFEST is a CSV file with a header: ``section`` (the name of the section's folder in DIR) and
``input`` are required; any other column is the ``stmorph run`` option of that long name (image,
spots, labels, pixel_scale, method, n_clusters, seed ...). Relative paths are taken from the
manifest's folder. Each section's folder holds exactly what ``stmorph run`` writes; DIR also gets
cohort.csv and cohort.md. A failing section never stops the others; running again resumes
(complete sections are skipped). Exit code 1 when a section failed. With --joint the sections
are also embedded together (shared genes and PCA axes, Harmony between sections, one clustering)
so a domain's number means the same tissue in every section: DIR/joint.csv.
"""

from __future__ import annotations

import sys


def add_parser(sub) -> None:
    p = sub.add_parser("cohort", help="run many sections on a dask cluster (local or existing)",
                       description=__doc__)
    p.add_argument("manifest", help="CSV with a header: section,input[,image,spots,labels,method,n_clusters,...]")
    p.add_argument("--out", "-o", required=True, help="cohort folder (created, or resumed when it exists)")
    p.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="address of a running dask scheduler, e.g. tcp://127.0.0.1:8786 "
                        "(default: a LocalCluster of single-threaded worker processes on this machine)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="LocalCluster worker processes (default: the usable CPU cores)")
    p.add_argument("--force", action="store_true",
                   help="run every section again, replacing its folder (default: skip complete sections)")
    p.add_argument("--gpu-resource", default=None, metavar="NAME",
                   help="with --scheduler: sections that compute image features on a GPU ask for one unit of "
                        "this worker resource (GPU workers started with --resources NAME=1)")
    g = p.add_argument_group("joint domains")
    g.add_argument("--joint", action="store_true",
                   help="also find domains shared by all sections (joint embedding + batch correction): joint.csv")
    g.add_argument("--joint-method", choices=("stmorph", "expression"), default="stmorph",
                   help="joint embedding: expression with its spatial neighbourhood (stmorph, default) or alone")
    g.add_argument("--joint-clusters", type=int, default=None, metavar="K",
                   help="number of joint domains (default: the manifest's n_clusters when all sections agree, "
                        "else chosen from the data)")
    g.add_argument("--batch-correction", choices=("harmony", "none"), default="harmony",
                   help="between sections (default harmony: pip install 'stmorph[joint]')")
    g.add_argument("--theta", type=float, default=None, metavar="THETA",
                   help="Harmony's diversity penalty (default 1); raise it (2-8) when the joint run warns that the "
                        "domains follow the sections")
    g.add_argument("--joint-no-refit", action="store_true",
                   help="keep the joint mixture's labels instead of refitting each section's domains in its own "
                        "embedding, started from the joint ones")
    p.add_argument("--quiet", action="store_true", help="no progress lines or summary")
    p.set_defaults(func=main)


def main(args) -> int:
    from ..cohort import run_cohort
    from ..errors import InputError

    if args.workers is not None and args.workers < 1:
        raise InputError(f"--workers must be at least 1; got {args.workers}")
    log = None if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    if args.theta is not None and not args.theta >= 0:
        raise InputError(f"--theta must be a number >= 0; got {args.theta}")
    if args.joint_clusters is not None and args.joint_clusters < 2:
        raise InputError(f"--joint-clusters must be at least 2; got {args.joint_clusters}")
    rows = run_cohort(args.manifest, args.out, scheduler=args.scheduler, workers=args.workers,
                      force=args.force, gpu_resource=args.gpu_resource, joint=args.joint,
                      joint_method=args.joint_method, joint_clusters=args.joint_clusters,
                      batch_correction=None if args.batch_correction == "none" else args.batch_correction,
                      joint_refit=not args.joint_no_refit, joint_theta=args.theta, log=log)
    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "skipped", "failed")}
    if not args.quiet:
        print(f"stmorph cohort: {len(rows)} sections -> {args.out}: {counts['ok']} ok, "
              f"{counts['skipped']} skipped, {counts['failed']} failed (cohort.csv, cohort.md"
              f"{', joint.csv' if args.joint else ''})")
    return 1 if counts["failed"] else 0
