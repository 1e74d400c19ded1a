"""Access to the spatial metadata an AnnData carries, following scanpy/squidpy.

``adata.uns["spatial"][library_id]`` holds ``images`` (``hires``/``lowres`` as
Space Ranger writes them and, for in-memory data only, ``fullres``),
``scalefactors`` (``spot_diameter_fullres``, ``tissue_hires_scalef``,
``tissue_lowres_scalef``) and ``metadata`` (``source_image_path``,
``technology``, ``spot_diameter_um``). ``adata.obsm["spatial"]`` holds spot
centres in full-resolution pixels, x = column, y = row.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import InputError

#: Physical spot diameter in micrometres of the technologies stmorph reads.
SPOT_DIAMETER_UM = {"visium": 55.0, "legacy_st": 100.0, "synthetic": 55.0}


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


def microns_per_pixel(adata, library_id_: str | None = None) -> float:
    """Full-resolution pixel size in micrometres.

    Taken from ``metadata["microns_per_pixel"]`` when present, otherwise derived
    from the physical spot diameter of the technology and ``spot_diameter_fullres``.
    """
    lib = library(adata, library_id_)
    meta = lib.get("metadata", {})
    if meta.get("microns_per_pixel"):
        return float(meta["microns_per_pixel"])
    um = meta.get("spot_diameter_um") or SPOT_DIAMETER_UM.get(str(meta.get("technology", "visium")), 55.0)
    return float(um) / spot_diameter_fullres(adata, library_id_)


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
