"""Tools: embeddings, clustering, stMIC and SENCA-st."""

from ._cluster import cluster
from ._embedding import expression_embedding, image_embedding, integrate
from ._stmic import METHODS, run_methods, stmic
from .senca import SencaConfig, senca

__all__ = ["expression_embedding", "image_embedding", "integrate", "cluster", "stmic", "senca", "SencaConfig", "run_methods", "METHODS"]
