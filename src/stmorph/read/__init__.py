"""Readers: Space Ranger outs/ folders, the legacy Spatial Transcriptomics layout, .h5ad files."""
