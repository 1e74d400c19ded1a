"""Peer methods at their documented settings on the annotated sections, scored like ``stmorph benchmark``.

``bash benchmarks/peers/run.sh`` makes ``.peers-venv`` if needed and runs this file with it; by hand::

    OMP_NUM_THREADS=1 benchmarks/peers/.peers-venv/bin/python benchmarks/peers/run_peers.py --data ../shared/data
    benchmarks/peers/.peers-venv/bin/python benchmarks/peers/run_peers.py --table

By default every peer runs on every section except STAGATE and GraphST on Visium sections (``--heavy`` adds
them).

Each (section, method, seed) appends one row to the CSV as soon as it is done; rows already there are skipped,
so an interrupted run picks up where it stopped (``--force`` reruns them). Sections are read with
:func:`stmorph.ev._benchmark.find_sections` / ``load_section``; the number of clusters is the number of scored
labels (:func:`stmorph.ev._metrics.scored_labels`), and ARI / NMI are taken on the scored spots.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import importlib
import io
import os
import platform
import random
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
DEFAULT_OUT = HERE / "results.csv"
FIELDS = ["section", "method", "seed", "k", "ari", "nmi", "seconds", "machine", "stmorph_git", "date", "error"]
METHODS = ("banksy", "banksy_visium", "stagate", "graphst")


# --- the peers --------------------------------------------------------------------------------------------------
# Each takes an AnnData of raw counts with obsm["spatial"], the number of clusters and a seed, and returns one
# label per spot (in adata.obs_names order).


def banksy(adata, n_clusters: int, seed: int) -> np.ndarray:
    """pybanksy 1.3.5 with its own defaults: library-size normalised data (no log), 2000 HVGs (seurat flavour, on
    a log1p copy), k_geom 15, scaled_gaussian decay, AGF max_m 1, lambda 0.2 (its quick start), 20 PCs, Leiden on
    50 shared nearest neighbours with the package's resolution search to ``n_clusters`` (``max_labels``)."""
    import scanpy as sc
    from banksy_utils.filter_utils import filter_hvg

    sc.pp.normalize_total(adata)
    adata, _ = filter_hvg(adata, n_top_genes=2000, flavor="seurat")
    return _banksy_cluster(adata.copy(), n_clusters, seed, k_geom=15, max_m=1, lambda_=0.2)


def banksy_visium(adata, n_clusters: int, seed: int) -> np.ndarray:
    """BANKSY as the authors' DLPFC vignette (R Banksy, "Multi-sample analysis (10x Visium Human DLPFC)") sets it,
    run with pybanksy: counts scaled to 5000 per spot (no log), 2000 HVGs (vst, seurat_v3 here), k_geom 6 (the
    first ring of Visium neighbours), no AGF (max_m 0), lambda 0.2, 20 PCs, Leiden on 50 neighbours with the
    resolution searched to ``n_clusters`` (the vignette's fixed resolution 0.7 and optional label smoothing are
    not used)."""
    import scanpy as sc

    sc.pp.highly_variable_genes(adata, flavor="seurat_v3", n_top_genes=2000)
    adata = adata[:, adata.var["highly_variable"]].copy()
    sc.pp.normalize_total(adata, target_sum=5000)
    return _banksy_cluster(adata, n_clusters, seed, k_geom=6, max_m=0, lambda_=0.2)


def _banksy_cluster(adata, n_clusters: int, seed: int, *, k_geom: int, max_m: int, lambda_: float) -> np.ndarray:
    from banksy.cluster_methods import run_Leiden_partition
    from banksy.embed_banksy import generate_banksy_matrix
    from banksy.initialize_banksy import initialize_banksy
    from banksy_utils.umap_pca import pca_umap

    adata.obs["x"], adata.obs["y"] = adata.obsm["spatial"][:, 0], adata.obsm["spatial"][:, 1]
    bdict = initialize_banksy(adata, ("x", "y", "spatial"), num_neighbours=k_geom, nbr_weight_decay="scaled_gaussian",
                              max_m=max_m, plt_edge_hist=False, plt_nbr_weights=False, plt_agf_angles=False,
                              plt_theta=False)
    bdict, _ = generate_banksy_matrix(adata, bdict, [lambda_], max_m=max_m)
    pca_umap(bdict, pca_dims=[20], plt_remaining_var=False, add_umap=False)
    results, _ = run_Leiden_partition(bdict, resolutions=[], num_nn=50, num_iterations=-1, partition_seed=seed,
                                      match_labels=False, max_labels=n_clusters)
    return np.asarray(results.iloc[0]["labels"].dense)


def _mclust_eee(x: np.ndarray, n_clusters: int) -> np.ndarray:
    """mclust's EEE model (tied full covariance, hierarchical initialisation) via pymclustr, as ``mclust_R``."""
    from mclust_py import Mclust

    fit = Mclust(np.asarray(x, dtype=np.float64), G=n_clusters, model_names=["EEE"])
    return np.asarray(fit.classification)


def stagate(adata, n_clusters: int, seed: int) -> np.ndarray:
    """stagate-modern (STAGATE_pyG) as its DLPFC tutorial: 3000 seurat_v3 HVGs, normalize_total 1e4, log1p,
    radius graph (150 px on Visium; 1.5 spot spacings, 8 neighbours, on the legacy ST grid), train_STAGATE
    defaults (hidden [512, 30], 1000 epochs, lr 1e-3), mclust EEE on the 30-d embedding."""
    import scanpy as sc
    import STAGATE_pyG as STAGATE

    sc.pp.highly_variable_genes(adata, flavor="seurat_v3", n_top_genes=3000)
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    STAGATE.Cal_Spatial_Net(adata, rad_cutoff=_stagate_radius(adata))
    adata = STAGATE.train_STAGATE(adata, random_seed=seed, verbose=False, device="cpu")
    return _mclust_eee(adata.obsm["STAGATE"], n_clusters)


def _stagate_radius(adata) -> float:
    if adata.uns.get("peers_layout") == "visium":
        return 150.0
    from sklearn.neighbors import NearestNeighbors

    xy = adata.obsm["spatial"]
    d, _ = NearestNeighbors(n_neighbors=2).fit(xy).kneighbors(xy)
    return 1.5 * float(np.median(d[:, 1]))


def graphst(adata, n_clusters: int, seed: int) -> np.ndarray:
    """graphst-modern 1.1.1 with its defaults (3000 seurat_v3 HVGs, 3-NN graph, 600 epochs, datatype 10X), then
    ``clustering(method="mclust")``: PCA 20 of the embedding, mclust EEE (pymclustr in place of R's mclust);
    ``refinement=True`` (radius 50) on Visium as its DLPFC tutorial, the function's default (no refinement)
    elsewhere."""
    from GraphST import utils as gutils
    from GraphST.GraphST import GraphST
    from sklearn.decomposition import PCA

    model = GraphST(adata, device="cpu", random_seed=seed)
    adata = model.train()
    emb = PCA(n_components=20, random_state=42).fit_transform(adata.obsm["emb"].copy())
    labels = _mclust_eee(emb, n_clusters)
    if adata.uns.get("peers_layout") == "visium":
        adata.obs["domain"] = labels.astype(str)
        labels = np.asarray(gutils.refine_label(adata, 50, key="domain"))
    return labels


PEERS = {"banksy": banksy, "banksy_visium": banksy_visium, "stagate": stagate, "graphst": graphst}
# methods written for one kind of section only
LAYOUTS = {"banksy_visium": {"visium"}}
# long on 2 CPU cores (tens of minutes per run): only with --heavy
HEAVY = {("stagate", "visium"), ("graphst", "visium")}
# imported before the clock starts, so a run's seconds do not include loading its package
IMPORTS = {"banksy": ["banksy.embed_banksy", "banksy.cluster_methods", "banksy_utils.umap_pca"],
           "banksy_visium": ["banksy.embed_banksy", "banksy.cluster_methods", "banksy_utils.umap_pca"],
           "stagate": ["STAGATE_pyG", "mclust_py"], "graphst": ["GraphST.GraphST", "mclust_py"]}


# --- running and scoring ----------------------------------------------------------------------------------------


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    return f"{cpu}; {os.cpu_count()} cores; OMP_NUM_THREADS={threads}"


def _git() -> str:
    try:
        rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + ("-dirty" if dirty else "")


def _done(out: Path) -> set[tuple[str, str, str]]:
    if not out.is_file():
        return set()
    with out.open(newline="") as fh:
        return {(r["section"], r["method"], r["seed"]) for r in csv.DictReader(fh) if not r.get("error")}


def _append(out: Path, row: dict) -> None:
    new = not out.is_file() or out.stat().st_size == 0
    with out.open("a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=FIELDS, lineterminator="\n")
        if new:
            w.writeheader()
        w.writerow(row)


def run_one(method: str, adata, n_clusters: int, seed: int) -> tuple[np.ndarray, float]:
    """Labels of one peer run (quiet) and its wall time in seconds."""
    work = adata.copy()
    # global seeds too: pybanksy's PCA (scikit-learn, randomized solver, no random_state) draws from numpy's
    random.seed(seed)
    np.random.seed(seed)
    start = time.perf_counter()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        labels = PEERS[method](work, n_clusters, seed)
    return np.asarray(labels).astype(str), time.perf_counter() - start


def run(data: Path, methods, seeds, out: Path, only=None, force=False, heavy=False) -> None:
    import torch
    from stmorph.ev._benchmark import find_sections, load_section
    from stmorph.ev._metrics import ari, nmi, scored_labels

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1") or 1))
    for method in methods:
        for module in IMPORTS[method]:
            importlib.import_module(module)
    done = set() if force else _done(out)
    machine, git = _machine(), _git()
    sections = [s for s in find_sections(data) if not only or any(o in s.name for o in only)]
    for section in sections:
        todo = [(m, s) for m in methods for s in seeds if (section.name, m, str(s)) not in done
                and section.layout in LAYOUTS.get(m, {section.layout})
                and (heavy or (m, section.layout) not in HEAVY)]
        if not todo:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            adata = load_section(section)
        adata.uns["peers_layout"] = section.layout
        k = int(scored_labels(adata).nunique())
        for method, seed in todo:
            row = {"section": section.name, "method": method, "seed": seed, "k": k, "machine": machine,
                   "stmorph_git": git, "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
            try:
                labels, seconds = run_one(method, adata, k, seed)
                adata.obs["peer"] = labels
                row.update(ari=f"{ari(adata, 'peer'):.4f}", nmi=f"{nmi(adata, 'peer'):.4f}", seconds=f"{seconds:.1f}",
                           error="")
            except Exception as err:  # a peer that fails is recorded, the others go on
                row.update(ari="", nmi="", seconds="", error=f"{type(err).__name__}: {err}"[:300])
            _append(out, row)
            print(f"{row['section']:>16} {method:>8} seed {seed}: ARI {row['ari'] or '-':>7} NMI {row['nmi'] or '-':>7}"
                  f" {row['seconds'] or '-':>7} s {row['error']}", flush=True)


def table(out: Path) -> str:
    """Markdown table: mean ± sd of ARI (NMI, seconds) over seeds, per section and method, then the mean of the
    section means per data set and method."""
    import pandas as pd

    df = pd.read_csv(out, dtype={"error": str})
    df = df[df["error"].isna() | (df["error"] == "")]
    df = df.drop_duplicates(["section", "method", "seed"], keep="last")
    g = df.groupby(["section", "method"])
    s = g.agg(k=("k", "first"), n=("seed", "size"), ari=("ari", "mean"), ari_sd=("ari", "std"), nmi=("nmi", "mean"),
              nmi_sd=("nmi", "std"), sec=("seconds", "mean")).reset_index()
    lines = ["| section (k) | method | seeds | ARI mean ± sd | NMI mean ± sd | s per run |", "|---|---|---|---|---|---|"]
    for r in s.itertuples():
        sd = lambda v: f"{0 if np.isnan(v) else v:.3f}"  # noqa: E731
        lines.append(f"| {r.section} ({r.k}) | {r.method} | {r.n} | {r.ari:.3f} ± {sd(r.ari_sd)} | "
                     f"{r.nmi:.3f} ± {sd(r.nmi_sd)} | {r.sec:.0f} |")
    # mean of the section means, per data set (the folder above the section) and method
    s["data"] = s["section"].str.rsplit("/", n=1).str[0]
    for (data, method), d in s.groupby(["data", "method"]):
        if len(d) > 1:
            lines.append(f"| **{data}, mean of {len(d)} sections** | {method} | {d['n'].min()} | **{d['ari'].mean():.3f}** | "
                         f"{d['nmi'].mean():.3f} | {d['sec'].mean():.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data", help="folder of sections")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--seeds", type=int, default=3, help="seeds 0 .. n-1")
    p.add_argument("--only", nargs="+", help="sections whose name contains one of these (e.g. her2st, 151673)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--force", action="store_true", help="rerun rows already in the CSV")
    p.add_argument("--heavy", action="store_true", help="also STAGATE and GraphST on Visium sections (long on CPU)")
    p.add_argument("--table", action="store_true", help="print the markdown table of --out and exit")
    args = p.parse_args(argv)
    if args.table:
        print(table(args.out))
        return 0
    run(args.data, args.methods, list(range(args.seeds)), args.out, only=args.only, force=args.force,
        heavy=args.heavy)
    print(table(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
