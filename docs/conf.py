"""Sphinx configuration: the stmorph user guide, CLI and API reference, built offline."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "_ext"))
sys.path.insert(0, str(HERE.parent / "src"))  # document the checkout being built, installed or not

import stmorph  # noqa: E402

project = "stmorph"
author = "stmorph developers"
copyright = "stmorph developers, BSD-3-Clause"
version = release = stmorph.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "stmorph_docs",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
smartquotes = False  # keep "--force" as typed, not an en dash

myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

# numpydoc-style docstrings (scanpy's), read by napoleon; "Sets the following fields" is scanpy's section.
napoleon_numpy_docstring = True
napoleon_google_docstring = False
napoleon_use_rtype = False
napoleon_use_ivar = True  # Attributes as fields: autodoc :members: documents them once
napoleon_custom_sections = ["Sets the following fields",
                            "Sets the following fields (for each key of ``key_added``)"]
autodoc_typehints = "none"  # the docstrings' Parameters say the types
autodoc_member_order = "bysource"
autosummary_generate = False  # the stmorph-api directive writes each entry on its page; no stub files

# Nothing is fetched while building: no intersphinx, no remote images.
html_theme = "furo"
html_title = f"stmorph {release}"
html_static_path: list[str] = []
