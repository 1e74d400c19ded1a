"""Pre-ranked gene set enrichment analysis (GSEA) per domain, offline.

Genes are ranked by the Wilcoxon score of one domain against the rest (see
:func:`stmorph.ev.markers`) and tested with ``gseapy.prerank``. Gene sets come
from a local GMT file or a dict; stmorph never downloads anything, and a gene
set *name* (which gseapy would fetch from Enrichr) is refused.

Where to get GMT files: the MSigDB collections (Hallmark ``h.all.*.symbols.gmt``,
KEGG ``c2.cp.kegg*.symbols.gmt``, immunologic signatures ``c7.all.*.symbols.gmt``)
are downloaded once, by hand, from https://www.gsea-msigdb.org/gsea/msigdb/
(free registration) and passed as a path, e.g. ``gene_sets="h.all.v2024.1.Hs.symbols.gmt"``.
Use the *symbols* files with data whose ``var_names`` are gene symbols.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import DependencyError, InputError

__all__ = ["gsea", "read_gmt", "load_gene_sets"]

GSEA_COLUMNS = ["domain", "term", "es", "nes", "pval", "fdr", "fwer", "size", "lead_genes", "significant"]


def read_gmt(path: str | os.PathLike) -> dict[str, list[str]]:
    """Read a GMT file: one gene set per line, ``name<TAB>description<TAB>gene1<TAB>gene2 ...``."""
    path = Path(path)
    if not path.is_file():
        msg = "gene set file not found (pass a local GMT file; stmorph does not download gene sets)."
        raise InputError(msg, path)
    sets: dict[str, list[str]] = {}
    with open(path, encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.rstrip("\r\n")
            if not line.strip() or line.startswith("#"):
                continue
            parts = line.split("\t")
            if len(parts) < 3:
                msg = f"line {lineno} is not GMT (need name, description and genes separated by tabs)."
                raise InputError(msg, path)
            genes = [g.strip() for g in parts[2:] if g.strip()]
            sets[parts[0].strip()] = list(dict.fromkeys(genes))
    if not sets:
        msg = "no gene set in this GMT file."
        raise InputError(msg, path)
    return sets


def load_gene_sets(gene_sets) -> dict[str, list[str]]:
    """Gene sets from a GMT path or a dict ``{name: genes}``; anything else is refused (no network)."""
    if isinstance(gene_sets, Mapping):
        out = {}
        for k, v in gene_sets.items():
            if isinstance(v, str):
                v = v.split()
            out[str(k)] = list(dict.fromkeys(str(g) for g in v))
        if not out:
            msg = "gene_sets is an empty dict."
            raise InputError(msg)
        return out
    if isinstance(gene_sets, str | os.PathLike):
        p = Path(gene_sets)
        if not p.is_file():
            msg = (
                f"gene_sets={os.fspath(gene_sets)!r} is not a file. Pass a local GMT file or a dict "
                "{name: [genes]}; stmorph never downloads gene set libraries by name. MSigDB Hallmark/KEGG/C7 "
                "GMT files can be downloaded by hand from https://www.gsea-msigdb.org/gsea/msigdb/."
            )
            raise InputError(msg)
        return read_gmt(p)
    msg = f"gene_sets must be a GMT file path or a dict of gene lists; got {type(gene_sets).__name__}."
    raise InputError(msg)


def _detected_genes(adata, layer, min_spots: int) -> pd.Index:
    from scipy import sparse

    X = adata.layers[layer] if layer is not None else adata.X
    n = np.asarray((X > 0).sum(axis=0)).ravel() if sparse.issparse(X) else (np.asarray(X) > 0).sum(axis=0)
    return adata.var_names[n >= min_spots]


def _ranking(adata, groupby: str, domain: str, *, rank_by: str, markers_key: str | None, layer,
             min_spots: int = 3) -> pd.Series:
    from ._markers import markers

    res = adata.uns.get(markers_key) if markers_key else None
    field = {"scores": "scores", "logfoldchanges": "logfoldchanges"}[rank_by]
    usable = False
    if isinstance(res, Mapping) and res.get("params", {}).get("groupby") == groupby and field in res:
        fields = getattr(getattr(res[field], "dtype", None), "names", None) or ()
        usable = domain in fields
    if usable:
        names = pd.Series(np.asarray(res["names"][domain]).astype(str))
        vals = np.asarray(res[field][domain], dtype=float)
    else:
        df = markers(adata, groupby, groups=[domain], layer=layer, key_added="_stmorph_gsea_tmp")
        adata.uns.pop("_stmorph_gsea_tmp", None)
        col = {"scores": "score", "logfoldchanges": "logfoldchange"}[rank_by]
        names, vals = df["gene"].astype(str).reset_index(drop=True), df[col].to_numpy(dtype=float)
    rnk = pd.Series(vals, index=names.to_numpy())
    rnk = rnk[np.isfinite(rnk.to_numpy())]
    if min_spots > 0:  # genes seen in almost no spot only add ties at the middle of the ranking
        detected = _detected_genes(adata, layer, min_spots)
        rnk = rnk[rnk.index.isin(detected)]
    # duplicated gene names: keep the most extreme value
    rnk = rnk.loc[rnk.abs().groupby(level=0).idxmax().to_numpy()] if rnk.index.has_duplicates else rnk
    if rnk.index.has_duplicates:
        rnk = rnk[~rnk.index.duplicated()]
    return rnk.sort_values(ascending=False)


def gsea(
    adata,
    groupby: str,
    domain,
    gene_sets,
    *,
    fdr: float = 0.05,
    rank_by: str = "scores",
    markers_key: str | None = "rank_genes_groups",
    permutation_num: int = 1000,
    min_size: int = 5,
    max_size: int = 500,
    random_state: int = 0,
    threads: int = 1,
    layer: str | None = None,
    min_spots: int = 3,
) -> pd.DataFrame:
    """Pre-ranked GSEA of one or more domains against the rest.

    Parameters
    ----------
    adata
        Raw counts in ``X`` (log-normalised on a copy when markers must be computed).
    groupby
        Column of ``adata.obs`` with the domains.
    domain
        A domain label, a list of them, or ``None`` for every domain.
    gene_sets
        Path of a local GMT file or a dict ``{name: [genes]}``. Names of online libraries are refused.
    fdr
        FDR threshold for the ``significant`` column.
    rank_by
        ``"scores"`` (Wilcoxon z-scores, default) or ``"logfoldchanges"``.
    markers_key
        Reuse ``adata.uns[markers_key]`` from :func:`stmorph.ev.markers` when it was computed with the same
        ``groupby``; otherwise the Wilcoxon test is run for the domain (``adata.uns`` is left unchanged).
    permutation_num, min_size, max_size
        As in ``gseapy.prerank`` (gene-set permutations; set size limits after matching genes).
    random_state
        Seed of the permutations.
    min_spots
        Genes detected (count > 0) in fewer spots are left out of the ranking.

    Returns
    -------
    Table with columns ``domain, term, es, nes, pval, fdr, fwer, size, lead_genes, significant``
    sorted by domain then NES (descending); ``lead_genes`` is ``;``-separated.
    """
    try:
        import gseapy
    except ImportError as exc:  # pragma: no cover - gseapy is in the [gsea] extra
        msg = 'GSEA needs gseapy: pip install "stmorph[gsea]" (or pip install gseapy).'
        raise DependencyError(msg) from exc
    if rank_by not in ("scores", "logfoldchanges"):
        msg = f"rank_by must be 'scores' or 'logfoldchanges'; got {rank_by!r}."
        raise InputError(msg)
    sets = load_gene_sets(gene_sets)
    if groupby not in adata.obs:
        msg = f"groupby {groupby!r} is not a column of adata.obs."
        raise InputError(msg)
    present = [str(x) for x in pd.unique(adata.obs[groupby].dropna().astype(str))]
    if domain is None:
        domains = sorted(present, key=_nat)
    elif isinstance(domain, str) or not isinstance(domain, Iterable):
        domains = [str(domain)]
    else:
        domains = [str(d) for d in domain]
    missing = [d for d in domains if d not in present]
    if missing:
        msg = f"domain(s) {missing} not found in obs[{groupby!r}] (have {sorted(present, key=_nat)})."
        raise InputError(msg)
    frames = []
    for d in domains:
        rnk = _ranking(adata, groupby, d, rank_by=rank_by, markers_key=markers_key, layer=layer,
                       min_spots=min_spots)
        genes = set(rnk.index)
        sizes = {k: sum(g in genes for g in v) for k, v in sets.items()}
        usable = {k: v for k, v in sets.items() if min_size <= sizes[k] <= max_size}
        if not usable:
            best = max(sizes.values()) if sizes else 0
            msg = (
                f"no gene set has between {min_size} and {max_size} genes present in the data (best overlap: "
                f"{best} genes). Check that the GMT uses the same gene identifiers as adata.var_names "
                f"(e.g. {list(rnk.index[:3])}), or lower min_size."
            )
            raise InputError(msg)
        # gseapy logs through handlers bound to sys.stderr at call time: keep its chatter out of our output
        with contextlib.redirect_stderr(io.StringIO()):
            res = gseapy.prerank(
                rnk=rnk, gene_sets=usable, outdir=None, min_size=min_size, max_size=max_size,
                permutation_num=int(permutation_num), seed=int(random_state), threads=int(threads),
                no_plot=True, verbose=False,
            )
        r = res.res2d.copy()
        out = pd.DataFrame({
            "domain": d,
            "term": r["Term"].astype(str),
            "es": pd.to_numeric(r["ES"], errors="coerce"),
            "nes": pd.to_numeric(r["NES"], errors="coerce"),
            "pval": pd.to_numeric(r["NOM p-val"], errors="coerce"),
            "fdr": pd.to_numeric(r["FDR q-val"], errors="coerce"),
            "fwer": pd.to_numeric(r["FWER p-val"], errors="coerce"),
        })
        out["size"] = out["term"].map(sizes).astype(int)
        out["lead_genes"] = r["Lead_genes"].astype(str).to_numpy()
        frames.append(out)
    df = pd.concat(frames, ignore_index=True)
    df["significant"] = df["fdr"] < float(fdr)
    order = {d: i for i, d in enumerate(domains)}
    df = df.assign(_o=df["domain"].map(order)).sort_values(["_o", "nes"], ascending=[True, False])
    return df.drop(columns="_o").reset_index(drop=True)[GSEA_COLUMNS]


def _nat(s: str):
    try:
        return (0, float(s), "")
    except ValueError:
        return (1, 0.0, s)
