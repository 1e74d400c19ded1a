"""Slide fill read as glass (``im.features(fill="glass")``) against pixels as read (``fill=None``).

Prints, for HER2ST A1 (its H&E background is painted black) in ``../shared/data``:

1. ``--ari``: ARI of the ``image`` method (spot patch), of ``stmorph`` with the image, and of
   ``stmorph``'s image block alone (spot + context features -> image_context_embedding -> tied
   Gaussian mixture + refinement), for ``--seeds`` seeds, with features computed once per fill
   option (cache off) and k = number of scored labels, ``undetermined`` ignored;
2. ``--pixels``: for black-fill thresholds 4..40, how many pixels the rule would paint: on A1, those
   lying more than 3 px from the exact-black fill (tissue); on A1 re-encoded as JPEG (quality 75 and
   90), the share of the fill it misses; on the full-resolution JPEGs C2 and B4 (real glass, no
   black fill), every pixel it would paint.

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_glass_fill.py --ari --seeds 10
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_glass_fill.py --pixels
"""

from __future__ import annotations

import argparse
import io
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
THRESHOLDS = (4, 8, 12, 16, 20, 24, 32, 40)


def _a1():
    from stmorph.ev import _benchmark as bm

    sec = next(s for s in bm.find_sections(DATA) if s.name == "her2st/A1")
    return sec, bm.load_section(sec)


def ari(seeds: int) -> None:
    from sklearn.metrics import adjusted_rand_score

    import stmorph as st
    from stmorph.tl import run_methods
    from stmorph.tl._cluster import cluster
    from stmorph.tl._stmorph import DEFAULTS, SIGMAS_UM, image_context_embedding

    sec, base = _a1()
    lab = base.obs["annotation"].astype(object)
    keep = (lab.notna() & (lab != "undetermined")).to_numpy()
    k = int(lab[keep].nunique())
    res: dict[tuple[str, str], list[float]] = {}
    for fill in (None, "glass"):
        a = base.copy()
        st.im.features(a, patch=("spot", "6spacing"), key_added=("X_image", "X_image_context"), image=str(sec.image),
                       fill=fill, cache=False, progress=False)
        for seed in range(seeds):
            for m in ("image", "stmorph"):
                b = a.copy()
                run_methods(b, [m], n_clusters=k, random_state=seed, progress=False, image=str(sec.image))
                res.setdefault((m, str(fill)), []).append(adjusted_rand_score(lab[keep], b.obs[m][keep]))
            b = a.copy()
            image_context_embedding(b, use_reps=("X_image", "X_image_context"), sigmas_um=SIGMAS_UM,
                                    random_state=seed)
            cluster(b, "X_stmorph_image", key_added="img", method="gmm", n_clusters=k, n_init=DEFAULTS["n_init"],
                    refine=True, random_state=seed)
            res.setdefault(("stmorph image block alone", str(fill)), []).append(
                adjusted_rand_score(lab[keep], b.obs["img"][keep]))
    print(f"## HER2ST A1, {seeds} seeds, k = {k}\n")
    print("| method | fill=None: mean ± sd (median) | fill='glass': mean ± sd (median) | seeds glass > None |")
    print("|---|---:|---:|---:|")
    for m in ("image", "stmorph", "stmorph image block alone"):
        n, g = np.array(res[m, "None"]), np.array(res[m, "glass"])
        print(f"| {m} | {n.mean():.3f} ± {n.std(ddof=1):.3f} ({np.median(n):.3f}) | "
              f"{g.mean():.3f} ± {g.std(ddof=1):.3f} ({np.median(g):.3f}) | {int((g > n).sum())} of {seeds} |")
    for m in ("stmorph",):
        print(f"\n{m} per seed, None: {' '.join(f'{v:.3f}' for v in res[m, 'None'])}")
        print(f"{m} per seed, glass: {' '.join(f'{v:.3f}' for v in res[m, 'glass'])}")


def pixels() -> None:
    from PIL import Image
    from scipy import ndimage as ndi

    Image.MAX_IMAGE_PIXELS = None
    sec, _ = _a1()
    a = np.asarray(Image.open(sec.image).convert("RGB"))
    black = a.max(2) == 0
    near = ndi.binary_dilation(black, iterations=3)
    mx = a.max(2)
    print(f"A1: {black.sum()} fill pixels ({black.mean():.1%}), {(~near).sum()} pixels > 3 px from the fill\n")
    print("| threshold | A1 pixels painted > 3 px from fill | JPEG q75 fill missed | JPEG q90 fill missed "
          "| C2 painted | B4 painted |")
    print("|---:|---:|---:|---:|---:|---:|")
    jpeg = {}
    for q in (75, 90):
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, "JPEG", quality=q)
        jpeg[q] = np.asarray(Image.open(buf)).max(2)
    whole = {}
    for name, rel in (("C2", "her2st/ST-imgs/C/C2/5714_HE_BT_C2.jpg"), ("B4", "her2st/ST-imgs/B/B4/BT10737_D2_HE.jpg")):
        p = DATA / rel
        whole[name] = np.asarray(Image.open(p).convert("RGB")).max(2) if p.exists() else None
    for t in THRESHOLDS:
        cells = [str(int(((mx <= t) & ~near).sum()))]
        cells += [f"{(black & (jpeg[q] > t)).sum() / black.sum():.4%}" for q in (75, 90)]
        cells += ["-" if m is None else f"{int((m <= t).sum())} of {m.size / 1e6:.0f} M" for m in whole.values()]
        print(f"| {t} | " + " | ".join(cells) + " |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ari", action="store_true")
    p.add_argument("--pixels", action="store_true")
    p.add_argument("--seeds", type=int, default=10)
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    if not (DATA / "her2st").exists():
        raise SystemExit(f"{DATA}: HER2ST data not found")
    if args.pixels:
        pixels()
    if args.ari:
        ari(args.seeds)


if __name__ == "__main__":
    main()
