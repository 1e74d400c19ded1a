"""A confidence for every spot's domain, and a stability for every domain.

Two kinds, recorded with the values (``uns[key]["confidence"]["kind"]``):

- ``"co-assignment"``: how often the spot fell in its domain's group across the restarts of a
  consensus clustering (written by the clustering that makes one, see :mod:`stmorph.tl._consensus`);
- ``"posterior"``: the posterior probability of the spot's domain under a Gaussian model of the
  representation that was clustered, one mean per domain and one covariance shared by all (the tied
  model of the mixture, fitted to the domains as labelled: one M step, one E step). Any method's domains
  get it from its embedding (:func:`label_posterior`): a spot far inside its domain scores near 1, a
  spot between two domains, or one the spatial refinement moved against its embedding, lower.

A domain's stability is the mean confidence of its spots.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

#: Ridge added to the shared covariance, relative to its mean variance (keeps it invertible).
COVARIANCE_RIDGE = 1e-3


def label_posterior(X: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``P(domain of spot i | x_i)`` under a tied Gaussian model fitted to ``labels``; ``(n,)`` in [0, 1].

    ``labels`` are integers ``0..K-1`` (every value present). With one domain every spot scores 1.
    """
    X = np.asarray(X, dtype=np.float64)
    labels = np.asarray(labels)
    codes, labels = np.unique(labels, return_inverse=True)
    k, n = codes.size, X.shape[0]
    if k < 2:
        return np.ones(n)
    means = np.stack([X[labels == c].mean(axis=0) for c in range(k)])
    R = X - means[labels]
    cov = R.T @ R / max(n - k, 1)
    cov += COVARIANCE_RIDGE * max(float(np.trace(cov)) / cov.shape[0], 1e-12) * np.eye(cov.shape[0])
    L = np.linalg.cholesky(cov)
    # squared Mahalanobis distance of every spot to every domain mean, through the Cholesky factor
    Z = np.linalg.solve(L, X.T).T
    M = np.linalg.solve(L, means.T).T
    d2 = (Z**2).sum(axis=1)[:, None] - 2 * Z @ M.T + (M**2).sum(axis=1)[None, :]
    logp = np.log(np.bincount(labels, minlength=k) / n)[None, :] - 0.5 * d2
    logp -= logp.max(axis=1, keepdims=True)
    p = np.exp(logp)
    p /= p.sum(axis=1, keepdims=True)
    return p[np.arange(n), labels]


def domain_stability(labels, confidence: np.ndarray) -> dict[str, float]:
    """Mean confidence of each domain's spots, by label."""
    s = pd.Series(np.asarray(confidence, dtype=float)).groupby(np.asarray(labels).astype(str)).mean()
    return {str(k): float(v) for k, v in s.items()}


def add_confidence(adata, key: str, confidence: np.ndarray | None = None, *, rep: str | None = None,
                   kind: str = "posterior", note: str = "") -> None:
    """Write ``obs[f"{key}_confidence"]`` and ``uns[key]["confidence"]`` (kind, per-domain stability).

    Without ``confidence`` it is :func:`label_posterior` of ``obsm[rep]`` (default: the representation the
    domains were clustered on, ``uns[key]["params"]["use_rep"]``) given ``obs[key]``.
    """
    codes = adata.obs[key].astype("category").cat.codes.to_numpy()
    if confidence is None:
        rep = rep or adata.uns[key]["params"]["use_rep"]
        confidence = label_posterior(adata.obsm[rep], codes)
        note = note or f"posterior probability of the domain under a tied Gaussian model of obsm[{rep!r}]"
    confidence = np.clip(np.asarray(confidence, dtype=np.float64), 0.0, 1.0)
    adata.obs[f"{key}_confidence"] = confidence.astype(np.float32)
    stability = domain_stability(adata.obs[key].astype(str).to_numpy(), confidence)
    adata.uns.setdefault(key, {})["confidence"] = {"kind": kind, "note": note, "domain_stability": stability,
                                                   "mean": float(confidence.mean())}
