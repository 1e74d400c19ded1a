"""Validation of an AnnData against stmorph's data model (``docs/ARCHITECTURE.md``).

:func:`validate` collects *every* problem it finds and raises one
:class:`~stmorph.errors.InputError` listing them all on one line, so a user fixes
their object in one pass instead of one error at a time.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from .errors import InputError

__all__ = ["validate", "problems"]


def _number(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v


def _check_matrix(X, where: str, out: list[str]) -> None:
    import scipy.sparse as sp

    if X is None:
        out.append(f"{where} is missing (raw counts are required)")
        return
    shape = getattr(X, "shape", None)
    if shape is None or len(shape) != 2:
        out.append(f"{where} must be a 2-D matrix; got {type(X).__name__}")
        return
    if shape[0] == 0 or shape[1] == 0:
        out.append(f"{where} is empty ({shape[0]} spots x {shape[1]} genes)")
        return
    if sp.issparse(X):
        data = X.data
    elif isinstance(X, np.ndarray):
        data = X
    else:
        try:
            data = np.asarray(X)
        except Exception:  # noqa: BLE001 - backed/lazy arrays we cannot inspect cheaply
            return
    if data.dtype.kind not in "biuf":
        out.append(f"{where} is not numeric (dtype {data.dtype}); raw counts are required")
        return
    if data.dtype.kind == "f":
        n_bad = int(np.count_nonzero(~np.isfinite(data)))
        if n_bad:
            out.append(f"{where} holds {n_bad} non-finite value(s) (NaN or inf)")
    n_neg = int(np.count_nonzero(data < 0))
    if n_neg:
        out.append(f"{where} holds {n_neg} negative value(s); raw counts must be >= 0 (normalised or scaled data?)")
    from .read._common import MAX_COUNT

    n_big = int(np.count_nonzero(data > MAX_COUNT))
    if n_big:
        out.append(f"{where} holds {n_big} value(s) above {MAX_COUNT:.0e} (the largest {float(data.max()):.3g}); "
                   "these are not UMI counts")


def _check_coordinates(adata, out: list[str]) -> None:
    if "spatial" not in adata.obsm:
        out.append('obsm["spatial"] is missing (spot centres in full-resolution pixels, x = column, y = row)')
        return
    xy = adata.obsm["spatial"]
    try:
        xy = np.asarray(xy)
    except Exception:  # noqa: BLE001
        out.append(f'obsm["spatial"] cannot be read as an array ({type(xy).__name__})')
        return
    if xy.ndim != 2 or xy.shape[1] != 2:
        out.append(f'obsm["spatial"] must have shape (n_obs, 2) = ({adata.n_obs}, 2); got {xy.shape}')
        return
    if xy.dtype.kind not in "biuf":
        out.append(f'obsm["spatial"] is not numeric (dtype {xy.dtype})')
        return
    n_bad = int(np.count_nonzero(~np.isfinite(xy.astype(np.float64)).all(axis=1)))
    if n_bad:
        out.append(f'obsm["spatial"] has {n_bad} spot(s) with missing or non-finite coordinates')


def _check_obs(adata, out: list[str]) -> None:
    if not adata.obs_names.is_unique:
        dup = adata.obs_names[adata.obs_names.duplicated()].unique()
        shown = ", ".join(repr(d) for d in dup[:3])
        out.append(f"obs_names has {len(dup)} duplicated barcode(s), e.g. {shown}")
    if not adata.var_names.is_unique:
        dup = adata.var_names[adata.var_names.duplicated()].unique()
        shown = ", ".join(repr(d) for d in dup[:3])
        out.append(f"var_names has {len(dup)} duplicated gene name(s), e.g. {shown} (call adata.var_names_make_unique())")
    for col in ("array_row", "array_col", "in_tissue"):
        if col not in adata.obs:
            continue  # optional: not every technology has an array grid
        values = np.asarray(adata.obs[col])
        if values.dtype.kind not in "biuf":
            out.append(f'obs["{col}"] must be integers; got dtype {values.dtype}')
        elif values.dtype.kind == "f" and not np.all(np.isfinite(values)):
            out.append(f'obs["{col}"] has missing values')


def _check_library(lib_id: str, lib: Any, out: list[str], require_image: bool) -> None:
    where = f'uns["spatial"][{lib_id!r}]'
    if not isinstance(lib, dict):
        out.append(f"{where} must be a dict with images, scalefactors and metadata; got {type(lib).__name__}")
        return
    sf = lib.get("scalefactors")
    images = lib.get("images") or {}
    meta = lib.get("metadata") or {}
    if not isinstance(images, dict):
        out.append(f'{where}["images"] must be a dict; got {type(images).__name__}')
        images = {}
    if not isinstance(meta, dict):
        out.append(f'{where}["metadata"] must be a dict; got {type(meta).__name__}')
        meta = {}
    sf_present = isinstance(sf, dict)
    if not sf_present:
        out.append(f'{where}["scalefactors"] is missing (needs spot_diameter_fullres)')
        sf = {}
    else:
        d = _number(sf.get("spot_diameter_fullres"))
        if "spot_diameter_fullres" not in sf:
            out.append(f'{where}["scalefactors"]["spot_diameter_fullres"] is missing (spot diameter in full-resolution pixels)')
        elif d is None or not np.isfinite(d) or d <= 0:
            out.append(f'{where}["scalefactors"]["spot_diameter_fullres"] must be a positive number; got {sf.get("spot_diameter_fullres")!r}')
    for res in ("hires", "lowres"):
        if res in images:
            img = np.asarray(images[res])
            if img.ndim not in (2, 3) or min(img.shape[:2]) == 0:
                out.append(f'{where}["images"]["{res}"] is not an image array (shape {img.shape})')
            key = f"tissue_{res}_scalef"
            v = _number(sf.get(key))
            if sf_present and (v is None or not np.isfinite(v) or v <= 0):
                out.append(f'{where}["scalefactors"]["{key}"] is missing or not positive but images["{res}"] is present')
    if "fullres" in images:
        img = np.asarray(images["fullres"])
        if img.ndim not in (2, 3) or min(img.shape[:2]) == 0:
            out.append(f'{where}["images"]["fullres"] is not an image array (shape {img.shape})')
    src = meta.get("source_image_path")
    if src is not None and not isinstance(src, (str, os.PathLike)):
        out.append(f'{where}["metadata"]["source_image_path"] must be a path string; got {type(src).__name__}')
        src = None
    if require_image:
        if src:
            if not os.path.exists(src):  # a file, or a folder (an OME-Zarr image of a SpatialData store)
                out.append(f'{where}["metadata"]["source_image_path"] = {os.fspath(src)!r} does not exist')
        elif "fullres" not in images:
            out.append(
                f"no full-resolution image: set {where}[\"metadata\"][\"source_image_path\"], "
                f"keep an in-memory {where}[\"images\"][\"fullres\"], or pass image= to the reader or the step"
            )


def problems(adata, *, require_image: bool = False, library_id: str | None = None) -> list[str]:
    """Everything that stops ``adata`` from following stmorph's data model (empty list when valid)."""
    import anndata as ad

    if not isinstance(adata, ad.AnnData):
        return [f"expected an AnnData, got {type(adata).__name__}"]
    out: list[str] = []
    _check_matrix(adata.X, "X", out)
    _check_obs(adata, out)
    _check_coordinates(adata, out)
    spatial = adata.uns.get("spatial")
    if spatial is None:
        out.append('uns["spatial"] is missing (needs {library_id: {"scalefactors": {"spot_diameter_fullres": ...}, ...}})')
    elif not isinstance(spatial, dict) or not spatial:
        out.append('uns["spatial"] must be a non-empty dict keyed by library id')
    elif library_id is not None:
        if library_id not in spatial:
            out.append(f'library_id {library_id!r} not in uns["spatial"] (have {sorted(spatial)})')
        else:
            _check_library(library_id, spatial[library_id], out, require_image)
    else:
        for lib_id, lib in spatial.items():
            _check_library(str(lib_id), lib, out, require_image)
    return out


def validate(adata, *, require_image: bool = False, library_id: str | None = None) -> None:
    """Check that ``adata`` follows stmorph's data model; raise one error listing every problem.

    Parameters
    ----------
    adata
        The AnnData to check (one section).
    require_image
        Also require a full-resolution image source: ``uns["spatial"][lib]["metadata"]["source_image_path"]``
        pointing at an existing file, or an in-memory ``images["fullres"]``.
    library_id
        Check only this library of ``uns["spatial"]`` (default: all of them).

    Raises
    ------
    stmorph.InputError
        Listing everything missing or malformed: ``obsm["spatial"]`` (presence, shape ``(n_obs, 2)``,
        finite values), ``uns["spatial"]`` and its ``scalefactors["spot_diameter_fullres"]``, a numeric,
        non-empty, non-negative ``X``, unique ``obs_names``/``var_names`` and, with ``require_image``, an image source.
    """
    found = problems(adata, require_image=require_image, library_id=library_id)
    if found:
        raise InputError(message(found))


def message(found: list[str]) -> str:
    """One line listing the ``found`` problems (used by :func:`validate` and the readers)."""
    listed = "; ".join(f"({i}) {p}" for i, p in enumerate(found, 1))
    noun = "problem" if len(found) == 1 else "problems"
    return f"AnnData does not follow the stmorph data model, {len(found)} {noun}: {listed}."
