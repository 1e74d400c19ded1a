"""Time and size of ``report.html`` for a ``stmorph run``/``demo`` output folder.

Prints the wall and CPU time of each step of the report, the file's size and what takes the space
(viewer tiles per pyramid level, embedded figures, the rest).

Usage (from the repository root)::

    .venv/bin/stmorph demo --out /tmp/demo                 # 2,000 synthetic spots, every method
    .venv/bin/python benchmarks/bench_report.py /tmp/demo   # writes /tmp/demo/report.html (replaces it)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import sys
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="output folder of `stmorph run` / `stmorph demo`")
    ap.add_argument("--gene-sets", default=None, help="local GMT file (adds GSEA)")
    args = ap.parse_args()
    t_import = time.perf_counter()
    from stmorph import report

    print(f"import stmorph.report: {time.perf_counter() - t_import:.1f} s")
    marks: list[tuple[str, float, float]] = []

    def log(msg: str) -> None:
        marks.append((msg, time.perf_counter(), time.process_time()))

    target = Path(args.out) / "report.html"
    w0, c0 = time.perf_counter(), time.process_time()
    report.write_report(args.out, gene_sets=args.gene_sets, force=target.exists(), log=log)
    w1, c1 = time.perf_counter(), time.process_time()
    steps = [("read result.h5ad", w0, c0), *marks, ("write", w1, c1)]
    for (name, w, c), (_, w2, c2) in zip(steps, [*steps[1:], ("end", w1, c1)], strict=True):
        if name != "write":
            print(f"  {name.removeprefix('report: '):<28} {w2 - w:6.1f} s wall {c2 - c:6.1f} s CPU")
    print(f"report.html: {w1 - w0:.1f} s wall, {c1 - c0:.1f} s CPU (this process), "
          f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB, {os.cpu_count()} CPUs")
    text = target.read_text(encoding="utf-8")
    size = len(text.encode())
    m = re.search(r'<script type="application/json" id="stmorph-viewer-data">(.*?)</script>', text, re.S)
    viewer = len(m.group(1)) if m else 0
    imgs = re.findall(r'src="(data:image/[a-z]+;base64,[^"]+)"', text)
    print(f"size: {size / 1e6:.2f} MB = viewer {viewer / 1e6:.2f} MB + {len(imgs)} images "
          f"{sum(map(len, imgs)) / 1e6:.2f} MB + rest {(size - viewer - sum(map(len, imgs))) / 1e6:.2f} MB")
    if m:
        data = json.loads(m.group(1))
        print(f"viewer: {data['width']} x {data['height']} px at {data['um_per_px'] or float('nan'):.2f} um/px, "
              f"{len(data['spots']['id'])} spots, {len(data['layers'])} layers")
        for i, lv in enumerate(data["levels"]):
            kept = [t for t in lv["tiles"] if t]
            print(f"  level {i}: {lv['w']} x {lv['h']} px, {len(kept)}/{len(lv['tiles'])} tiles, "
                  f"{sum(map(len, kept)) / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
