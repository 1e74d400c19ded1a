"""stMIC (Song et al.): expression PCA + image-feature PCA, concatenated, Louvain.

The method is a few named steps a reader can match to the paper's Figure 1B::

    expression_embedding   counts -> CPM 1e4 -> log1p -> scale -> PCA 10   obsm["X_expr_pca"]
    im.features            patch per spot (side = spot diameter) -> CNN   obsm["X_image"]
    image_embedding        StandardScaler -> PCA 10                        obsm["X_image_pca"]
    integrate              concatenation per spot                          obsm["X_stmic"]
    cluster                kNN (k = 39, Jaccard) -> Louvain                obs["stmic"]

with the paper's two baselines: expression only ("GEBC", ``obs["expression"]``)
and image only (``obs["image"]``). :func:`run_methods` runs any subset of the
methods stmorph offers (also SENCA-st) sharing the steps they have in common.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterable

from .. import _spatial
from ..errors import InputError
from ._cluster import cluster
from ._embedding import expression_embedding, image_embedding, integrate

#: Methods :func:`run_methods` knows, in the order they are run.
METHODS = ("expression", "image", "stmic", "senca")
#: Methods that need the H&E image (or precomputed image features).
IMAGE_METHODS = ("image", "stmic")


def has_image(adata, image=None, feature_key: str = "X_image") -> bool:
    """Whether image features exist or can be computed for ``adata``."""
    if image is not None or feature_key in adata.obsm:
        return True
    try:
        lib = _spatial.library(adata)
    except InputError:
        return False
    return bool(lib.get("metadata", {}).get("source_image_path")) or "fullres" in lib.get("images", {})


def run_methods(
    adata,
    methods: Iterable[str] = ("expression", "image", "stmic"),
    *,
    n_clusters: int | None = None,
    resolution: float = 1.7,
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
    skip_unavailable: bool = False,
    senca_options: dict | None = None,
    random_state: int = 0,
    progress: bool = True,
) -> dict[str, float]:
    """Run several domain-finding methods on one section, sharing common steps.

    Parameters
    ----------
    adata
        A section in stmorph's data model (see :func:`stmorph.validate`).
    methods
        Any of ``"expression"`` (the paper's GEBC baseline), ``"image"``
        (image only), ``"stmic"`` and ``"senca"``; ``"all"`` for all four.
    n_clusters
        Number of domains for every method. ``None``: the expression baseline
        uses ``resolution`` and, with ``match_expression``, the other methods
        take its cluster count (as the stMIC paper did).
    resolution
        Louvain resolution used when no cluster count is set (the paper: 1.5-1.9).
    match_expression
        Without ``n_clusters``, give the other methods the expression
        baseline's cluster count; otherwise they use ``resolution`` too
        (SENCA-st always needs a count).
    n_neighbors, cluster_method
        kNN size and ``"louvain"``/``"leiden"`` (see :func:`stmorph.tl.cluster`).
    n_comps
        Principal components per modality (the paper: 10).
    modality_weights
        ``(expression, image)`` multipliers in the concatenation; ``None`` = equal.
    image, encoder, encoder_weights, patch, feature_key, device
        Image features: an explicit image (path or array), the encoder name
        and weights file, the patch size (``"spot"``, pixels, or ``"NNum"``),
        the ``obsm`` key (reused when present, so features are computed once)
        and the torch device. See :func:`stmorph.im.features`.
    skip_unavailable
        Skip image methods when no image is available instead of raising.
    senca_options
        Keyword arguments for :func:`stmorph.tl.senca`.
    random_state
        Seed for PCA, community detection and SENCA-st.
    progress
        Show progress bars.

    Returns
    -------
    Seconds each method took, its shared steps included; a skipped method is absent.

    Sets the following fields:

    ``adata.obs[method]`` for each method run; the embeddings ``obsm["X_expr_pca"]``,
    ``obsm["X_image"]``, ``obsm["X_image_pca"]``, ``obsm["X_stmic"]``, ``obsm["X_senca"]``
    as needed; ``uns[method]["params"]``; ``uns["stmorph"]`` with ``steps_s`` (seconds per step),
    ``methods_s`` and ``skipped`` (method -> reason).
    """
    methods = list(METHODS) if methods == "all" or "all" in list(methods) else list(dict.fromkeys(methods))
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        msg = f"unknown method(s) {unknown}; choose from {list(METHODS)} or 'all'."
        raise InputError(msg)
    skipped: dict[str, str] = {}
    if not has_image(adata, image, feature_key):
        reason = "no full-resolution image (give one with image=/--image) and no precomputed image features"
        for m in IMAGE_METHODS:
            if m in methods:
                if not skip_unavailable:
                    msg = f"method {m!r} needs the H&E image: {reason}."
                    raise InputError(msg)
                skipped[m] = reason
        methods = [m for m in methods if m not in skipped]

    steps: dict[str, float] = {}

    def step(name, fn, *args, **kwargs):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        steps[name] = steps.get(name, 0.0) + time.perf_counter() - t0
        return out

    ckw = {"n_neighbors": n_neighbors, "method": cluster_method, "random_state": random_state}
    need_expr_count = n_clusters is None and match_expression and any(m != "expression" for m in methods)
    need_count_for_senca = n_clusters is None and "senca" in methods
    k_target = n_clusters

    if "expression" in methods or "stmic" in methods or need_expr_count or need_count_for_senca:
        step("expression_embedding", expression_embedding, adata, n_comps=n_comps, random_state=random_state)
    if "expression" in methods or need_expr_count or need_count_for_senca:
        step("cluster_expression", cluster, adata, "X_expr_pca", key_added="expression",
             n_clusters=n_clusters, resolution=resolution, **ckw)
        if k_target is None and (match_expression or "senca" in methods):
            k_target = int(adata.obs["expression"].nunique())
    k_other = k_target if (n_clusters is not None or match_expression) else None

    if "image" in methods or "stmic" in methods:
        if feature_key not in adata.obsm:
            from .. import im

            step("image_features", im.features, adata, encoder=encoder, weights=encoder_weights, patch=patch,
                 image=image, device=device, key_added=feature_key, progress=progress)
        else:
            steps.setdefault("image_features", 0.0)
        step("image_embedding", image_embedding, adata, use_rep=feature_key, n_comps=n_comps,
             random_state=random_state)
    if "image" in methods:
        step("cluster_image", cluster, adata, "X_image_pca", key_added="image",
             n_clusters=k_other, resolution=resolution, **ckw)
    if "stmic" in methods:
        step("integrate", integrate, adata, ("X_expr_pca", "X_image_pca"), weights=modality_weights)
        step("cluster_stmic", cluster, adata, "X_stmic", key_added="stmic",
             n_clusters=k_other, resolution=resolution, **ckw)
    if "senca" in methods:
        from .senca import senca

        opts = {"random_state": random_state, "device": device, "progress": progress, "encoder": encoder,
                "encoder_weights": encoder_weights}
        if image is not None:
            opts["image"] = image
        opts.update(senca_options or {})
        step("senca", senca, adata, k_target, **opts)

    uses = {
        "expression": ("expression_embedding", "cluster_expression"),
        "image": ("image_features", "image_embedding", "cluster_image"),
        "stmic": ("expression_embedding", "image_features", "image_embedding", "integrate", "cluster_stmic"),
        "senca": ("senca",),
    }
    seconds = {m: float(sum(steps.get(s, 0.0) for s in uses[m])) for m in methods}
    adata.uns["stmorph"] = {
        "steps_s": {k: float(v) for k, v in steps.items()},
        "methods_s": seconds,
        "skipped": skipped,
        "n_clusters": -1 if k_target is None else int(k_target),
    }
    for m, why in skipped.items():
        warnings.warn(f"skipped {m!r}: {why}", stacklevel=2)
    return seconds


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
        Clustering parameters; ``uns["stmorph"]`` holds step timings.
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
