"""Evaluation: ARI/NMI, marker genes, pre-ranked GSEA, benchmark harness."""
