"""Evaluation: ARI/NMI, marker genes, pre-ranked GSEA, domains along the section border, what the H&E changed,
benchmark harness.

Everything here imports scanpy/gseapy/sklearn inside the functions, so
``import stmorph`` stays fast.
"""

from ._border import border_distance, border_domains
from ._changes import image_changes
from ._gsea import gsea, load_gene_sets, read_gmt
from ._markers import markers
from ._metrics import ari, nmi, scored_labels

__all__ = ["ari", "nmi", "scored_labels", "markers", "gsea", "read_gmt", "load_gene_sets", "border_distance",
           "border_domains", "image_changes"]
