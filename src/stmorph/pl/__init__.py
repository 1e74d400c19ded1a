"""Plots: domains over the H&E, their confidence, what the H&E changed, spatial gene expression, marker dot
plots, GSEA bars.

matplotlib is imported inside the functions (Agg backend, no display needed).
Domain colours are matched between panels (see :func:`stmorph.pl.domain_colors`) and colour-blind safe
(:data:`stmorph.pl.PALETTE`); spots are drawn at their true size (circles of
``spot_diameter_fullres``; squares of the bin size for Visium HD).
Functions return the figure (``save=`` also writes it, through :mod:`stmorph._outputs`, which never imports
``pl``).
"""

from ._colors import PALETTE, domain_colors, match_labels, palette
from ._confidence import confidence, image_changes
from ._domains import domains
from ._dotplot import dotplot
from ._gsea import gsea_bars
from ._names import domain_names, top_markers
from ._spatial_genes import spatial

__all__ = ["domains", "spatial", "dotplot", "gsea_bars", "domain_colors", "match_labels", "palette", "PALETTE",
           "domain_names", "top_markers", "confidence", "image_changes"]
