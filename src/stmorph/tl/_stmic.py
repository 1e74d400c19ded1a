"""stMIC (Song et al.): expression PCA + image-feature PCA, concatenated, Louvain.

The method is a few named steps a reader can match to the paper's Figure 1B::

    expression_embedding   counts -> CPM 1e4 -> log1p -> scale -> PCA 10   obsm["X_expr_pca"]
    im.features            patch per spot (side = spot diameter) -> CNN   obsm["X_image"]
    image_embedding        StandardScaler -> PCA 10                        obsm["X_image_pca"]
    integrate              concatenation per spot                          obsm["X_stmic"]
    cluster                kNN (k = 39, Jaccard) -> Louvain                obs["stmic"]

with the paper's two baselines: expression only ("GEBC", ``obs["expression"]``)
and image only (``obs["image"]``). Each is registered with
:func:`stmorph.tl.run_methods`, which runs any subset of stmorph's methods
sharing the steps they have in common.
"""

from __future__ import annotations

from ._cluster import cluster
from ._embedding import image_embedding, integrate
from ._methods import register_method, run_methods


def _k_other(run) -> int | None:
    """Cluster count of the image and stMIC clusterings: given, or the expression baseline's (the paper)."""
    if run.n_clusters is not None or run.match_expression:
        return run.expression_count()
    return None


def _cluster_kw(run) -> dict:
    return {"n_neighbors": run.n_neighbors, "method": run.cluster_method, "random_state": run.random_state,
            "resolution": run.resolution, "refine": bool(run.refine)}


def _run_expression(adata, run) -> None:
    rep = run.expression_pca()
    run.step("cluster_expression", cluster, adata, rep, key_added="expression", n_clusters=run.n_clusters,
             **_cluster_kw(run))


def _image_pca(adata, run) -> str:
    (feats,) = run.image_features(run.feature_key)
    run.shared("image_embedding", "image_embedding" in run.steps, image_embedding, adata, use_rep=feats,
               n_comps=run.n_comps, random_state=run.random_state)
    return "X_image_pca"


def _run_image(adata, run) -> None:
    k = _k_other(run)
    rep = _image_pca(adata, run)
    run.step("cluster_image", cluster, adata, rep, key_added="image", n_clusters=k, **_cluster_kw(run))


def _run_stmic(adata, run) -> None:
    k = _k_other(run)
    reps = (run.expression_pca(), _image_pca(adata, run))
    run.step("integrate", integrate, adata, reps, weights=run.modality_weights)
    run.step("cluster_stmic", cluster, adata, "X_stmic", key_added="stmic", n_clusters=k, **_cluster_kw(run))


register_method("expression", _run_expression,
                summary="stMIC's expression-only baseline (GEBC): CPM, log1p, scale, PCA 10, kNN 39, Louvain")
register_method("image", _run_image, image="required", patches=("spot",),
                summary="stMIC's image-only baseline: CNN features of the spot patch, PCA 10, kNN 39, Louvain")
register_method("stmic", _run_stmic, image="required", patches=("spot",),
                summary="stMIC (Song et al.): expression PCA 10 + image PCA 10, kNN 39, Louvain")


def stmic(
    adata,
    *,
    n_clusters: int | None = None,
    resolution: float = 1.7,
    baselines: bool = True,
    match_expression: bool = True,
    n_neighbors: int = 39,
    cluster_method: str = "louvain",
    n_comps: int = 10,
    modality_weights: tuple[float, float] | None = None,
    image=None,
    encoder: str = "efficientnet_lite2",
    encoder_weights: str | None = None,
    patch="spot",
    feature_key: str = "X_image",
    device: str = "auto",
    random_state: int = 0,
    progress: bool = True,
    copy: bool = False,
):
    """stMIC: image-aware spatial domains from expression and H&E (Song et al.).

    Runs :func:`expression_embedding`, :func:`stmorph.im.features` (unless
    ``obsm[feature_key]`` exists), :func:`image_embedding`, :func:`integrate`
    and :func:`cluster`, plus, with ``baselines``, the expression-only (GEBC)
    and image-only clusterings the paper compares against. Parameters are
    those of :func:`run_methods`; defaults follow the paper (10 + 10 PCs,
    k = 39, Louvain, resolution in 1.5-1.9 or the expression baseline's count).
    The paper's encoder was ResNet-50 (``encoder="resnet50"`` with local
    weights); the default here is the embedded EfficientNet-Lite2.

    Sets the following fields:

    ``adata.obs["stmic"]`` (and ``["expression"]``, ``["image"]`` with baselines)
        Domain labels.
    ``adata.obsm["X_expr_pca"]``, ``["X_image"]``, ``["X_image_pca"]``, ``["X_stmic"]``
        Embeddings.
    ``adata.uns["stmic"]["params"]`` (and the baselines')
        Clustering parameters; ``uns["stmorph_run"]`` holds step timings.
    """
    adata = adata.copy() if copy else adata
    methods = ["expression", "image", "stmic"] if baselines else ["stmic"]
    run_methods(
        adata, methods, n_clusters=n_clusters, resolution=resolution, match_expression=match_expression,
        n_neighbors=n_neighbors, cluster_method=cluster_method, n_comps=n_comps,
        modality_weights=modality_weights, image=image, encoder=encoder, encoder_weights=encoder_weights,
        patch=patch, feature_key=feature_key, device=device, random_state=random_state, progress=progress,
    )
    return adata if copy else None
