"""stMIC (Song et al.): expression PCA + image-feature PCA, concatenated, Louvain.

The method is a few named steps a reader can match to the paper's Figure 1B::

    expression_embedding   counts -> CPM 1e4 -> log1p -> scale -> PCA 10   obsm["X_expr_pca"]
    im.features            patch per spot (side = spot diameter) -> CNN   obsm["X_image"]
    image_embedding        StandardScaler -> PCA 10                        obsm["X_image_pca"]
    integrate              concatenation per spot                          obsm["X_stmic"]
    cluster                kNN (k = 39, Jaccard) -> Louvain                obs["stmic"]

with the paper's two baselines: expression only ("GEBC", ``obs["expression"]``) and image only
(``obs["image"]``), the same function with ``modality="expression"`` or ``"image"``. Each is a
registered method; ``--method stmic`` runs the three (a group).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

from . import _steps
from ._cluster import cluster
from ._confidence import add_confidence
from ._embedding import expression_embedding, image_embedding, integrate
from ._methods import register_group, register_method

MODALITIES = ("joint", "expression", "image")
_KEYS = {"joint": "stmic", "expression": "expression", "image": "image"}


def _current(adata, key: str, params: Mapping) -> bool:
    return _steps.find_output(adata, params, prefer=key) == key


def expression_pca(adata, *, n_comps: int = 10, random_state: int = 0) -> str:
    """stMIC's expression embedding ``obsm["X_expr_pca"]``, reused when computed with the same parameters."""
    want = {"n_comps": int(n_comps), "target_sum": 1e4, "layer": None, "n_top_genes": None,
            "random_state": random_state}
    if _current(adata, "X_expr_pca", want):
        _steps.reuse("expression_embedding")
    else:
        with _steps.step("expression_embedding"):
            expression_embedding(adata, n_comps=n_comps, random_state=random_state)
    return "X_expr_pca"


def image_pca(adata, *, feature_key: str = "X_image", patch="spot", n_comps: int = 10, random_state: int = 0,
              encoder="efficientnet_lite2", encoder_weights=None, device="auto", image=None,
              progress: bool = True) -> str:
    """stMIC's image embedding ``obsm["X_image_pca"]`` of the spot patch's features (computed when absent)."""
    _steps.image_features(adata, [(feature_key, patch, "mean")], encoder=encoder, encoder_weights=encoder_weights,
                          device=device, image=image, progress=progress)
    source = adata.uns.get(feature_key, {}).get("params", {}).get("cache_key", "") if isinstance(
        adata.uns.get(feature_key), Mapping) else ""
    want = {"use_rep": feature_key, "n_comps": int(n_comps), "random_state": random_state, "features": source}
    if _current(adata, "X_image_pca", want):
        _steps.reuse("image_embedding")
    else:
        with _steps.step("image_embedding"):
            image_embedding(adata, use_rep=feature_key, n_comps=n_comps, random_state=random_state)
        adata.uns["X_image_pca"]["params"]["features"] = source  # so a later call on the same features reuses it
    return "X_image_pca"


def expression_count(adata, *, resolution: float = 1.7, n_neighbors: int = 39, cluster_method: str = "louvain",
                     refine: bool = False, n_comps: int = 10, random_state: int = 0) -> int:
    """The number of domains of stMIC's expression baseline (GEBC) at ``resolution``: the count the image and
    joint clusterings take when none is given (the paper's protocol), and SENCA-st's.

    ``obs["expression"]`` is reused when it was made with these parameters; when absent it is made (and
    kept); an ``obs["expression"]`` made otherwise is left as it is and the count computed aside.
    """
    wanted = {"modality": "expression", "n_clusters": None, "method": cluster_method, "random_state": random_state,
              "resolution_requested": float(resolution), "n_comps": int(n_comps), "refine_requested": bool(refine)}
    entry = adata.uns.get("expression")
    have = entry.get("params") if isinstance(entry, Mapping) else None
    if "expression" in adata.obs and isinstance(have, Mapping) and all(
            k in have and _steps._same(have[k], v) for k, v in wanted.items()) and _steps._same(
            have.get("n_neighbors_requested", have.get("n_neighbors")), int(n_neighbors)):
        _steps.reuse("cluster_expression")
        return int(adata.obs["expression"].nunique())
    key = "expression" if "expression" not in adata.obs else "_expression_count"
    stmic(adata, modality="expression", n_clusters=None, resolution=resolution, n_neighbors=n_neighbors,
          cluster_method=cluster_method, refine=refine, n_comps=n_comps, baselines=False, key_added=key,
          random_state=random_state)
    k = int(adata.obs[key].nunique())
    if key != "expression":
        del adata.obs[key], adata.uns[key]
    return k


def stmic(
    adata,
    *,
    n_clusters: int | None = None,
    resolution: float = 1.7,
    match_expression: bool = True,
    n_neighbors: int = 39,
    cluster_method: str = "louvain",
    refine: bool = False,
    n_comps: int = 10,
    modality_weights: tuple[float, float] | None = None,
    modality: str = "joint",
    baselines: bool = True,
    image=None,
    encoder: str = "efficientnet_lite2",
    encoder_weights: str | None = None,
    patch="spot",
    feature_key: str = "X_image",
    device: str = "auto",
    key_added: str | None = None,
    random_state: int = 0,
    progress: bool = True,
    copy: bool = False,
):
    """stMIC: image-aware spatial domains from expression and H&E (Song et al.).

    Runs :func:`expression_embedding`, :func:`stmorph.im.features` (unless ``obsm[feature_key]`` exists with
    the same patch and encoder), :func:`image_embedding`, :func:`integrate` and :func:`cluster`; a step whose
    output exists with the same parameters is reused. Defaults follow the paper (10 + 10 PCs, k = 39,
    Louvain, resolution in 1.5-1.9 or the expression baseline's count). The paper's encoder was ResNet-50
    (``encoder="resnet50"`` with local weights); the default here is the embedded EfficientNet-Lite2.

    Parameters
    ----------
    adata
        A section in stmorph's data model, with an image (or ``obsm[feature_key]``) unless
        ``modality="expression"``.
    n_clusters
        Number of domains; ``None``: the Louvain communities at ``resolution`` for the expression baseline,
        and, with ``match_expression``, the baseline's count for the image and joint clusterings.
    resolution
        Modularity resolution without ``n_clusters`` (the paper: 1.5-1.9), the search's start with it.
    match_expression
        Without ``n_clusters``, give the image and joint clusterings the expression baseline's count
        (:func:`expression_count`); otherwise they use ``resolution`` too.
    n_neighbors, cluster_method
        kNN graph size and ``"louvain"`` / ``"leiden"`` (or ``"gmm"``; see :func:`stmorph.tl.cluster`).
    refine
        Majority refinement over spatial neighbours (off, as published).
    n_comps
        Principal components per modality (the paper: 10).
    modality_weights
        ``(expression, image)`` multipliers in the concatenation; ``None`` = equal.
    modality
        ``"joint"`` (stMIC), ``"expression"`` (the GEBC baseline) or ``"image"`` (the image-only baseline).
    baselines
        With ``modality="joint"``, also the two baselines (``obs["expression"]``, ``obs["image"]``).
    image, encoder, encoder_weights, patch, feature_key, device
        Image features: an explicit image, the encoder and its weights file, the patch side (``"spot"``, the
        paper's), the ``obsm`` key, the torch device (see :func:`stmorph.im.features`).
    key_added
        ``obs`` key of the domains; default ``"stmic"``, ``"expression"`` or ``"image"`` by ``modality``.
    random_state
        Seed of the PCAs and the community detection.
    progress
        Progress bars for image features.
    copy
        Return a modified copy instead of writing into ``adata``.

    Sets the following fields:

    ``adata.obs[key_added]`` (and ``["expression"]``, ``["image"]`` with baselines)
        Domain labels.
    ``adata.obsm["X_expr_pca"]``, ``["X_image"]``, ``["X_image_pca"]``, ``["X_stmic"]``
        Embeddings (those the modality needs).
    ``adata.obs[f"{key_added}_confidence"]``, ``adata.uns[key_added]["confidence"]``
        Each spot's confidence (the posterior probability of its domain given the clustered embedding, see
        :mod:`stmorph.tl._confidence`) and each domain's stability (its spots' mean confidence).
    ``adata.uns[key_added]["params"]``
        Clustering parameters, the modality and the components.
    """
    adata = adata.copy() if copy else adata
    if modality not in MODALITIES:
        from ..errors import InputError

        msg = f"modality={modality!r} must be one of {MODALITIES}."
        raise InputError(msg)
    key = key_added or _KEYS[modality]
    graph = {"resolution": resolution, "n_neighbors": n_neighbors, "cluster_method": cluster_method,
             "refine": refine, "n_comps": n_comps, "random_state": random_state}
    features = {"feature_key": feature_key, "patch": patch, "encoder": encoder, "encoder_weights": encoder_weights,
                "device": device, "image": image, "progress": progress}
    if modality == "joint" and baselines:
        for m in ("expression", "image"):
            stmic(adata, n_clusters=n_clusters, match_expression=match_expression, modality=m, baselines=False,
                  modality_weights=modality_weights, **graph, **features)
    k = n_clusters
    if k is None and match_expression and modality != "expression":
        k = expression_count(adata, **graph)
    if modality == "expression":
        rep = expression_pca(adata, n_comps=n_comps, random_state=random_state)
    elif modality == "image":
        rep = image_pca(adata, n_comps=n_comps, random_state=random_state, **features)
    else:
        reps = (expression_pca(adata, n_comps=n_comps, random_state=random_state),
                image_pca(adata, n_comps=n_comps, random_state=random_state, **features))
        with _steps.step("integrate", announce=False):
            integrate(adata, reps, weights=modality_weights)
        rep = "X_stmic"
    with _steps.step(f"cluster_{key}"):
        cluster(adata, rep, key_added=key, n_clusters=k, n_neighbors=n_neighbors, method=cluster_method,
                resolution=resolution, refine=bool(refine), random_state=random_state)
    adata.uns[key]["params"].update(modality=modality, n_comps=int(n_comps), refine_requested=bool(refine))
    add_confidence(adata, key)
    if modality != "expression":
        adata.uns[key]["params"]["n_clusters_from"] = ("given" if n_clusters is not None else
                                                       "expression baseline" if match_expression else "resolution")
    return adata if copy else None


_GRAPH_OPTIONS = ("n_clusters", "resolution", "cluster_method", "n_neighbors", "refine")
_IMAGE_OPTIONS = ("encoder", "encoder_weights", "patch", "device")

register_method("expression", functools.partial(stmic, modality="expression", baselines=False),
                options=_GRAPH_OPTIONS,
                baseline=True,
                summary="stMIC's expression-only baseline (GEBC): CPM, log1p, scale, PCA 10, kNN 39, Louvain")
register_method("image", functools.partial(stmic, modality="image", baselines=False), image="required",
                options=(*_GRAPH_OPTIONS, *_IMAGE_OPTIONS), patches=("spot",),
                baseline=True,
                summary="stMIC's image-only baseline: CNN features of the spot patch, PCA 10, kNN 39, Louvain")
register_method("stmic", functools.partial(stmic, baselines=False), image="required",
                options=(*_GRAPH_OPTIONS, *_IMAGE_OPTIONS), patches=("spot",),
                summary="stMIC (Song et al.): expression PCA 10 + image PCA 10, kNN 39, Louvain")
register_group("stmic", ("expression", "image", "stmic"),
               summary="stMIC with both of its baselines (expression only, image only)")
