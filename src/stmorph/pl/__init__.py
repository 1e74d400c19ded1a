"""Plots: domains over the H&E, spatial gene expression, marker dot plots, GSEA bars.

matplotlib is imported inside the functions (Agg backend, no display needed).
Domain colours are matched between panels (see :func:`stmorph.pl.domain_colors`).
"""

from ._colors import PALETTE, domain_colors, match_labels, palette
from ._domains import domains
from ._dotplot import dotplot
from ._gsea import gsea_bars
from ._spatial_genes import spatial

__all__ = ["domains", "spatial", "dotplot", "gsea_bars", "domain_colors", "match_labels", "palette", "PALETTE"]
