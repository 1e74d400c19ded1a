"""GSEA bar plot: normalised enrichment score (NES) of the top gene sets per domain."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..errors import InputError
from . import _utils


def gsea_bars(
    results: pd.DataFrame,
    *,
    top: int = 10,
    fdr: float | None = None,
    only_significant: bool = False,
    ncols: int | None = None,
    save=None,
    dpi: int = 120,
):
    """Horizontal NES bars of the gene sets with the largest absolute NES, one panel per domain.

    Parameters
    ----------
    results
        Table from :func:`stmorph.ev.gsea` (columns ``domain, term, nes, fdr``).
    top
        Gene sets per domain (largest absolute NES).
    fdr
        Threshold for the filled (significant) bars; default: the table's ``significant`` column.
    only_significant
        Show only gene sets passing the FDR threshold.

    Returns
    -------
    The matplotlib Figure.
    """
    need = {"domain", "term", "nes", "fdr"}
    if not need <= set(results.columns):
        msg = f"results must have columns {sorted(need)} (from stmorph.ev.gsea); got {list(results.columns)}."
        raise InputError(msg)
    df = results.copy()
    df["sig"] = df["fdr"] < fdr if fdr is not None else df.get("significant", df["fdr"] < 0.05)
    if only_significant:
        df = df[df["sig"]]
    domains = list(dict.fromkeys(df["domain"].astype(str)))
    if not domains:
        msg = "no gene set to plot (none significant?)."
        raise InputError(msg)
    n_rows = max(min(top, int((df["domain"].astype(str) == d).sum())) for d in domains)
    fig, axes = _utils.grid(len(domains), ncols or min(len(domains), 3), panel=(5.2, 0.32 * n_rows + 1.2))
    for ax, d in zip(axes, domains, strict=True):
        sub = df[df["domain"].astype(str) == d]
        sub = sub.reindex(sub["nes"].abs().sort_values(ascending=False).index).head(top).iloc[::-1]
        y = np.arange(len(sub))
        colors = [("#d55e00" if n > 0 else "#0072b2") if s else "#bdbdbd" for n, s in zip(sub["nes"], sub["sig"],
                                                                                             strict=True)]
        ax.barh(y, sub["nes"], color=colors)
        ax.set_yticks(y, [t if len(t) <= 40 else t[:38] + "…" for t in sub["term"].astype(str)], fontsize=8)
        ax.axvline(0, color="0.3", linewidth=0.8)
        ax.set_xlabel("NES")
        ax.set_title(f"domain {d}", fontsize=11)
    thr = fdr if fdr is not None else 0.05
    fig.suptitle(f"pre-ranked GSEA (coloured: FDR < {thr:g}; grey: not significant)", fontsize=10)
    fig.tight_layout()
    _utils.save_figure(fig, save, dpi=dpi)
    return fig
