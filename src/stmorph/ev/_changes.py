"""What the H&E changed: the spots whose domain differs between a run with the image and one without.

The expression-only run's domains are matched to the image run's (a one-to-one assignment maximising the
spots they share, as the plots match colours), so a spot "changed" only when it lies in a different
domain, not because two runs numbered the same domains differently. Changed spots that touch (within the
first ring of neighbours) form a region: a place where the image moved a boundary, or made a domain
that expression alone did not have. This is the stMIC paper's central finding (image-aware clustering
reveals what expression-only analysis misses) as something a user can look at, region by region.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .. import _spatial
from ..errors import InputError

__all__ = ["image_changes"]

#: Changed spots closer than this many spot spacings belong to the same region (the first ring of neighbours).
RING_SPACINGS = 1.5


def _matched(reference: pd.Series, other: pd.Series) -> pd.Series:
    """``other``'s labels renamed to ``reference``'s by the assignment that maximises shared spots; a label
    without a partner keeps its name, marked ``"(new) x"`` when ``reference`` also has an ``x``."""
    from ..pl._colors import match_labels

    mapping = match_labels(reference, other)
    ref = set(reference.dropna().astype(str))
    names = {lab: mapping.get(lab, lab if lab not in ref else f"(unmatched) {lab}") for lab in
             other.dropna().astype(str).unique()}
    return other.astype(str).map(names)


def image_changes(adata, with_image: str = "stmorph", without: str | None = None, *,
                  min_region_spots: int = 1) -> pd.DataFrame:
    """The spots whose domain the H&E changed, grouped into spatial regions.

    Parameters
    ----------
    adata
        A result holding ``obs[with_image]`` and ``obs[without]``.
    with_image
        The domains found with the image (default ``"stmorph"``).
    without
        The same method's domains on expression alone; default ``f"{with_image}_expr"`` (``stmorph_expr``).
    min_region_spots
        Regions of fewer changed spots are left out of the table.

    Returns
    -------
    One row per changed spot, indexed by barcode: ``from_domain`` (its domain without the image, named as
    the matching image domain), ``to_domain`` (with the image), ``confidence_from`` / ``confidence_to``
    (``obs[f"{key}_confidence"]`` of each run, NaN when absent), ``region`` (an integer, regions by
    decreasing size) and ``x``, ``y`` (full-resolution pixels). ``attrs["n_spots"]`` holds the section's spot
    count and ``attrs["regions"]`` a summary per region (spots, the most common change, centre).
    """
    without = without or f"{with_image}_expr"
    for key in (with_image, without):
        if key not in adata.obs:
            msg = (f"obs[{key!r}] is missing: image_changes compares a run with the image ({with_image!r}) and one "
                   f"without ({without!r}); run both (e.g. stmorph run --method stmorph --method stmorph_expr).")
            raise InputError(msg)
    to = adata.obs[with_image].astype(str)
    frm = _matched(adata.obs[with_image], adata.obs[without])
    changed = (to != frm).to_numpy() & adata.obs[with_image].notna().to_numpy() & adata.obs[without].notna().to_numpy()
    xy = _spatial.coordinates(adata)
    idx = np.flatnonzero(changed)
    region = np.full(idx.size, -1)
    if idx.size:
        import scipy.sparse as sp
        from scipy.sparse.csgraph import connected_components
        from scipy.spatial import cKDTree

        spacing = _spatial.spot_spacing(xy)
        pairs = cKDTree(xy[idx]).query_pairs(RING_SPACINGS * spacing, output_type="ndarray")
        graph = sp.coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(idx.size, idx.size))
        _, comp = connected_components(graph, directed=False)
        sizes = np.bincount(comp)
        order = np.argsort(-sizes, kind="stable")
        rank = np.empty_like(order)
        rank[order] = np.arange(order.size)
        region = rank[comp]
    conf = {k: (adata.obs[f"{k}_confidence"].to_numpy(dtype=float) if f"{k}_confidence" in adata.obs
                else np.full(adata.n_obs, np.nan)) for k in (with_image, without)}
    table = pd.DataFrame({"from_domain": frm.to_numpy()[idx], "to_domain": to.to_numpy()[idx],
                          "confidence_from": conf[without][idx], "confidence_to": conf[with_image][idx],
                          "region": region, "x": xy[idx, 0], "y": xy[idx, 1]},
                         index=adata.obs_names[idx])
    table.index.name = "barcode"
    if min_region_spots > 1 and len(table):
        keep = table["region"].map(table["region"].value_counts()) >= min_region_spots
        table = table[keep.to_numpy()]
    regions = []
    for r, g in table.groupby("region", sort=True):
        change = (g["from_domain"] + " -> " + g["to_domain"]).value_counts()
        regions.append({"region": int(r), "n_spots": int(len(g)), "change": str(change.index[0]),
                        "share": float(change.iloc[0] / len(g)), "x": float(g["x"].mean()), "y": float(g["y"].mean()),
                        "confidence_from": float(g["confidence_from"].mean()),
                        "confidence_to": float(g["confidence_to"].mean())})
    table.attrs["n_spots"] = int(adata.n_obs)
    table.attrs["regions"] = regions
    table.attrs["keys"] = (with_image, without)
    return table
