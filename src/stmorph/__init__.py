"""stmorph: spatial domains from spatial transcriptomics and the H&E image of the same section.

Submodules follow scanpy: ``read`` (readers), ``im`` (slides, patches, image
encoders and features), ``tl`` (stMIC, SENCA-st, clustering), ``ev``
(metrics, marker genes, GSEA), ``pl`` (plots), ``datasets`` (synthetic tissue).
Heavy dependencies (torch, scanpy, gseapy, matplotlib) are imported when a
function needs them, so ``import stmorph`` stays fast.
"""

from __future__ import annotations

__version__ = "0.1.0"

from . import datasets, ev, im, pl, read, tl  # noqa: E402
from ._validate import validate  # noqa: E402
from ._write_spatialdata import write_spatialdata  # noqa: E402
from .errors import DependencyError, ImageError, InputError, OutputError, OutputExistsError, StmorphError  # noqa: E402

__all__ = [
    "read", "im", "tl", "pl", "ev", "datasets", "validate", "write_spatialdata",
    "StmorphError", "InputError", "ImageError", "DependencyError", "OutputExistsError", "OutputError",
]
