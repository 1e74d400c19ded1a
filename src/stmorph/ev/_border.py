"""Domains that lie along the section's border: where an edge artefact would show.

The cut edge of a section is not a tissue region, but it often looks and measures differently from the
tissue inside (compressed or torn tissue, a darker stain, spots only partly on tissue), and a clustering
can spend a domain on a band along it. Real structures also lie on a border (a capsule, an epidermis,
cortical layer 1), so such a domain is not wrong by itself: it is one to look at before reading it as
biology. These functions say which domains hug the border, from the spot positions alone::

    outline       the union of discs of 0.75 spot spacings around the spots, every hole filled (a place
                  without spots inside the section, such as spots removed in quality control or a lumen, is
                  not border)
    distance      from each spot to the outline, in spot spacings (about 0 on the outermost row, 1 on the
                  row inside it, ...)

Measured (BENCHMARKS.md section 7): the domain the H&E adds on HER2ST A1 is such a band; the annotated fat at
the edge of A1 and C1 is flagged too, a real region along the border.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .. import _spatial
from ..errors import InputError

__all__ = ["border_distance", "border_domains"]

#: Radius of the disc drawn around each spot (spot spacings).
DISC_SPACINGS = 0.75
#: Raster pixels per spot spacing, finest first: a large section (Visium HD bins) is drawn coarser.
RASTER_PER_SPACING = (4, 2, 1)
#: Largest raster drawn (pixels): a 4,000 x 4,000-spacing section at one pixel per spacing.
MAX_RASTER = 16_000_000
#: Spots at most this many spot spacings from the outline form the border band: the outermost row.
BAND_SPACINGS = 0.5
#: A domain lies along the border when at least this share of its spots is in the band ...
ALONG_SHARE = 0.5
#: ... and the band holds less than this share of the section (in a section a few rows wide, every domain
#: touches the border).
SECTION_SHARE_MAX = 1 / 3


def border_distance(adata) -> np.ndarray:
    """Distance from each spot to the section's outline, in spot spacings (float ``(n_obs,)``).

    The outline is that of the union of discs of 0.75 spacings around the spots (neighbouring spots' discs
    overlap on Visium's and legacy ST's grids) with every hole filled, drawn on a raster of a quarter
    spacing (coarser for sections over 1,000 spacings across, such as Visium HD bins): places without spots
    *inside* the section (spots removed in quality control, a lumen) do not count as border. A spot on the
    outermost row is at about 0, the row inside it at about 1.
    """
    from scipy import ndimage as ndi

    xy = _spatial.coordinates(adata)
    if xy.shape[0] < 3:
        msg = f"border distance needs at least 3 spots; the section has {xy.shape[0]}."
        raise InputError(msg)
    spacing = _spatial.spot_spacing(xy)
    if not np.isfinite(spacing) or spacing <= 0:
        msg = "border distance needs distinct spot positions (obsm['spatial'] has them all in one place)."
        raise InputError(msg)
    span = (xy.max(axis=0) - xy.min(axis=0)) / spacing + 4  # spacings, a margin of 2 on each side
    fits = [r for r in RASTER_PER_SPACING if (span[0] * r + 1) * (span[1] * r + 1) <= MAX_RASTER]
    if not fits:
        msg = (f"border distance: the spots span {span[0]:.0f} x {span[1]:.0f} spot spacings, more than one "
               f"raster of {MAX_RASTER:,} pixels holds; is obsm['spatial'] in one section's pixels?")
        raise InputError(msg)
    res = fits[0]
    g = (xy - xy.min(axis=0)) / spacing * res + 2 * res  # raster pixels
    shape = tuple(int(v) for v in np.ceil(g.max(axis=0) + 2 * res)[::-1])  # (rows, cols)
    centres = np.zeros(shape, dtype=bool)
    rc = np.round(g[:, ::-1]).astype(np.int64)
    centres[rc[:, 0], rc[:, 1]] = True
    # discs of DISC_SPACINGS around the spot centres, then the holes filled
    disc = ndi.distance_transform_edt(~centres) <= DISC_SPACINGS * res
    inside = ndi.binary_fill_holes(disc)
    depth = ndi.distance_transform_edt(inside)[rc[:, 0], rc[:, 1]] / res
    return np.maximum(depth - DISC_SPACINGS, 0.0)


def border_domains(adata, key: str, *, band: float = BAND_SPACINGS) -> pd.DataFrame:
    """How much of each domain of ``obs[key]`` lies along the section's border.

    Returns one row per domain (index: the domain label): ``n_spots``; ``share_in_band`` (its spots at most
    ``band`` spacings from the outline, by default the outermost row; see :func:`border_distance`);
    ``section_share_in_band`` (the same for the whole section); ``median_distance`` (spacings);
    ``along_border``: at least half the domain in the band while the band holds less than a third of the
    section. A domain along the border may be an edge artefact or a real border structure (fat at the edge
    of a biopsy, a capsule, layer 1): look at it on the H&E.
    """
    if key not in adata.obs:
        msg = f"{key!r} is not a column of adata.obs (columns: {', '.join(map(str, adata.obs.columns)) or 'none'})."
        raise InputError(msg)
    d = border_distance(adata)
    labels = adata.obs[key]
    ok = labels.notna().to_numpy()
    lab = labels.astype(str).to_numpy()
    in_band = d <= float(band) + 1e-9
    section_share = float(in_band[ok].mean()) if ok.any() else float("nan")
    rows = {}
    order = labels.cat.categories if isinstance(labels.dtype, pd.CategoricalDtype) else pd.unique(lab[ok])
    for c in map(str, order):
        m = ok & (lab == c)
        if not m.any():
            continue
        share = float(in_band[m].mean())
        rows[c] = {"n_spots": int(m.sum()), "share_in_band": share, "section_share_in_band": section_share,
                   "median_distance": float(np.median(d[m])),
                   "along_border": bool(share >= ALONG_SHARE and section_share < SECTION_SHARE_MAX)}
    out = pd.DataFrame.from_dict(rows, orient="index")
    out.index.name = key
    return out
