"""Estimate the wall time of one STAGATE / GraphST run at its default epochs, from two short runs.

Each peer is trained with ``a`` and ``b`` epochs (everything else as in ``run_peers.py``); the time per epoch is
``(t_b - t_a) / (b - a)`` and the estimate for the default is ``t_a + (default - a) * per_epoch``::

    OMP_NUM_THREADS=1 benchmarks/peers/.peers-venv/bin/python benchmarks/peers/time_heavy.py --only 151673
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import run_peers

DEFAULT_EPOCHS = {"stagate": 1000, "graphst": 600}


def _patched(method: str, epochs: int):
    """The peer's function of run_peers with its training epochs set to ``epochs``."""
    if method == "stagate":
        import STAGATE_pyG

        train = STAGATE_pyG.train_STAGATE
        STAGATE_pyG.train_STAGATE = lambda adata, **kw: train(adata, n_epochs=epochs, **kw)
        return run_peers.stagate, lambda: setattr(STAGATE_pyG, "train_STAGATE", train)
    import GraphST.GraphST as gmod

    cls = gmod.GraphST

    class Short(cls):
        def __init__(self, *args, **kw):
            super().__init__(*args, epochs=epochs, **kw)

    gmod.GraphST = Short
    return run_peers.graphst, lambda: setattr(gmod, "GraphST", cls)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=run_peers.ROOT.parent / "shared" / "data")
    p.add_argument("--only", default="151673", help="section whose name contains this")
    p.add_argument("--methods", nargs="+", default=["stagate", "graphst"], choices=list(DEFAULT_EPOCHS))
    p.add_argument("--epochs", nargs=2, type=int, default=[10, 40], metavar=("A", "B"))
    args = p.parse_args(argv)

    from stmorph.ev._benchmark import find_sections, load_section
    from stmorph.ev._metrics import scored_labels

    section = next(s for s in find_sections(args.data) if args.only in s.name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adata = load_section(section)
    adata.uns["peers_layout"] = section.layout
    k = int(scored_labels(adata).nunique())
    for method in args.methods:
        times = []
        for epochs in args.epochs:
            fn, undo = _patched(method, epochs)
            run_peers.PEERS[method] = fn
            try:
                _, seconds = run_peers.run_one(method, adata, k, seed=0)
            finally:
                undo()
            times.append(seconds)
        (a, b), (ta, tb) = args.epochs, times
        per_epoch = (tb - ta) / (b - a)
        total = ta + (DEFAULT_EPOCHS[method] - a) * per_epoch
        print(f"{section.name} {method}: {a} epochs {ta:.1f} s, {b} epochs {tb:.1f} s -> {per_epoch:.2f} s per epoch,"
              f" about {total:.0f} s ({total / 60:.1f} min) at the default {DEFAULT_EPOCHS[method]} epochs",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
