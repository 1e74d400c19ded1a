"""``stmorph report OUT``: a self-contained report.html for the output folder of ``stmorph run``.

Reads OUT/result.h5ad and OUT/run.json and writes OUT/report.html: results first
(ARI/NMI when the section is annotated), the domains over the H&E, a zoomable
view of the H&E with every method's domains as an overlay, a card per domain of
the chosen method (size, map, Wilcoxon markers, GSEA terms with --gene-sets,
representative H&E patches), and the run's parameters last. ``stmorph run
--report`` and ``stmorph demo`` (unless ``--no-report``) write the same file in
one command.
Gene sets are read from a local GMT file only (MSigDB Hallmark/KEGG/C7 GMT
files: download them by hand from https://www.gsea-msigdb.org/gsea/msigdb/);
nothing is downloaded.
"""

from __future__ import annotations

import sys


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="write a self-contained report.html for a `stmorph run` output folder",
                       description=__doc__)
    p.add_argument("out", metavar="OUT", help="output folder of `stmorph run` (with result.h5ad and run.json)")
    p.add_argument("--gene-sets", default=None, metavar="GMT", help="local GMT file for pre-ranked GSEA per domain")
    p.add_argument("--method", default=None,
                   help="domains that get the cards, markers and GSEA (default: the run's primary method, else the "
                        "first of stmorph, senca, stmic, expression, image)")
    p.add_argument("--no-viewer", action="store_true", help="leave out the zoomable H&E view (a smaller file)")
    p.add_argument("--n-markers", type=int, default=5, help="marker genes listed per domain (default 5)")
    p.add_argument("--fdr", type=float, default=0.05, help="GSEA FDR threshold (default 0.05)")
    p.add_argument("--permutations", type=int, default=1000, help="GSEA permutations (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="GSEA permutation seed")
    p.add_argument("--force", action="store_true", help="replace an existing report.html")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=main)


def main(args) -> int:
    from ..report import write_report

    log = None if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    path = write_report(args.out, gene_sets=args.gene_sets, force=args.force, method=args.method,
                        n_markers=args.n_markers, fdr=args.fdr, permutation_num=args.permutations,
                        random_state=args.seed, viewer=not args.no_viewer, log=log)
    if not args.quiet:
        print(f"wrote {path}")
    return 0
