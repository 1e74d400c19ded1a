"""Domain names from their marker genes ("3: KRT19, EPCAM") for legends and report cards."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ._colors import label_order


#: How a domain without distinct marker genes is named.
NO_DISTINCT = "no distinct markers"


def top_markers(table: pd.DataFrame, n_genes: int = 2, *, min_pct: float = 0.1, distinct: bool = False,
                candidates: int = 10, alpha: float = 0.05) -> dict[str, list[str]]:
    """The ``n_genes`` best up-regulated genes per domain of a :func:`stmorph.ev.markers` table.

    Genes with a positive log fold change, expressed in at least ``min_pct`` of the spots inside or outside
    the domain (Seurat's ``min.pct``), in the table's order (Wilcoxon score, descending). ``distinct=True``
    keeps only a domain's own markers (significant, adjusted p below ``alpha``, and scoring highest in this
    domain of all domains) among its ``candidates`` best genes, and only for a domain with an own marker
    among its ``n_genes`` best: a domain whose best genes are another domain's (one the image set apart from
    a domain of the same expression) has no entry, rather than the other domain's genes.
    """
    t = table[(table["logfoldchange"] > 0) & (np.maximum(table["pct_in"], table["pct_out"]) >= min_pct)]
    if distinct:
        best = table.groupby(table["gene"].astype(str), sort=False)["score"].transform("max")
        own = ((table["score"] >= best) & (table["pval_adj"] < alpha)).reindex(t.index, fill_value=False)
        rank = t.groupby("domain", sort=False).cumcount()
        has_own = own[rank < n_genes].groupby(t["domain"][rank < n_genes], sort=False).any()
        t = t[own & (rank < candidates) & t["domain"].map(has_own).fillna(False).astype(bool)]
    top = t.groupby("domain", sort=False, group_keys=False).head(n_genes)
    out: dict[str, list[str]] = {}
    for dom, gene in zip(top["domain"].astype(str), top["gene"].astype(str), strict=True):
        out.setdefault(dom, []).append(gene)
    return out


def domain_names(adata, key: str, *, n_genes: int = 2, markers: pd.DataFrame | None = None,
                 sep: str = ": ", distinct: bool = True) -> dict[str, str]:
    """``{label: "label: GENE1, GENE2"}``: each domain of ``obs[key]`` named by its top marker genes.

    ``markers`` is a table from :func:`stmorph.ev.markers` for ``key``; by default it is computed now
    (Wilcoxon rank-sum, domain against the rest; ``adata`` is not modified). With ``distinct`` (default) a
    domain is named by its own markers only (see :func:`top_markers`); one without any is named
    ``"label: no distinct markers"``. With ``distinct=False`` a domain without an up-regulated marker keeps
    its bare label.
    """
    if markers is None:
        from ..ev import markers as _markers

        tmp_key = "_stmorph_domain_names_tmp"
        try:
            markers = _markers(adata, key, key_added=tmp_key)
        finally:
            adata.uns.pop(tmp_key, None)
    genes = top_markers(markers, n_genes, distinct=distinct)
    return {lab: f"{lab}{sep}{', '.join(genes[lab])}" if genes.get(lab) else
            (f"{lab}{sep}{NO_DISTINCT}" if distinct else lab)
            for lab in label_order(adata.obs[key])}
