"""Readers: Space Ranger outs/ folders, the legacy Spatial Transcriptomics layout, .h5ad files, SpatialData.

Every reader returns one AnnData per section following stmorph's data model (``docs/ARCHITECTURE.md``)
and raises :class:`stmorph.InputError` / :class:`stmorph.ImageError` naming the file and the problem
when the input is missing or malformed. No reader writes anything, least of all into the input folder.
"""

from __future__ import annotations

from ._h5ad import h5ad
from ._legacy_st import legacy_st
from ._spatialdata import spatialdata
from ._visium import visium
from ._visium_hd import rebin, visium_hd

__all__ = ["visium", "visium_hd", "rebin", "legacy_st", "h5ad", "spatialdata"]
