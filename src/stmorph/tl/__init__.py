"""Tools: embeddings, clustering, the methods (stmorph, stMIC, SENCA-st) and their registry.

Importing a method's module registers it with :func:`run_methods`; the imports below fix the order
in which :func:`run_methods` runs them.
"""

from ._cluster import choose_n_clusters, cluster
from ._embedding import expression_embedding, image_embedding, integrate
from ._joint import joint_domains
from . import _methods
from ._methods import available_methods, method_groups, register_group, register_method, run_methods
from ._options import Option
from ._neighbors import refine_labels
from ._stmic import stmic
from ._stmorph import image_context_embedding, spatial_expression_embedding, stmorph
from .senca import SencaConfig, senca
from .senca import _method as _senca_method  # noqa: F401 - registers "senca"

#: The built-in methods, in the order :func:`run_methods` runs them (see :func:`available_methods`).
METHODS = available_methods()

_methods.load_plugins()  # methods of other packages (entry points "stmorph.methods") run after the built-in ones

__all__ = ["expression_embedding", "image_embedding", "integrate", "spatial_expression_embedding",
           "image_context_embedding", "cluster", "choose_n_clusters", "refine_labels", "stmic", "stmorph", "senca",
           "SencaConfig", "joint_domains", "run_methods", "register_method", "register_group", "available_methods",
           "method_groups", "Option", "METHODS"]
