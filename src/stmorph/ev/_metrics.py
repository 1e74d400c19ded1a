"""Agreement of predicted domains with an annotation: ARI and NMI.

Labels are always joined by spot name (``obs_names`` / a Series index), never
by row order. Spots without a label (NaN, empty string) and spots whose label
is in ``ignore`` (compared case-insensitively, default ``"undetermined"``) are
left out before scoring, which is the usual protocol on HER2ST and DLPFC.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import numpy as np
import pandas as pd

from ..errors import InputError

__all__ = ["ari", "nmi", "paired_labels", "scored_labels"]

DEFAULT_IGNORE = ("undetermined",)


def _as_series(adata, labels, what: str) -> pd.Series:
    """Labels as a Series indexed by spot name."""
    if isinstance(labels, pd.Series):
        if labels.index.has_duplicates:
            msg = f"the {what} Series has duplicated spot names in its index; labels are joined by spot name."
            raise InputError(msg)
        return labels
    if isinstance(labels, str):
        if labels not in adata.obs:
            have = ", ".join(map(str, adata.obs.columns)) or "none"
            msg = f"{what} {labels!r} is not a column of adata.obs (columns: {have})."
            raise InputError(msg)
        return adata.obs[labels]
    msg = f"{what} must be an obs column name or a pandas Series indexed by spot name; got {type(labels).__name__}."
    raise InputError(msg)


def _clean(s: pd.Series, ignore: Iterable[str]) -> pd.Series:
    """Drop missing labels and ignored ones; return strings."""
    s = s[s.notna()].astype(str).str.strip()
    drop = {str(x).strip().lower() for x in (ignore or ())} | {"", "nan", "none"}
    return s[~s.str.lower().isin(drop)]


def scored_labels(adata, annotation="annotation", *, ignore: Iterable[str] | None = DEFAULT_IGNORE) -> pd.Series:
    """The annotation labels that count for scoring (indexed by spot name, restricted to ``adata``).

    ``len(scored_labels(adata).unique())`` is the number of clusters the usual protocol asks for.
    """
    truth = _as_series(adata, annotation, "annotation")
    truth = truth.reindex(adata.obs_names)
    return _clean(truth, ignore or ())


def paired_labels(
    adata, key, *, annotation="annotation", ignore: Iterable[str] | None = DEFAULT_IGNORE
) -> tuple[np.ndarray, np.ndarray]:
    """Predicted and true labels of the spots that are scored, joined by spot name.

    Returns ``(pred, truth)`` as arrays of strings of equal length.
    """
    pred = _as_series(adata, key, "key")
    truth = _clean(_as_series(adata, annotation, "annotation"), ignore or ())
    pred = pred[pred.notna()].astype(str)
    common = pred.index.intersection(truth.index)
    if isinstance(key, str) or not isinstance(annotation, pd.Series):
        common = common.intersection(adata.obs_names)
    classes = pd.unique(truth.reindex(common).dropna()) if len(common) else []
    if len(classes) == 1:
        warnings.warn(f"the annotation has a single class ({classes[0]!r}) on the {len(common)} scored spots: "
                      "ARI and NMI are 0 (or 1) whatever the domains, so they score nothing here.",
                      UserWarning, stacklevel=3)
    if len(common) == 0:
        msg = (
            f"no spot has both a predicted domain ({key if isinstance(key, str) else 'Series'}) and a scored "
            f"annotation label (ignoring {tuple(ignore or ())}); check that spot names match."
        )
        raise InputError(msg)
    return pred.loc[common].to_numpy(dtype=str), truth.loc[common].to_numpy(dtype=str)


def ari(adata, key, *, annotation="annotation", ignore: Iterable[str] | None = DEFAULT_IGNORE) -> float:
    """Adjusted Rand index between the domains in ``obs[key]`` and an annotation.

    Parameters
    ----------
    adata
        Annotated data with spots as ``obs_names``.
    key
        Column of ``adata.obs`` with the predicted domains, or a Series of labels indexed by spot name.
    annotation
        Column of ``adata.obs`` with the ground truth, or a Series indexed by spot name (joined by name,
        spots missing from it are unlabelled).
    ignore
        Labels left out of scoring (case-insensitive), besides missing ones.

    Returns
    -------
    The ARI over spots that have a predicted domain and a scored label.
    """
    from sklearn.metrics import adjusted_rand_score

    pred, truth = paired_labels(adata, key, annotation=annotation, ignore=ignore)
    return float(adjusted_rand_score(truth, pred))


def nmi(
    adata,
    key,
    *,
    annotation="annotation",
    ignore: Iterable[str] | None = DEFAULT_IGNORE,
    average_method: str = "arithmetic",
) -> float:
    """Normalised mutual information between ``obs[key]`` and an annotation.

    Same joining and filtering as :func:`ari`; ``average_method`` as in
    :func:`sklearn.metrics.normalized_mutual_info_score` (arithmetic mean of the entropies).
    """
    from sklearn.metrics import normalized_mutual_info_score

    pred, truth = paired_labels(adata, key, annotation=annotation, ignore=ignore)
    return float(normalized_mutual_info_score(truth, pred, average_method=average_method))
