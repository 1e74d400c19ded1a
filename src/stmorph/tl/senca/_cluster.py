"""Agglomerative clustering of the shared embedding S (paper 3.5, 4.5).

scikit-learn's ``AgglomerativeClustering`` (Ward linkage by default) is
deterministic. Unstructured Ward needs O(N^2) memory, so above
``cluster_connectivity_above`` spots (20,000 by default) the merge is
restricted to a 15-nearest-neighbour graph of S (sklearn's ``connectivity=``),
which keeps memory linear in N; this is recorded in ``uns[key]["params"]``.
"""

from __future__ import annotations

import numpy as np

from .._cluster import _relabel


def agglomerative(s: np.ndarray, n_clusters: int, *, linkage: str = "ward",
                  connectivity_above: int = 20_000) -> tuple[np.ndarray, bool]:
    """Labels ``(N,)`` int and whether a kNN connectivity was used."""
    from sklearn.cluster import AgglomerativeClustering

    connectivity = None
    if s.shape[0] > connectivity_above:
        from sklearn.neighbors import kneighbors_graph

        connectivity = kneighbors_graph(s, n_neighbors=15, include_self=False)
        connectivity = connectivity.maximum(connectivity.T)
    model = AgglomerativeClustering(n_clusters=n_clusters, linkage=linkage, connectivity=connectivity)
    labels = model.fit_predict(np.asarray(s, dtype=np.float64))
    return _relabel(labels), connectivity is not None  # by decreasing size, ties by first occurrence
