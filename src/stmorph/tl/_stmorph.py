"""stmorph's own method: spatial-context expression + image context, a Gaussian mixture, spatial refinement.

What the founding papers and the strongest peers teach, as one chain of named steps::

    spatial_expression_embedding   counts -> CPM 1e4 -> log1p -> HVG (seurat_v3) -> scale
                                   -> [own | Gaussian neighbourhood mean at each radius (um)] -> PCA   obsm["X_stmorph_expr"]
    im.features (one pass)         spot patch + context patch (side 3 spacings: the spot and its     obsm["X_image"],
                                   first ring), the context's map averaged over the section only     ["X_image_ring_section"]
    image_context_embedding        standardise -> PCA per patch size -> neighbourhood mean -> PCA     obsm["X_stmorph_image"]
    integrate (balanced)           each modality scaled to unit total variance, image x weight        obsm["X_stmorph"]
    cluster                        tied-covariance Gaussian mixture (mclust EEE's role), exactly k
                                   or k chosen by modularity; majority refinement over the first ring obs["stmorph"]

Why each step:

- *Spatial context* (BANKSY, GraphST, SENCA-st's neighbourhood attention): a domain is a
  neighbourhood-level state, so each spot is described by its own expression *and* the mean
  of its neighbourhood. Radii are in micrometres, so the same default describes the same
  piece of tissue on legacy ST (200 um pitch), Visium (100 um) and Visium HD bins.
  Smoothing comes before the reduction (spatially coherent directions gain over noise);
  the kernel is sparse and the PCA of the concatenation is computed implicitly with
  sparse products, so the cost is linear in the number of spots.
- *Image context* (SENCA-st, stMIC): the spot patch says what lies under the spot, a larger
  patch what surrounds it; each is reduced on its own and smoothed like expression. The context
  patch's feature map is averaged over the tissue section only (``pool="section"`` of
  :func:`stmorph.im.features`): averaged over the whole patch, a spot near the section's edge is
  described by the glass beyond it, and the clustering spent a domain on a band along the border.
  The context patch is the spot and its first ring of neighbours (side 3 spacings), not SENCA-st's
  radius of 3 spacings (side 6, ``context_patch="senca"``): the encoder's receptive field sees glass
  through a section-pooled map too, and the larger the patch, the more its features measure the
  distance to the section's edge rather than the tissue (BENCHMARKS.md section 7).
- *Balance*: blocks of different widths and scales would let one modality drown the other;
  each is scaled to unit total variance before the image weight is applied. This balance acts on
  distances (Louvain/Leiden, and the mixture's Ward and k-means starting points); the tied mixture
  itself whitens the concatenation, so its fit does not depend on a block's scale.
- *Model-based clustering to exactly k* (GraphST's mclust EEE): one covariance shared by all
  domains suits embeddings where domains differ in their means; seeded, several restarts.
- *Refinement* (SpaGCN, GraphST): a spot whose label is a minority among its first ring of
  neighbours takes the majority's. The ring reaches at most 150 um (:func:`~stmorph.tl._neighbors.refine_radius`):
  on legacy ST (200 um pitch) a majority over a 600 um ring erased narrow annotated structures, so the
  spots keep the mixture's labels there.

Without an image (or image features) the chain runs on expression alone and records so in
``uns["stmorph"]["params"]["modalities"]``.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from ..errors import DependencyError, InputError
from . import _steps
from ._cluster import MIXTURES, cluster
from ._confidence import add_confidence
from ._embedding import _counts, _pca, log_normalize, standardised_pca
from ._methods import has_image, register_method
from ._neighbors import coordinates_um, gaussian_smoother
from ._options import Option, between

#: Default neighbourhood radii (Gaussian sigma, micrometres; truncated at 2.5 sigma).
SIGMAS_UM = (100.0,)
#: Scaled expression is clipped at this many standard deviations (scanpy's ``scale(max_value=10)``).
MAX_Z = 10.0
#: Weight of the image block against expression's, both at unit total variance. With the tied Gaussian mixture
#: (the default clustering) it moves only the restarts' starting points (Ward, k-means): the mixture's likelihood
#: does not depend on a block's scale. With Louvain/Leiden it weighs the modalities in the kNN distances.
IMAGE_WEIGHT = 0.3
#: When the ``seurat_v3`` loess fails, genes are ranked again among those detected in at least this many spots
#: (and 1% of them).
MIN_SPOTS_PER_GENE = 3
#: Rankings of variable genes: scanpy's ``flavor``. ``"seurat_v3"`` (default; what GraphST and STAGATE use) ranks
#: genes on the counts by their variance standardised for the mean; ``"seurat"`` ranks log-normalised dispersion.
HVG_FLAVORS = ("seurat_v3", "seurat")
#: Seed of the embeddings' randomized solvers, whatever the method's ``random_state``: the top components of a
#: spectrum as flat as a section's expression (the 20th and 21st singular values within 1%) are only approximated,
#: and a seed-dependent approximation made the domains move with the seed. The seed moves the clustering's runs.
EMBEDDING_SEED = 0
#: Context patches of the image block: ``"ring"`` (default), the spot and its first ring of neighbours (side 3
#: spot spacings); ``"senca"``, SENCA-st's radius of 3 spacings (side 6). Names of :data:`~._steps.PATCHES`.
CONTEXT_PATCHES = {"ring": "ring", "senca": "context"}


def _check_sigmas(sigmas_um) -> list[float]:
    sig = [float(s) for s in (sigmas_um if isinstance(sigmas_um, Sequence) else [sigmas_um])]
    if not sig or any(not np.isfinite(s) or s <= 0 for s in sig):
        msg = f"sigmas_um={sigmas_um} must be one or more positive radii in micrometres."
        raise InputError(msg)
    return sig


def _neighbourhood_means(xy_um: np.ndarray, sigmas_um: list[float]) -> list[sp.csr_matrix]:
    """One row-stochastic Gaussian kernel per radius, the spot itself left out (as BANKSY does): the balance
    between a spot and its neighbourhood is then the same whatever the spot density of the platform."""
    return [gaussian_smoother(xy_um, s, include_self=False) for s in sigmas_um]


def _with_context(P: np.ndarray, xy_um: np.ndarray, sigmas_um: list[float]) -> np.ndarray:
    """``[P | W_s P for each sigma]``: own coordinates plus neighbourhood means."""
    return np.hstack([P] + [np.asarray(W @ P) for W in _neighbourhood_means(xy_um, sigmas_um)])


def _check_hvg_flavor(flavor: str) -> str:
    if flavor not in HVG_FLAVORS:
        msg = f"hvg_flavor={flavor!r} must be one of {HVG_FLAVORS}."
        raise InputError(msg)
    return flavor


def _log_hvg(X: sp.csr_matrix, n_top_genes: int | None, target_sum: float,
             flavor: str = "seurat_v3") -> tuple[sp.csr_matrix, np.ndarray]:
    """Log-normalised counts restricted to the most variable genes: scanpy's ``"seurat_v3"`` ranking (the
    variance of counts standardised by a loess fit of variance on mean, on the counts ``X``) or ``"seurat"``
    (dispersion of the log-normalised values, binned by mean)."""
    L = log_normalize(X, target_sum=target_sum)
    genes = np.arange(L.shape[1])
    if n_top_genes is not None and n_top_genes < L.shape[1]:
        import anndata as ad
        import scanpy as sc

        _check_hvg_flavor(flavor)
        counts = sp.csr_matrix(X, dtype=np.float32) if flavor == "seurat_v3" else None  # seurat ranks the logs

        def rank(columns, how):  # the top genes among `columns` (gene indices) by scanpy's flavor `how`
            M = counts if how == "seurat_v3" else L
            tmp = ad.AnnData(M if len(columns) == M.shape[1] else M[:, columns])  # no copy of every gene (HD)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sc.pp.highly_variable_genes(tmp, n_top_genes=int(min(n_top_genes, len(columns))), flavor=how)
            return columns[tmp.var["highly_variable"].to_numpy()]

        try:
            genes = rank(genes, flavor)
            failed = None
        except ImportError:
            msg = "hvg_flavor='seurat_v3' needs scikit-misc (pip install scikit-misc), or use hvg_flavor='seurat'."
            raise DependencyError(msg) from None
        except ValueError as e:  # the loess fit of variance on mean can fail on unusual counts
            if flavor != "seurat_v3":
                raise
            failed = str(e).splitlines()[0] if str(e) else type(e).__name__
        if failed is not None:
            # thousands of genes seen in one or two spots share one mean and variance, which can make the loess
            # singular; without them (Seurat's min.cells) it usually fits, and ranking by dispersion then does not
            # fill the list with them either
            detected = np.flatnonzero(np.asarray((counts > 0).sum(axis=0)).ravel()
                                      >= max(MIN_SPOTS_PER_GENE, int(np.ceil(0.01 * counts.shape[0]))))
            if detected.size < 2:  # (almost) every gene that rare: rank them all
                detected = np.arange(counts.shape[1])
            try:
                genes, fallback = rank(detected, "seurat_v3"), "seurat_v3 again"
            except ValueError:
                genes, fallback = rank(detected, "seurat"), "'seurat' (log dispersion)"
            warnings.warn(f"the seurat_v3 ranking of variable genes failed ({failed}); they were ranked by "
                          f"{fallback} on the genes detected in at least 1% of the spots instead.", UserWarning,
                          stacklevel=3)
        L = L[:, genes]
    return sp.csr_matrix(L), genes


def _scale_sparse(L: sp.csr_matrix) -> tuple[sp.csr_matrix, int]:
    """Each gene scaled to unit variance, centring left implicit so the matrix stays sparse; values above
    :data:`MAX_Z` standard deviations are clipped (scanpy's ``scale(max_value=10)``) so that a gene seen in a
    handful of spots cannot make those spots outliers that the mixture then spends domains on. Constant genes
    are dropped; returns the matrix and the number of genes kept."""
    mean = np.asarray(L.mean(axis=0)).ravel()
    var = np.asarray(L.multiply(L).mean(axis=0)).ravel() - mean**2
    keep = var > 1e-12
    L = sp.csr_matrix(L[:, keep])
    sd = np.sqrt(var[keep])
    L.data = np.minimum(L.data, (mean[keep] + MAX_Z * sd)[L.indices])
    return sp.csr_matrix(L @ sp.diags(1.0 / sd)), int(keep.sum())


def _context_pca(L: sp.csr_matrix, smoothers: list, n_comps: int, random_state: int, *, n_iter: int = 6,
                 oversample: int = 20) -> np.ndarray:
    """Top principal components of ``[Lc | W_1 Lc | W_2 Lc ...]`` without forming it (``Lc``: centred ``L``).

    Smoothing comes before the reduction, so directions that are spatially coherent
    (domains) gain over spot-level noise, while every product stays sparse: Halko et
    al.'s randomized range finder with power iterations, linear in the non-zeros of
    ``L`` and of the smoothers. Signs are fixed so the output does not depend on the
    seed's sign flips.
    """
    n, d = L.shape
    mu = np.asarray(L.mean(axis=0)).ravel()
    blocks = [None, *smoothers]  # None = identity
    nb = len(blocks)

    def lc(B):  # Lc @ B
        return np.asarray(L @ B) - np.outer(np.ones(n), mu @ B)

    def lct(A):  # Lc^T @ A
        return np.asarray(L.T @ A) - np.outer(mu, A.sum(axis=0))

    # column means of each block W Lc: (1^T W Lc) / n
    means = [np.zeros(d) if W is None else lct(np.asarray(W.sum(axis=0)).reshape(-1, 1)).ravel() / n for W in blocks]
    m = np.concatenate(means)

    def right(B):  # Mc @ B
        out = np.zeros((n, B.shape[1]))
        for b, W in enumerate(blocks):
            part = lc(B[b * d:(b + 1) * d])
            out += part if W is None else np.asarray(W @ part)
        return out - np.outer(np.ones(n), m @ B)

    def left(A):  # Mc^T @ A
        parts = [lct(A if W is None else np.asarray(W.T @ A)) for W in blocks]
        return np.vstack(parts) - np.outer(m, A.sum(axis=0))

    rng = np.random.default_rng(random_state)
    q = min(n_comps + oversample, n, d * nb)
    Q, _ = np.linalg.qr(right(rng.standard_normal((d * nb, q))))
    for _ in range(n_iter):
        Q, _ = np.linalg.qr(left(Q))
        Q, _ = np.linalg.qr(right(Q))
    B = left(Q).T  # (q, d * nb)
    Ub, sv, _ = np.linalg.svd(B, full_matrices=False)
    Z = (Q @ Ub[:, :n_comps]) * sv[:n_comps]
    signs = np.sign(Z[np.argmax(np.abs(Z), axis=0), np.arange(Z.shape[1])])
    signs[signs == 0] = 1
    return (Z * signs).astype(np.float32), sv[:n_comps]


def _expression_context(X: sp.csr_matrix, smoothers: list, *, n_top_genes: int | None, hvg_flavor: str, n_comps: int,
                        target_sum: float, random_state: int) -> tuple[np.ndarray, np.ndarray, int]:
    """:func:`spatial_expression_embedding` on counts ``X`` and neighbourhood ``smoothers`` (empty: own expression
    only): the embedding, its singular values and the number of genes used."""
    L, _ = _log_hvg(X, n_top_genes, target_sum, hvg_flavor)
    L, n_genes_used = _scale_sparse(L)
    n_out = int(min(n_comps, min(L.shape) - 1))
    if n_out < 1:
        msg = f"{X.shape[0]} spot(s) x {L.shape[1]} variable gene(s) are too few for an expression embedding."
        raise InputError(msg)
    with threadpool_limits(1):  # tall-skinny QRs: BLAS threads only contend (10x slower on a busy 2-core machine)
        Z, singular_values = _context_pca(L, smoothers, n_out, random_state)
    return Z, singular_values, n_genes_used


def spatial_expression_embedding(
    adata,
    *,
    sigmas_um: float | Sequence[float] = SIGMAS_UM,
    n_top_genes: int | None = 3000,
    hvg_flavor: str = "seurat_v3",
    n_comps: int = 20,
    target_sum: float = 1e4,
    layer: str | None = None,
    key_added: str = "X_stmorph_expression",
    random_state: int = 0,
    copy: bool = False,
):
    """Expression with its spatial context: own profile plus neighbourhood means, reduced by PCA.

    Parameters
    ----------
    adata
        Raw counts in ``X`` (or ``layers[layer]``), ``obsm["spatial"]`` and ``uns["spatial"]``.
    sigmas_um
        One or more neighbourhood radii (Gaussian sigma, micrometres; truncated at 2.5 sigma).
    n_top_genes
        Most variable genes kept; ``None`` keeps every gene.
    hvg_flavor
        How they are ranked (scanpy's ``flavor``): ``"seurat_v3"`` (variance of the counts standardised for
        their mean; needs raw counts and scikit-misc) or ``"seurat"`` (dispersion of log-normalised values).
    n_comps
        Components of the final embedding.
    target_sum, layer
        Library-size target and the layer holding counts.
    key_added
        ``obsm`` key of the embedding.
    random_state
        Seed of the PCA solvers.
    copy
        Return a modified copy instead of writing into ``adata``.

    Sets the following fields:

    ``adata.obsm[key_added]``
        ``float32 (n_obs, n_comps)``.
    ``adata.uns[key_added]["params"]``
        Parameters and the number of genes used.
    """
    adata = adata.copy() if copy else adata
    sig = _check_sigmas(sigmas_um)
    X, _ = _counts(adata, layer)
    smoothers = _neighbourhood_means(coordinates_um(adata), sig)
    Z, singular_values, n_genes_used = _expression_context(X, smoothers, n_top_genes=n_top_genes,
                                                           hvg_flavor=_check_hvg_flavor(hvg_flavor), n_comps=n_comps,
                                                           target_sum=target_sum, random_state=random_state)
    n_out = Z.shape[1]
    adata.obsm[key_added] = Z
    adata.uns[key_added] = {
        "step": "spatial_expression_embedding",
        "params": {"sigmas_um": sig, "n_top_genes": n_top_genes, "hvg_flavor": hvg_flavor, "n_genes_used": n_genes_used,
                   "n_comps": n_out, "n_comps_requested": int(n_comps), "target_sum": float(target_sum),
                   "layer": layer, "random_state": random_state},
        "singular_values": singular_values,
    }
    return adata if copy else None


def image_context_embedding(
    adata,
    *,
    use_reps: Sequence[str] = ("X_image", "X_image_ring_section"),
    sigmas_um: float | Sequence[float] = SIGMAS_UM,
    n_comps: int = 10,
    key_added: str = "X_stmorph_image",
    random_state: int = 0,
    copy: bool = False,
):
    """Image features of the spot and its context, each standardised and reduced, with spatial context.

    Spots without image features (patch outside the image) are placed at the mean image.

    Sets the following fields:

    ``adata.obsm[key_added]``
        ``float32 (n_obs, n_comps)``.
    ``adata.uns[key_added]["params"]``
        The feature keys, radii and components used.
    """
    adata = adata.copy() if copy else adata
    sig = _check_sigmas(sigmas_um)
    blocks = []
    for rep in use_reps:
        if rep not in adata.obsm:
            msg = f"adata.obsm[{rep!r}] is missing: compute image features first (stmorph.im.features)."
            raise InputError(msg)
        P, _, _ = standardised_pca(adata.obsm[rep], n_comps, rep)
        blocks.append(P / np.sqrt(P.var(axis=0).sum() + 1e-12))
    xy = coordinates_um(adata)
    C = _with_context(np.hstack(blocks).astype(np.float64), xy, sig)
    Z, evr = _pca(C, int(min(n_comps, min(C.shape) - 1)), random_state)
    adata.obsm[key_added] = Z
    adata.uns[key_added] = {
        "step": "image_context_embedding",
        "params": {"use_reps": list(use_reps), "sigmas_um": sig, "n_comps": int(Z.shape[1]),
                   "n_comps_requested": int(n_comps), "random_state": random_state,
                   "features": [_feature_id(adata, r) for r in use_reps]},
        "variance_ratio": evr,
    }
    return adata if copy else None


def _feature_id(adata, key: str) -> str:
    """What identifies the features in ``obsm[key]`` (their cache key), "" when unrecorded."""
    entry = adata.uns.get(key)
    params = entry.get("params") if isinstance(entry, dict) else None
    return str(params.get("cache_key", "")) if isinstance(params, dict) else ""


def balanced_integrate(adata, reps: Sequence[str], weights: Sequence[float], *, key_added: str = "X_stmorph"):
    """Concatenate embeddings, each scaled to unit total variance and multiplied by its weight.

    Sets ``adata.obsm[key_added]`` and ``adata.uns[key_added]["params"]``.
    """
    blocks = []
    for rep, w in zip(reps, weights):
        E = np.asarray(adata.obsm[rep], dtype=np.float64)
        E = E - E.mean(axis=0)
        blocks.append(float(w) * E / np.sqrt(E.var(axis=0).sum() + 1e-12))
    adata.obsm[key_added] = np.hstack(blocks).astype(np.float32)
    adata.uns[key_added] = {"params": {"reps": list(reps), "weights": [float(w) for w in weights],
                                       "scaling": "unit total variance per block"}}


def _reuse_or_run(adata, key: str, kind: str, params: dict, name: str, fn, **kwargs) -> None:
    """``fn(adata, key_added=key, **kwargs)`` as the step ``name``, unless an output of the same step with the same
    ``params`` exists: then ``obsm[key]`` is that output (the same array)."""
    found = _steps.find_output(adata, params, prefer=key, kind=kind)
    if found is None:
        with _steps.step(name):
            fn(adata, key_added=key, **kwargs)
        return
    if found != key:
        adata.obsm[key] = adata.obsm[found]
        adata.uns[key] = {**adata.uns[found], "params": {**adata.uns[found]["params"], "same_as": found}}
    _steps.reuse(name)


def _context_name(context_patch: str, context_pool: str) -> str:
    """The declared patch (:data:`~._steps.PATCHES`) of the image context for these options."""
    if context_pool not in ("section", "mean"):
        msg = f"context_pool={context_pool!r} must be 'section' or 'mean'."
        raise InputError(msg)
    if context_patch not in CONTEXT_PATCHES:
        msg = f"context_patch={context_patch!r} must be one of {tuple(CONTEXT_PATCHES)}."
        raise InputError(msg)
    name = CONTEXT_PATCHES[context_patch]
    return f"{name}_section" if context_pool == "section" else name


def stmorph(
    adata,
    *,
    n_clusters: int | None = None,
    use_image: bool | None = None,
    image_weight: float = IMAGE_WEIGHT,
    sigmas_um: float | Sequence[float] = SIGMAS_UM,
    n_top_genes: int | None = 3000,
    hvg_flavor: str = "seurat_v3",
    n_comps: int = 20,
    cluster_method: str = "consensus",
    resolution: float | None = None,
    n_neighbors: int | None = None,
    n_init: int = 10,
    k_range: tuple[int, int] = (2, 12),
    refine: bool = True,
    refine_radius_um: float | None = None,
    context_pool: str = "section",
    context_patch: str = "ring",
    image=None,
    encoder: str = "efficientnet_lite2",
    encoder_weights: str | None = None,
    patch="spot",
    device: str = "auto",
    key_added: str = "stmorph",
    random_state: int = 0,
    progress: bool = True,
    copy: bool = False,
):
    """stmorph's recommended domains: spatial-context expression (+ H&E context), Gaussian mixture, refinement.

    The chain (see the module's description for why each step)::

        spatial_expression_embedding   obsm[f"X_{key_added}_expression"]
        im.features (one pass)         obsm["X_image"], obsm["X_image_ring_section"]   (with an image)
        image_context_embedding        obsm[f"X_{key_added}_image"]                    (with an image)
        balanced_integrate             obsm[f"X_{key_added}"]
        cluster                        obs[key_added]

    A step whose output exists with the same parameters (e.g. the expression embedding of another run
    with other clustering options) is reused, not computed again.

    Parameters
    ----------
    adata
        A section in stmorph's data model (counts, ``obsm["spatial"]``, ``uns["spatial"]``).
    n_clusters
        Number of domains; ``None`` chooses it as the number of Louvain communities
        of the embedding's kNN graph (k = 15, resolution 0.5; see
        :func:`stmorph.tl.choose_n_clusters`), within ``k_range``; recorded in ``uns[key_added]``.
    use_image
        ``None``: use the H&E when there is one (or image features in ``obsm``);
        ``False``: expression only; ``True``: refuse to run without one.
    image_weight
        Weight of the image block after both are scaled to unit total variance. With
        ``cluster_method="gmm"`` it changes only where the mixture's restarts start (a
        full shared covariance makes the likelihood blind to a block's scale); with
        ``"louvain"``/``"leiden"`` it weighs the image in the kNN graph.
    sigmas_um
        Neighbourhood radii (Gaussian sigma, micrometres).
    n_top_genes, hvg_flavor, n_comps
        Variable genes (how many, how ranked: see :func:`spatial_expression_embedding`) and components of the
        expression embedding.
    cluster_method
        ``"consensus"`` (default): the majority of many tied Gaussian mixtures (:mod:`stmorph.tl._consensus`),
        its confidence each spot's co-assignment frequency; ``"gmm"``: one tied
        mixture, the best of ``n_init`` restarts; ``"louvain"`` or ``"leiden"``.
    resolution, n_neighbors
        ``"louvain"``/``"leiden"`` only: the modularity resolution without ``n_clusters`` (default 1.7) and the
        kNN graph size (default 39). Refused with ``"consensus"`` and ``"gmm"``, which use neither.
    n_init, k_range
        Restarts of ``cluster_method="gmm"`` and the counts considered without ``n_clusters``.
    refine, refine_radius_um
        Majority refinement over spatial neighbours (default radius 1.5 spot spacings, at most 150 um).
    context_pool
        ``"section"`` (default): the context patch's feature map averaged over the tissue section only
        (``obsm["X_image_ring_section"]``); ``"mean"``: over the whole patch, glass included
        (``obsm["X_image_ring"]``), to see what the section pooling changes.
    context_patch
        ``"ring"`` (default): the context patch is the spot and its first ring of neighbours (side 3 spot
        spacings); ``"senca"``: SENCA-st's radius of 3 spacings (side 6; ``obsm["X_image_context_section"]``,
        or SENCA-st's own ``obsm["X_image_context"]`` with ``context_pool="mean"``).
    image, encoder, encoder_weights, patch, device
        Image features, as :func:`stmorph.im.features` (``patch``: the spot patch's side).
    key_added
        ``obs`` key of the domains, ``uns`` key of the parameters, and the stem of the embeddings' keys.
    random_state
        Seed of the clustering (the consensus' runs, or the mixture's restarts or graph communities); the
        embeddings' solvers always start from :data:`EMBEDDING_SEED`, so the embedding is the same for every seed.
    progress
        Progress bars for image features.
    copy
        Return a modified copy instead of writing into ``adata``.

    Returns
    -------
    ``None``, or the modified copy with ``copy=True``.

    Sets the following fields:

    ``adata.obs[key_added]``
        Domain labels ``"0"``, ``"1"``, ... by decreasing size.
    ``adata.obsm[f"X_{key_added}_expression"]``, ``[f"X_{key_added}_image"]``, ``[f"X_{key_added}"]``
        The expression embedding, the image block (with an image) and their balanced concatenation.
    ``adata.obsm["X_image"]``, ``["X_image_ring_section"]``
        Image features of the spot and context patches (with an image).
    ``adata.obs[f"{key_added}_confidence"]``, ``adata.uns[key_added]["confidence"]``
        Each spot's confidence in [0, 1] and each domain's stability (its spots' mean confidence); which kind
        (co-assignment frequency or posterior probability) is recorded there (see :mod:`stmorph.tl._confidence`).
    ``adata.uns[key_added]["params"]``
        Every parameter used, the modalities and the refinement.
    """
    adata = adata.copy() if copy else adata
    graph = cluster_method not in MIXTURES
    if not graph and (resolution is not None or n_neighbors is not None):
        msg = (f"resolution/n_neighbors are options of cluster_method='louvain' or 'leiden'; the Gaussian mixture "
               f"(cluster_method={cluster_method!r}) uses neither: leave them out or choose louvain or leiden.")
        raise InputError(msg)
    context_name = _context_name(context_patch, context_pool)
    sig = _check_sigmas(sigmas_um)
    available = has_image(adata, image)
    if use_image and not available:
        msg = "stmorph: use_image=True but there is no full-resolution image and no image features."
        raise InputError(msg)
    if use_image is None and not available:
        warnings.warn("stmorph: no H&E image or image features; domains come from expression alone.", stacklevel=2)
    with_image = available if use_image is None else bool(use_image)
    expr_key = f"X_{key_added}_expression"
    _reuse_or_run(adata, expr_key, "spatial_expression_embedding",
                  {"sigmas_um": sig, "n_top_genes": n_top_genes, "hvg_flavor": hvg_flavor,
                   "n_comps_requested": int(n_comps), "target_sum": 1e4, "layer": None, "random_state": EMBEDDING_SEED},
                  "stmorph_expression", spatial_expression_embedding, sigmas_um=sig, n_top_genes=n_top_genes,
                  hvg_flavor=_check_hvg_flavor(hvg_flavor), n_comps=int(n_comps), random_state=EMBEDDING_SEED)
    reps, weights = [expr_key], [1.0]
    if with_image:
        specs = [_steps.feature_spec("spot", patch), _steps.feature_spec(context_name)]
        use_reps = _steps.image_features(adata, specs, encoder=encoder, encoder_weights=encoder_weights,
                                         device=device, image=image, progress=progress)
        image_key = f"X_{key_added}_image"
        _reuse_or_run(adata, image_key, "image_context_embedding",
                      {"use_reps": list(use_reps), "sigmas_um": sig, "n_comps_requested": 10,
                       "random_state": EMBEDDING_SEED, "features": [_feature_id(adata, r) for r in use_reps]},
                      "stmorph_image", image_context_embedding, use_reps=use_reps, sigmas_um=sig,
                      random_state=EMBEDDING_SEED)
        reps.append(image_key)
        weights.append(float(image_weight))
    with _steps.step(f"{key_added}_integrate", announce=False):
        balanced_integrate(adata, reps, weights, key_added=f"X_{key_added}")
    graph_kw = {"n_neighbors": 39 if n_neighbors is None else n_neighbors,
                "resolution": 1.7 if resolution is None else resolution} if graph else {}
    with _steps.step(f"cluster_{key_added}"):
        cluster(adata, f"X_{key_added}", key_added=key_added, method=cluster_method, n_clusters=n_clusters,
                n_init=int(n_init), k_range=tuple(k_range), refine=bool(refine), refine_radius_um=refine_radius_um,
                random_state=random_state, **graph_kw)
    adata.uns[key_added]["params"].update(
        modalities=["expression", "image"] if with_image else ["expression"],
        image_weight=float(image_weight) if with_image else 0.0, sigmas_um=list(sig),
        n_top_genes=n_top_genes, hvg_flavor=hvg_flavor, context_pool=context_pool if with_image else None,
        context_patch=context_patch if with_image else None,
    )
    if "confidence" not in adata.uns[key_added]:  # the clustering gave none (cluster() rewrote uns[key_added])
        add_confidence(adata, key_added)
    return adata if copy else None


#: Defaults of :func:`stmorph` (the method's, as registered).
DEFAULTS = {k: p.default for k, p in inspect.signature(stmorph).parameters.items()
            if p.default is not inspect.Parameter.empty and k not in ("copy", "progress", "image", "key_added")}

_CLUSTERING = ("n_clusters", "cluster_method", "resolution", "n_neighbors", "refine")
_EXPRESSION = ("sigmas_um", "n_top_genes", "hvg_flavor")
_GROUP = "the stmorph method"
OPTIONS = (
    Option("sigmas_um", "neighbourhood radius or radii (Gaussian sigma, micrometres of tissue)",
           between(0, 1e4, open_low=True), nargs="+", flag="--sigma-um", metavar="UM", group=_GROUP),
    Option("n_top_genes", "variable genes of the expression embedding", between(2, 10**6, kind=int), metavar="N",
           group=_GROUP),
    Option("hvg_flavor", "how they are ranked: scanpy's seurat_v3 on the counts or seurat on the logs",
           choices=HVG_FLAVORS, group=_GROUP),
    Option("image_weight", "weight of the image block against expression's (see stmorph.tl.stmorph)",
           between(0, 100, open_low=True), metavar="W", group=_GROUP),
    Option("context_patch", "the image's context patch: the spot and its first ring of neighbours (ring) or "
           "SENCA-st's radius of 3 spot spacings (senca)", choices=tuple(CONTEXT_PATCHES), group=_GROUP),
)

register_method("stmorph", stmorph, image="optional", declare=OPTIONS,
                options=(*_CLUSTERING, *_EXPRESSION, "image_weight", "context_patch", "encoder", "encoder_weights",
                         "patch", "device"),
                patches=lambda o: ("spot", _context_name(o["context_patch"], o.get("context_pool", "section"))),
                reads_image=lambda o: o.get("use_image", None) is not False,
                summary="stmorph: expression with spatial context (+ image spot and context patches), "
                        "tied Gaussian mixture, spatial refinement")
register_method("stmorph_expr", functools.partial(stmorph, use_image=False, key_added="stmorph_expr"),
                options=(*_CLUSTERING, *_EXPRESSION),
                baseline=True,
                summary="stmorph on expression alone (the image ignored): the variant that shows what the "
                        "H&E adds")
