"""Readers: Space Ranger outs/ folders, the legacy Spatial Transcriptomics layout, .h5ad files.

Every reader returns one AnnData per section following stmorph's data model (``docs/ARCHITECTURE.md``)
and raises :class:`stmorph.InputError` / :class:`stmorph.ImageError` naming the file and the problem
when the input is missing or malformed. No reader writes anything, least of all into the input folder.
"""

from __future__ import annotations

from ._h5ad import h5ad
from ._legacy_st import legacy_st
from ._visium import visium

__all__ = ["visium", "legacy_st", "h5ad"]
