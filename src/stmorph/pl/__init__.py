"""Plots: domains over the H&E, spatial gene expression, marker dot plots, GSEA bars."""
