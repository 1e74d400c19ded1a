"""SENCA-st (Liyanaarachchi et al.): shared encoder with neighbourhood cross-attention.

Modules: ``_config`` (hyper-parameters), ``_preprocess`` (paper 3.1),
``_model`` (Figure 1, eqs 2-4), ``_train`` (eq 1, 3.5), ``_cluster``
(agglomerative clustering), ``_senca`` (the public tool). Importing this
package does not import torch; :func:`senca` does.
"""

from ._config import SencaConfig
from ._senca import senca

__all__ = ["senca", "SencaConfig"]
