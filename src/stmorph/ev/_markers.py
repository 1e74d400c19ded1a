"""Marker genes per domain: Wilcoxon rank-sum test of each domain against the rest.

This is scanpy's ``rank_genes_groups(method="wilcoxon")`` (the test Seurat's
``FindAllMarkers`` uses by default) on log-normalised expression, returned as a
tidy table.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from scipy import sparse

from ..errors import InputError

__all__ = ["markers", "lognormalized"]

MARKER_COLUMNS = ["gene", "domain", "logfoldchange", "score", "pval", "pval_adj", "pct_in", "pct_out"]


def _looks_like_counts(X) -> bool:
    data = X.data if sparse.issparse(X) else np.asarray(X).ravel()
    if data.size == 0:
        return True
    sample = data[: min(data.size, 200_000)]
    return bool(np.all(sample >= 0) and np.allclose(sample, np.round(sample)))


def lognormalized(adata, *, layer: str | None = None, target_sum: float = 1e4, normalize: bool | str = "auto"):
    """A new AnnData (same obs/var names) with ``log1p(counts / total * target_sum)`` in ``X``.

    The user's object is never modified. ``normalize="auto"`` normalises only when the matrix looks like
    counts (non-negative integers); ``False`` takes it as already log-normalised.
    """
    import anndata as ad

    X = adata.layers[layer] if layer is not None else adata.X
    if layer is not None and layer not in adata.layers:
        msg = f"layer {layer!r} not in adata.layers (have {list(adata.layers)})."
        raise InputError(msg)
    X = sparse.csr_matrix(X, dtype=np.float32, copy=True) if sparse.issparse(X) else np.array(X, dtype=np.float32)
    do_norm = _looks_like_counts(X) if normalize == "auto" else bool(normalize)
    if do_norm:
        totals = np.asarray(X.sum(axis=1)).ravel()
        scale = np.where(totals > 0, target_sum / np.maximum(totals, 1e-12), 0.0).astype(np.float32)
        if sparse.issparse(X):
            X = sparse.diags(scale) @ X
            X = sparse.csr_matrix(X)
            np.log1p(X.data, out=X.data)
        else:
            X = np.log1p(X * scale[:, None])
    out = ad.AnnData(X=X, obs=pd.DataFrame(index=adata.obs_names.copy()), var=pd.DataFrame(index=adata.var_names.copy()))
    out.uns["log1p"] = {"base": None}
    return out


def _seurat_log2fc(tmp, groupby: str, key: str) -> None:
    """Replace scanpy's log2 fold changes in ``tmp.uns[key]`` by Seurat's (``FindMarkers``, pseudo-count 1 on
    the normalised scale): ``log2(mean_in + 1) - log2(mean_out + 1)`` of the normalised expression (``expm1`` of
    the log data). scanpy's ratio of means has a pseudo-count of 1e-9, so a gene absent outside a domain
    reads log2 FC ~28 whatever its level inside; with 1 it reads as its level."""
    X = tmp.X
    E = (sparse.csr_matrix(X, dtype=np.float64, copy=True) if sparse.issparse(X)
         else sparse.csr_matrix(np.asarray(X, np.float64)))
    E.data = np.expm1(E.data)
    lab = tmp.obs[groupby].astype(str).to_numpy()
    res = tmp.uns[key]
    groups = list(res["names"].dtype.names)
    total = np.asarray(E.sum(axis=0)).ravel()
    n = E.shape[0]
    position = pd.Series(np.arange(E.shape[1]), index=pd.Index(tmp.var_names.astype(str)))  # scanpy lists names
    member = sparse.csr_matrix((lab[:, None] == np.asarray(groups)[None, :]).astype(np.float64))  # spots x groups
    sums = np.asarray((member.T @ E).todense())  # groups x genes, one product instead of a row copy per group
    sizes = np.asarray(member.sum(axis=0)).ravel()
    rec = res["logfoldchanges"]
    out = np.empty(len(rec), dtype=rec.dtype)
    for j, g in enumerate(groups):
        m_in = sums[j] / max(sizes[j], 1.0)
        m_out = (total - sums[j]) / max(n - sizes[j], 1.0)
        lfc = np.log2(m_in + 1.0) - np.log2(m_out + 1.0)
        out[g] = lfc[position.loc[np.asarray(res["names"][g]).astype(str)].to_numpy()]
    res["logfoldchanges"] = out


def markers(
    adata,
    groupby: str,
    *,
    groups="all",
    layer: str | None = None,
    target_sum: float = 1e4,
    normalize: bool | str = "auto",
    n_genes: int | None = None,
    tie_correct: bool = True,
    min_pct: float = 0.0,
    max_spots: int | None = 50_000,
    random_state: int = 0,
    key_added: str = "rank_genes_groups",
) -> pd.DataFrame:
    """Marker genes of every domain (Wilcoxon rank-sum test, domain vs the rest).

    Parameters
    ----------
    adata
        Raw counts in ``X`` (or ``layer``); they are log-normalised on a copy, ``X`` is not modified.
    groupby
        Column of ``adata.obs`` with the domains. Spots with a missing domain are left out.
    groups
        ``"all"`` or a list of domains to test (each against all other spots).
    layer, target_sum, normalize
        See :func:`lognormalized`.
    n_genes
        Keep only the top ``n_genes`` per domain in the returned table (all genes are tested).
    tie_correct
        Tie correction of the Wilcoxon test.
    min_pct
        Drop from the table genes expressed in fewer than this fraction of spots both inside and outside the
        domain (Seurat's ``min.pct``; e.g. 0.1). All genes stay in ``uns[key_added]``.
    max_spots
        Above this many labelled spots (Visium HD bins), the test runs on a random sample of this size drawn
        per domain in proportion to its size, with at least ``min(size, 500)`` spots of every domain, so that
        rare domains keep their markers; ``None`` tests every spot. The sample size is recorded.
    random_state
        Seed of that sample.
    key_added
        ``adata.uns`` key for scanpy's result.

    Returns
    -------
    Tidy table with columns ``gene, domain, logfoldchange, score, pval, pval_adj, pct_in, pct_out``
    (``logfoldchange``: Seurat's ``log2(mean_in + 1) - log2(mean_out + 1)`` of the normalised expression;
    Benjamini-Hochberg adjusted p; ``pct_*`` = fraction of spots with non-zero expression inside/outside
    the domain), sorted by domain then score (descending).

    Sets the following fields
    -------------------------
    ``adata.uns[key_added]``
        scanpy's ``rank_genes_groups`` result, with ``params`` (groupby, method, normalisation); its
        ``logfoldchanges`` are Seurat's (above), not scanpy's ratio of means with a 1e-9 pseudo-count, which
        reads ~28 for any gene absent outside the domain.
    """
    import scanpy as sc

    if groupby not in adata.obs:
        msg = f"groupby {groupby!r} is not a column of adata.obs (columns: {list(adata.obs.columns)})."
        raise InputError(msg)
    if not adata.var_names.is_unique:  # scanpy's tables would repeat rows and mix up the repeated genes
        dup = adata.var_names[adata.var_names.duplicated()].unique()
        msg = (f"var_names repeat {len(dup)} gene name(s), e.g. {str(dup[0])!r}; markers need unique names "
               "(call adata.var_names_make_unique()).")
        raise InputError(msg)
    labels = adata.obs[groupby]
    keep = labels.notna().to_numpy()
    if keep.sum() == 0:
        msg = f"obs[{groupby!r}] has no labelled spot."
        raise InputError(msg)
    n_labelled = int(keep.sum())
    if max_spots is not None and n_labelled > int(max_spots):
        keep = _sample_per_domain(labels, keep, int(max_spots), random_state)
    tmp = lognormalized(adata[keep] if not keep.all() else adata, layer=layer, target_sum=target_sum, normalize=normalize)
    lab = labels[keep].astype(str)
    tmp.obs[groupby] = pd.Categorical(lab, categories=sorted(lab.unique(), key=_natural_key))
    counts = tmp.obs[groupby].value_counts()
    if len(counts) < 2:
        msg = f"obs[{groupby!r}] has {len(counts)} domain(s); markers need at least two."
        raise InputError(msg)
    if groups != "all":
        groups = [str(g) for g in groups]
        missing = [g for g in groups if g not in counts.index]
        if missing:
            msg = f"domains {missing} not found in obs[{groupby!r}] (have {list(counts.index)})."
            raise InputError(msg)
    single = counts[counts < 2]
    if len(single):
        msg = f"domains {list(single.index)} of obs[{groupby!r}] have fewer than 2 spots; the Wilcoxon test needs more."
        raise InputError(msg)
    with warnings.catch_warnings():
        # genes with no count anywhere give 0/0 in the tie correction: their score is NaN, which is right
        warnings.filterwarnings("ignore", "invalid value encountered", RuntimeWarning)
        sc.tl.rank_genes_groups(
            tmp, groupby, groups=groups, method="wilcoxon", pts=True, tie_correct=tie_correct,
            key_added=key_added, use_raw=False, n_genes=tmp.n_vars,
        )
    _seurat_log2fc(tmp, groupby, key_added)
    df = sc.get.rank_genes_groups_df(tmp, group=None, key=key_added)
    if "group" not in df:  # a single tested group
        df.insert(0, "group", groups[0] if groups != "all" else counts.index[0])
    df = df.rename(columns={
        "group": "domain", "names": "gene", "scores": "score", "logfoldchanges": "logfoldchange",
        "pvals": "pval", "pvals_adj": "pval_adj", "pct_nz_group": "pct_in", "pct_nz_reference": "pct_out",
    })
    for c in MARKER_COLUMNS:
        if c not in df:
            df[c] = np.nan
    df["domain"] = df["domain"].astype(str)
    df = df[MARKER_COLUMNS]
    order = {d: i for i, d in enumerate(tmp.obs[groupby].cat.categories)}
    df = df.assign(_o=df["domain"].map(order)).sort_values(["_o", "score"], ascending=[True, False])
    df = df.drop(columns="_o").reset_index(drop=True)
    if min_pct > 0:
        df = df[np.maximum(df["pct_in"].fillna(0), df["pct_out"].fillna(0)) >= min_pct].reset_index(drop=True)
    if n_genes is not None:
        df = df.groupby("domain", sort=False, group_keys=False).head(int(n_genes)).reset_index(drop=True)
    res = dict(tmp.uns[key_added])
    res["params"] = dict(res.get("params", {}))
    res["params"].update({
        "groupby": groupby, "method": "wilcoxon", "target_sum": float(target_sum), "layer": layer or "X",
        "normalize": str(normalize), "tie_correct": bool(tie_correct),
        "n_spots_labelled": n_labelled, "n_spots_tested": int(keep.sum()),
    })
    adata.uns[key_added] = res
    return df


def _sample_per_domain(labels: pd.Series, keep: np.ndarray, n: int, random_state: int) -> np.ndarray:
    """A mask of about ``n`` of the ``keep`` spots: each domain in proportion to its size, at least
    ``min(size, 500)`` of each."""
    rng = np.random.default_rng(random_state)
    lab = labels.astype(object).to_numpy()
    total = int(keep.sum())
    out = np.zeros(keep.shape[0], dtype=bool)
    for dom in pd.unique(lab[keep]):
        idx = np.flatnonzero(keep & (lab == dom))
        take = min(idx.size, max(500, int(round(n * idx.size / total))))
        out[rng.choice(idx, take, replace=False)] = True
    return out


def _natural_key(s: str):
    """Sort "2" before "10"; non-numeric labels alphabetically after numbers."""
    try:
        return (0, float(s), "")
    except ValueError:
        return (1, 0.0, s)
