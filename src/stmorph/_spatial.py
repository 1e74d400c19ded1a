"""Access to the spatial metadata an AnnData carries, following scanpy/squidpy.

``adata.uns["spatial"][library_id]`` holds ``images`` (``hires``/``lowres`` as
Space Ranger writes them and, for in-memory data only, ``fullres``),
``scalefactors`` (``spot_diameter_fullres``, ``tissue_hires_scalef``,
``tissue_lowres_scalef``) and ``metadata`` (``source_image_path``,
``technology``, ``spot_diameter_um``, optionally ``microns_per_pixel``).
``adata.obsm["spatial"]`` holds spot centres in full-resolution pixels, x = column, y = row.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import InputError

#: Physical spot diameter in micrometres of the technologies stmorph reads.
SPOT_DIAMETER_UM = {"visium": 55.0, "legacy_st": 100.0, "synthetic": 55.0}
#: Centre-to-centre distance of neighbouring spots on the capture array, micrometres (Visium's hexagonal grid).
#: The pixel size is calibrated on it (see :func:`microns_per_pixel`). Legacy ST is not listed: its reader
#: already sets ``spot_diameter_fullres`` to half the array step of a least-squares lattice fit (100 um of
#: the 200 um step), while the median nearest-neighbour distance of its detected spot positions, which
#: scatter around the lattice, falls 7-8% short of that step on HER2ST.
ARRAY_PITCH_UM = {"visium": 100.0}


def library_id(adata, library_id: str | None = None) -> str:
    """Return the library id to use: the one given, or the only one present."""
    spatial = adata.uns.get("spatial")
    if not isinstance(spatial, dict) or not spatial:
        msg = 'adata.uns["spatial"] is missing or empty; read the data with stmorph.read.* or add it as scanpy does.'
        raise InputError(msg)
    if library_id is None:
        if len(spatial) != 1:
            msg = f"adata has {len(spatial)} libraries {sorted(spatial)}; pass library_id= to choose one."
            raise InputError(msg)
        return next(iter(spatial))
    if library_id not in spatial:
        msg = f"library_id {library_id!r} not in adata.uns['spatial'] (have {sorted(spatial)})."
        raise InputError(msg)
    return library_id


def library(adata, library_id_: str | None = None) -> dict[str, Any]:
    """The ``uns["spatial"][library_id]`` dictionary."""
    return adata.uns["spatial"][library_id(adata, library_id_)]


def spot_diameter_fullres(adata, library_id_: str | None = None) -> float:
    """Spot diameter in full-resolution pixels."""
    sf = library(adata, library_id_).get("scalefactors", {})
    d = sf.get("spot_diameter_fullres")
    if d is None or not np.isfinite(d) or d <= 0:
        msg = 'scalefactors["spot_diameter_fullres"] is missing or not positive; it is needed to size patches.'
        raise InputError(msg)
    return float(d)


def spot_spacing(xy: np.ndarray) -> float:
    """Median distance from a spot to its nearest other spot, in the units of ``xy``; NaN when undefined
    (fewer than two spots, or every spot at one position)."""
    from scipy.spatial import cKDTree

    xy = np.asarray(xy, np.float64)
    if xy.shape[0] < 2:
        return float("nan")
    d, _ = cKDTree(xy).query(xy, k=2)
    d = d[:, 1][d[:, 1] > 0]
    return float(np.median(d)) if d.size else float("nan")


def required_spot_spacing(xy: np.ndarray, needed_for: str) -> float:
    """:func:`spot_spacing`, refused with an :class:`InputError` saying what ``needed_for`` it when undefined."""
    if len(xy) < 2:
        raise InputError(f"{needed_for} needs at least two spots.")
    d = spot_spacing(xy)
    if not np.isfinite(d):
        raise InputError(f'all spots share one position in obsm["spatial"]; {needed_for} is undefined.')
    return d


def visium_array_pitch(adata) -> float:
    """Pixels between neighbouring Visium spots from a least-squares fit of the spot centres on their array
    coordinates (``obs["array_row"]``, ``obs["array_col"]``; neighbours in a row are two array columns apart), or
    NaN when the coordinates are missing, too few, or not those of Visium's hexagonal grid (a row step of
    sqrt(3)/2 pitches, within 5%). Unlike the nearest-neighbour spacing it does not grow when spots are left out."""
    if adata.n_obs < 3 or not {"array_row", "array_col"} <= set(adata.obs.columns) or "spatial" not in adata.obsm:
        return float("nan")
    try:
        rc = adata.obs[["array_col", "array_row"]].to_numpy(dtype=np.float64)
    except (TypeError, ValueError):
        return float("nan")
    xy = coordinates(adata)
    ok = np.isfinite(rc).all(axis=1) & np.isfinite(xy).all(axis=1)
    A = np.column_stack([rc[ok], np.ones(int(ok.sum()))])
    if A.shape[0] < 3 or np.linalg.matrix_rank(A) < 3:
        return float("nan")
    coef, *_ = np.linalg.lstsq(A, xy[ok], rcond=None)
    pitch = 2.0 * float(np.linalg.norm(coef[0]))
    row = float(np.linalg.norm(coef[1]))
    return pitch if pitch > 0 and abs(row / pitch / (np.sqrt(3) / 2) - 1) < 0.05 else float("nan")


def microns_per_pixel(adata, library_id_: str | None = None) -> float:
    """Full-resolution pixel size in micrometres.

    In order:

    1. ``metadata["microns_per_pixel"]`` when present (Visium HD, synthetic data, or given by the user);
    2. for a spot array of known pitch (:data:`ARRAY_PITCH_UM`: Visium's 100 um), the pitch over the spots'
       median nearest-neighbour distance in pixels, or over :func:`visium_array_pitch` when the two differ by
       more than 5% (spots left out, e.g. a subset of the section, push the nearest neighbours apart). Space
       Ranger's ``spot_diameter_fullres`` is not the 55 um capture spot (10x defines it as a 65 um spot, and on
       the DLPFC sections it spans 70 um of the 100 um grid), so a pixel size taken from it put Visium spots
       78 um apart instead of 100;
    3. otherwise (legacy ST, whose reader derives ``spot_diameter_fullres`` from the array step), or when the
       spots are too few or too sparse for (2) (it would differ from (3) by more than a factor of two), the
       physical spot diameter over ``spot_diameter_fullres``.
    """
    lib = library(adata, library_id_)
    meta = lib.get("metadata", {})
    if meta.get("microns_per_pixel"):
        return float(meta["microns_per_pixel"])
    technology = str(meta.get("technology", "visium"))
    um = meta.get("spot_diameter_um") or SPOT_DIAMETER_UM.get(technology, 55.0)
    by_diameter = float(um) / spot_diameter_fullres(adata, library_id_)
    pitch_um = ARRAY_PITCH_UM.get(technology)
    if pitch_um is not None and adata.n_obs >= 2 and "spatial" in adata.obsm:
        px = spot_spacing(coordinates(adata))
        lattice = visium_array_pitch(adata)
        if np.isfinite(lattice) and not (abs(px / lattice - 1) <= 0.05):
            px = lattice
        by_pitch = pitch_um / px
        if np.isfinite(by_pitch) and 0.5 < by_pitch / by_diameter < 2.0:
            return float(by_pitch)
    return by_diameter


def coordinates(adata) -> np.ndarray:
    """Spot centres (N, 2) as float64 full-resolution pixels, x = column, y = row."""
    if "spatial" not in adata.obsm:
        msg = 'adata.obsm["spatial"] is missing: spot coordinates in full-resolution pixels are required.'
        raise InputError(msg)
    xy = np.asarray(adata.obsm["spatial"], dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] != 2:
        msg = f'adata.obsm["spatial"] must have shape (n_obs, 2); got {xy.shape}.'
        raise InputError(msg)
    return xy


def source_image_path(adata, library_id_: str | None = None) -> str | None:
    """Path of the full-resolution image, or None."""
    return library(adata, library_id_).get("metadata", {}).get("source_image_path") or None
