"""Marker dot plot: per domain, the fraction of spots expressing each gene (size) and its mean (colour)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from ..errors import InputError
from . import _utils
from ._colors import label_order


def dotplot(
    adata,
    groupby: str,
    genes: Sequence[str] | pd.DataFrame | None = None,
    *,
    n_genes: int = 3,
    layer: str | None = None,
    normalize: bool | str = "auto",
    cmap: str = "Reds",
    standard_scale: bool = True,
    save=None,
    dpi: int = 120,
):
    """Dot plot of marker genes by domain (like Seurat's ``DotPlot`` / scanpy's ``dotplot``).

    Parameters
    ----------
    groupby
        ``obs`` column with the domains (rows of the plot).
    genes
        Gene list, or a marker table from :func:`stmorph.ev.markers` (its top ``n_genes`` per domain are
        shown), or ``None`` to compute that table now.
    standard_scale
        Scale each gene's mean expression to 0-1 across domains (colour), as scanpy's ``standard_scale="var"``.

    Returns
    -------
    The matplotlib Figure.
    """
    from ._spatial_genes import gene_values

    plt = _utils.pyplot()
    if groupby not in adata.obs:
        msg = f"groupby {groupby!r} is not a column of adata.obs."
        raise InputError(msg)
    if genes is None:
        from ..ev import markers

        genes = markers(adata, groupby, n_genes=n_genes, layer=layer, key_added="_stmorph_dotplot_tmp")
        adata.uns.pop("_stmorph_dotplot_tmp", None)
    if isinstance(genes, pd.DataFrame):
        top = genes.groupby("domain", sort=False, group_keys=False).head(n_genes)
        genes = list(dict.fromkeys(top["gene"].astype(str)))
    genes = list(dict.fromkeys(genes))
    if not genes:
        msg = "no gene to plot."
        raise InputError(msg)
    labels = adata.obs[groupby]
    keep = labels.notna().to_numpy()
    vals = gene_values(adata[keep], genes, layer=layer, normalize=normalize)
    lab = labels[keep].astype(str).to_numpy()
    domains = label_order(labels)
    mean = np.array([vals[lab == d].mean(axis=0) for d in domains])  # (D, G)
    frac = np.array([(vals[lab == d] > 0).mean(axis=0) for d in domains])
    color = mean
    if standard_scale:
        lo, hi = mean.min(axis=0), mean.max(axis=0)
        color = (mean - lo) / np.where(hi > lo, hi - lo, 1.0)
    D, G = mean.shape
    fig, ax = plt.subplots(figsize=(max(4.0, 0.42 * G + 2.8), max(2.5, 0.4 * D + 1.6)))
    yy, xx = np.meshgrid(np.arange(D), np.arange(G), indexing="ij")
    sc = ax.scatter(xx.ravel(), yy.ravel(), s=(frac.ravel() * 220) + 2, c=color.ravel(), cmap=cmap,
                    vmin=0, vmax=1 if standard_scale else None, edgecolors="0.3", linewidths=0.4)
    ax.set_xticks(range(G), genes, rotation=90, fontsize=9, style="italic")
    ax.set_yticks(range(D), domains, fontsize=9)
    ax.set_xlim(-0.6, G - 0.4)
    ax.set_ylim(D - 0.5, -0.5)
    ax.set_ylabel(groupby)
    ax.grid(False)
    cb = fig.colorbar(sc, ax=ax, fraction=0.05, pad=0.02)
    cb.set_label("mean expression\n(scaled 0-1)" if standard_scale else "mean log1p expression")
    for f in (0.25, 0.5, 1.0):
        ax.scatter([], [], s=f * 220 + 2, c="0.6", edgecolors="0.3", linewidths=0.4, label=f"{int(f * 100)}%")
    ax.legend(title="spots expressing", loc="upper left", bbox_to_anchor=(1.25, 1.0), frameon=False,
              fontsize=8, title_fontsize=8, labelspacing=1.0)
    fig.tight_layout()
    _utils.save_figure(fig, save, dpi=dpi)
    return fig
