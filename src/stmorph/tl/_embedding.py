"""stMIC's per-modality embeddings and their integration (Song et al., Fig. 1B, sections 2.2 and 2.5).

- :func:`expression_embedding`: counts -> CPM (target 1e4) -> log1p -> scale to unit variance -> PCA.
- :func:`image_embedding`: CNN features -> StandardScaler -> PCA.
- :func:`integrate`: per-spot concatenation of the two embeddings.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp

from ..errors import InputError


def _counts(adata, layer: str | None):
    if layer is None:
        X = adata.X
        where = "adata.X"
    else:
        if layer not in adata.layers:
            msg = f"layer {layer!r} not in adata.layers (have {list(adata.layers)})."
            raise InputError(msg)
        X = adata.layers[layer]
        where = f"adata.layers[{layer!r}]"
    if X is None or X.shape[0] == 0 or X.shape[1] == 0:
        msg = f"{where} is empty (shape {None if X is None else X.shape}); expression counts are required."
        raise InputError(msg)
    X = sp.csr_matrix(X, dtype=np.float64) if sp.issparse(X) else sp.csr_matrix(np.asarray(X, dtype=np.float64))
    if X.nnz and X.data.min() < 0:
        msg = f"{where} has negative values; pass raw counts (or layer='counts')."
        raise InputError(msg)
    return X, where


def log_normalize(X: sp.csr_matrix, *, target_sum: float = 1e4, totals: np.ndarray | None = None) -> sp.csr_matrix:
    """Counts scaled to ``target_sum`` per spot, then log1p (sparse); a spot with zero counts is refused.

    ``totals``: each spot's library size, when ``X`` holds only some of its genes (default: the row sums of ``X``).
    """
    totals = np.asarray(X.sum(axis=1)).ravel() if totals is None else np.asarray(totals, dtype=np.float64).ravel()
    if np.any(totals <= 0):
        n = int(np.sum(totals <= 0))
        msg = f"{n} spot(s) have zero total counts; filter them out before embedding."
        raise InputError(msg)
    Y = sp.csr_matrix(sp.diags(target_sum / totals) @ X)
    Y.data = np.log1p(Y.data)
    return Y


def normalize_log_scale(
    X: sp.csr_matrix, *, target_sum: float = 1e4
) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray, np.ndarray]:
    """Library-size normalisation to ``target_sum``, log1p, and per-gene scaling factors.

    Returns ``(Y, mean, std, keep)`` where ``Y`` is the sparse log-normalised
    matrix restricted to genes with non-zero variance (``keep``) and divided by
    their standard deviation; centring (subtracting ``mean / std``) is left
    implicit so the matrix stays sparse.
    """
    Y = log_normalize(X, target_sum=target_sum)
    mean = np.asarray(Y.mean(axis=0)).ravel()
    sq = np.asarray(Y.multiply(Y).mean(axis=0)).ravel()
    var = np.maximum(sq - mean**2, 0.0) * (Y.shape[0] / max(Y.shape[0] - 1, 1))
    std = np.sqrt(var)
    keep = std > 1e-12
    Y = Y[:, keep]
    Y = sp.csr_matrix(Y @ sp.diags(1.0 / std[keep]))
    return Y, mean[keep] / std[keep], std[keep], keep


def _pca(Y, n_comps: int, random_state: int):
    """PCA with implicit centring for sparse input (no densification)."""
    from sklearn.decomposition import PCA

    n_comps = int(n_comps)
    limit = min(Y.shape) - 1
    if limit < 1:
        msg = (f"{Y.shape[0]} spot(s) x {Y.shape[1]} feature(s) are too few for a PCA embedding; "
               "at least 3 spots with 2 varying features are needed.")
        raise InputError(msg)
    if n_comps < 1:
        msg = f"n_comps={n_comps} must be at least 1."
        raise InputError(msg)
    if n_comps > limit:
        warnings.warn(f"n_comps={n_comps} is more than {Y.shape[0]} spot(s) x {Y.shape[1]} feature(s) allow; "
                      f"using {limit} components.", stacklevel=3)
        n_comps = limit
    if sp.issparse(Y):
        solver = "arpack"  # implicit centring, no densification
    elif Y.shape[1] <= 4096 and Y.shape[0] >= Y.shape[1]:
        solver = "covariance_eigh"  # exact; one d x d covariance: ~20x faster than a full SVD here
    else:
        solver = "full"
    pca = PCA(n_components=n_comps, svd_solver=solver, random_state=random_state)
    Z = pca.fit_transform(Y)
    # Fix signs so the output does not depend on the solver's start vector.
    signs = np.sign(Z[np.argmax(np.abs(Z), axis=0), np.arange(Z.shape[1])])
    signs[signs == 0] = 1
    return (Z * signs).astype(np.float32), pca.explained_variance_ratio_.astype(np.float64)


def expression_embedding(
    adata,
    *,
    n_comps: int = 10,
    target_sum: float = 1e4,
    layer: str | None = None,
    n_top_genes: int | None = None,
    key_added: str = "X_expr_pca",
    random_state: int = 0,
    copy: bool = False,
):
    """Expression embedding of stMIC: CPM -> log1p -> unit variance -> PCA.

    Parameters
    ----------
    adata
        Raw counts in ``X`` (or ``layers[layer]``).
    n_comps
        Principal components kept (the paper: 10).
    target_sum
        Counts per spot after normalisation (the paper: 1e4).
    layer
        Take counts from this layer instead of ``X``.
    n_top_genes
        Restrict to the most variable genes (by variance of the log-normalised
        data) before scaling. ``None`` (the paper) uses every expressed gene.
    key_added
        ``obsm`` key of the embedding.
    random_state
        Seed of the PCA solver.
    copy
        Return a modified copy instead of writing into ``adata``.

    Returns
    -------
    ``None``, or the copy when ``copy=True``.

    Sets the following fields:

    ``adata.obsm[key_added]``
        ``float32 (n_obs, n_comps)`` principal components.
    ``adata.uns[key_added]["params"]``, ``["variance_ratio"]``
        Parameters and the explained variance ratio of each component.
    """
    adata = adata.copy() if copy else adata
    X, _ = _counts(adata, layer)
    Y, _, _, keep = normalize_log_scale(X, target_sum=target_sum)
    genes = np.flatnonzero(keep)
    if n_top_genes is not None and n_top_genes < Y.shape[1]:
        # the scaled data has unit variance: rank by variance of the log data instead
        logY = log_normalize(X, target_sum=target_sum)[:, genes]
        m = np.asarray(logY.mean(axis=0)).ravel()
        v = np.asarray(logY.multiply(logY).mean(axis=0)).ravel() - m**2
        top = np.sort(np.argsort(-v, kind="stable")[: int(n_top_genes)])
        Y, genes = Y[:, top], genes[top]
    Z, evr = _pca(Y, n_comps, random_state)
    adata.obsm[key_added] = Z
    adata.uns[key_added] = {
        "params": {
            "n_comps": int(Z.shape[1]),
            "target_sum": float(target_sum),
            "layer": layer,
            "n_top_genes": n_top_genes,
            "n_genes_used": int(len(genes)),
            "random_state": random_state,
        },
        "variance_ratio": evr,
    }
    return adata if copy else None


def standardised_pca(F, n_comps: int, name: str, *, chunk: int = 32768,
                     dtype=np.float32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PCA scores of the rows of ``F`` with each feature standardised; rows with a non-finite value are left
    out of the fit and score 0 (the mean). Returns ``(scores float32, explained variance ratio, finite rows)``.

    The exact covariance PCA (scikit-learn's ``covariance_eigh``) done in row chunks: ``F`` (float32,
    e.g. 463,000 Visium HD bins x 1,280 features = 2.4 GB) is never copied or converted whole, only the
    ``d x d`` covariance is held (whole-matrix float64 standardising and PCA peaked at 18 GB there).
    ``dtype`` is the precision of the chunk products (float32: large GEMMs at full speed; sums across
    chunks are float64 either way). Signs as :func:`_pca` fixes them.
    """
    if int(n_comps) < 1:
        msg = f"n_comps={n_comps} must be at least 1."
        raise InputError(msg)
    n, d = F.shape
    ok = np.ones(n, dtype=bool)
    s1, s2 = np.zeros(d), np.zeros(d)
    for lo in range(0, n, chunk):
        B = np.asarray(F[lo:lo + chunk], dtype=np.float64)
        good = np.isfinite(B).all(axis=1)
        ok[lo:lo + chunk] = good
        s1 += B[good].sum(axis=0)
        s2 += (B[good] ** 2).sum(axis=0)
    m = int(ok.sum())
    if m < 3:
        msg = f"adata.obsm[{name!r}] has fewer than three spots with finite features."
        raise InputError(msg)
    mu = s1 / m
    sd = np.sqrt(np.maximum(s2 / m - mu**2, 0.0))
    sd[sd < 1e-12] = 1.0
    k = int(min(n_comps, min(m, d) - 1))
    if k < 1:
        msg = f"adata.obsm[{name!r}] ({n} x {d}) is too small for a PCA."
        raise InputError(msg)
    if k < n_comps:
        warnings.warn(f"n_comps={n_comps} is more than {m} spot(s) x {d} feature(s) allow; using {k} components.",
                      stacklevel=3)

    mu_c, sd_c = mu.astype(dtype), sd.astype(dtype)

    def rows(lo):
        B = (np.asarray(F[lo:lo + chunk], dtype=dtype) - mu_c) / sd_c
        B[~ok[lo:lo + chunk]] = 0.0
        return B

    cov = np.zeros((d, d))
    for lo in range(0, n, chunk):
        B = rows(lo)
        cov += B.T @ B
    evals, evecs = np.linalg.eigh(cov / m)
    evals = np.maximum(evals[::-1], 0.0)
    V = evecs[:, ::-1][:, :k].astype(dtype)
    Z = np.vstack([rows(lo) @ V for lo in range(0, n, chunk)]).astype(np.float64)
    signs = np.sign(Z[np.argmax(np.abs(Z), axis=0), np.arange(k)])
    signs[signs == 0] = 1
    evr = evals[:k] / max(float(evals.sum()), 1e-300)
    return (Z * signs).astype(np.float32), evr, ok


def image_embedding(
    adata,
    *,
    use_rep: str = "X_image",
    n_comps: int = 10,
    key_added: str = "X_image_pca",
    random_state: int = 0,
    copy: bool = False,
):
    """Image embedding of stMIC: CNN features -> StandardScaler -> PCA.

    Spots whose features are missing (``NaN``, e.g. a patch entirely outside
    the image) are left out of the fit and placed at the origin of the
    embedding (the mean image), with a warning.

    Parameters
    ----------
    adata
        Holds image features in ``obsm[use_rep]`` (see :func:`stmorph.im.features`).
    use_rep
        ``obsm`` key of the image features.
    n_comps
        Principal components kept (the paper: 10).
    key_added
        ``obsm`` key of the embedding.
    random_state
        Seed of the PCA solver.
    copy
        Return a modified copy instead of writing into ``adata``.

    Sets the following fields:

    ``adata.obsm[key_added]``
        ``float32 (n_obs, n_comps)`` principal components.
    ``adata.uns[key_added]["params"]``, ``["variance_ratio"]``
        Parameters and explained variance ratio.
    """
    adata = adata.copy() if copy else adata
    if use_rep not in adata.obsm:
        msg = (
            f"adata.obsm[{use_rep!r}] is missing: compute image features first with "
            f"stmorph.im.features(adata, key_added={use_rep!r})."
        )
        raise InputError(msg)
    F = adata.obsm[use_rep]
    # float64 products: the stMIC baseline's numbers as a whole-matrix float64 PCA gives them
    Z, evr, ok = standardised_pca(F, n_comps, use_rep, dtype=np.float64)
    if not ok.all():
        warnings.warn(
            f"{int((~ok).sum())} spot(s) have no image features (patch outside the image); "
            "they are placed at the mean image in the embedding.",
            stacklevel=2,
        )
    adata.obsm[key_added] = Z
    adata.uns[key_added] = {
        "params": {"use_rep": use_rep, "n_comps": int(Z.shape[1]), "random_state": random_state,
                   "n_missing": int((~ok).sum())},
        "variance_ratio": evr,
    }
    return adata if copy else None


def integrate(
    adata,
    reps: Sequence[str] = ("X_expr_pca", "X_image_pca"),
    *,
    weights: Sequence[float] | None = None,
    key_added: str = "X_stmic",
    copy: bool = False,
):
    """Concatenate per-spot embeddings (stMIC's integration step).

    Parameters
    ----------
    adata
        Holds each representation in ``obsm``.
    reps
        ``obsm`` keys to concatenate, in order.
    weights
        One multiplier per representation; ``None`` (the paper) weights them
        equally, i.e. concatenates them as they are.
    key_added
        ``obsm`` key of the integrated representation.
    copy
        Return a modified copy instead of writing into ``adata``.

    Sets the following fields:

    ``adata.obsm[key_added]``
        ``float32 (n_obs, sum of widths)``.
    ``adata.uns[key_added]["params"]``
        The representations and weights used.
    """
    adata = adata.copy() if copy else adata
    reps = list(reps)
    missing = [r for r in reps if r not in adata.obsm]
    if missing:
        msg = f"adata.obsm lacks {missing}; run the embedding steps first (have {list(adata.obsm)})."
        raise InputError(msg)
    if weights is None:
        weights = [1.0] * len(reps)
    weights = [float(w) for w in weights]
    if len(weights) != len(reps) or any(w < 0 or not np.isfinite(w) for w in weights):
        msg = f"weights must be {len(reps)} non-negative numbers, one per representation; got {weights}."
        raise InputError(msg)
    blocks = [np.asarray(adata.obsm[r], dtype=np.float32) * w for r, w in zip(reps, weights)]
    adata.obsm[key_added] = np.concatenate(blocks, axis=1)
    adata.uns[key_added] = {"params": {"reps": reps, "weights": weights}}
    return adata if copy else None
