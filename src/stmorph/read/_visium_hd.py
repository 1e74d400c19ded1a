"""Visium HD: the reader for Space Ranger's ``binned_outputs/`` and re-binning of square bins.

A Space Ranger 3/4 Visium HD ``outs/`` folder holds one folder per bin size::

    outs/binned_outputs/square_002um/  filtered_feature_bc_matrix.h5
                                       spatial/tissue_positions.parquet, scalefactors_json.json,
                                               tissue_hires_image.png, tissue_lowres_image.png
    outs/binned_outputs/square_008um/  ...
    outs/binned_outputs/square_016um/  ...

Each bin folder has the layout of a Visium ``outs/`` folder, so :func:`visium_hd` reads it with
:func:`stmorph.read.visium` (same checks, same one-line errors) and then records what makes it HD: the
bin size, the pixel size, ``technology="visium_hd"``. A bin of side ``s`` um is a "spot" of diameter ``s``.

:func:`rebin` sums square bins into larger squares (8 um -> 24, 32, 48 um ...), in time linear in the
number of bins and stored counts.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import InputError
from . import _common as c

__all__ = ["BIN_FOLDER", "aggregate_bins", "bin_barcodes", "rebin", "visium_hd"]

#: Name of one bin size's folder under ``binned_outputs/`` (``square_008um``).
BIN_FOLDER = "square_{:03d}um"
_BIN_RE = re.compile(r"^square_(\d{3})um$")


# --------------------------------------------------------------------------- bins


def bin_barcodes(bin_um: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Space Ranger HD barcodes ``s_008um_00012_00034-1`` (array row, array column, 0-based, 5 digits).

    Built as a fixed-width byte array (fast for millions of bins); returns a numpy unicode array.
    """
    rows = np.asarray(rows, dtype=np.int64)
    cols = np.asarray(cols, dtype=np.int64)
    if rows.size and (rows.min() < 0 or cols.min() < 0 or rows.max() > 99999 or cols.max() > 99999):
        msg = "array_row/array_col must lie in 0..99999 to form Visium HD barcodes."
        raise InputError(msg)
    head = np.frombuffer(f"s_{int(bin_um):03d}um_".encode(), dtype=np.uint8)
    n = rows.size
    out = np.empty((n, 21), dtype=np.uint8)
    out[:, :8] = head
    p10 = 10 ** np.arange(4, -1, -1, dtype=np.int64)
    out[:, 8:13] = (rows[:, None] // p10) % 10 + 48
    out[:, 13] = ord("_")
    out[:, 14:19] = (cols[:, None] // p10) % 10 + 48
    out[:, 19] = ord("-")
    out[:, 20] = ord("1")
    return out.view("S21").ravel().astype("U21")


def aggregate_bins(rows: np.ndarray, cols: np.ndarray, X, factor: int):
    """Sum square bins into ``factor`` x ``factor`` blocks of the array grid.

    Returns ``(new_rows, new_cols, X_new, member)``: the occupied blocks in row-major order, their summed
    counts (CSR) and, for every input bin, the row of its block. Linear in bins and stored entries.
    """
    import scipy.sparse as sp

    rows = np.asarray(rows, dtype=np.int64)
    cols = np.asarray(cols, dtype=np.int64)
    br, bc = rows // factor, cols // factor
    width = int(bc.max()) + 1 if bc.size else 1
    key = br * width + bc
    present = np.zeros(int(key.max()) + 1 if key.size else 1, dtype=bool)
    present[key] = True
    new_id = np.cumsum(present) - 1  # block key -> block row, row-major
    member = new_id[key]
    occupied = np.flatnonzero(present)
    n_new = occupied.size
    A = sp.csr_matrix((np.ones(rows.size, dtype=np.float32), (member, np.arange(rows.size))), shape=(n_new, rows.size))
    Xn = sp.csr_matrix(A @ sp.csr_matrix(X))
    Xn.sort_indices()
    return occupied // width, occupied % width, Xn, member


def _grid_affine(rows: np.ndarray, cols: np.ndarray, xy: np.ndarray) -> np.ndarray | None:
    """Least-squares ``pixel = [col, row, 1] @ coef`` when the bins lie on it to 1/20 of a bin; else None."""
    if len(xy) < 3:
        return None
    A = np.column_stack([cols.astype(np.float64), rows.astype(np.float64), np.ones(len(xy))])
    if np.linalg.matrix_rank(A[: min(len(A), 100_000)]) < 3 and np.linalg.matrix_rank(A) < 3:
        return None
    coef, *_ = np.linalg.lstsq(A, xy, rcond=None)
    pitch = float(np.linalg.norm(coef[:2], axis=1).mean())
    resid = np.abs(A @ coef - xy).max()
    if not np.isfinite(pitch) or pitch <= 0 or resid > 0.05 * pitch:
        return None
    return coef


def _bin_size(adata, lib: dict, lib_id: str) -> float:
    meta = lib.get("metadata", {}) or {}
    sf = lib.get("scalefactors", {}) or {}
    b = meta.get("bin_size_um", sf.get("bin_size_um"))
    if b is None:
        msg = (f"uns['spatial'][{lib_id!r}] has no bin_size_um: re-binning needs Visium HD square bins "
               "(read them with stmorph.read.visium_hd).")
        raise InputError(msg)
    return float(b)


def rebin(adata, bin_size_um: int, *, library_id: str | None = None):
    """Sum Visium HD square bins into larger squares (e.g. 2 or 8 um bins into 16, 24, 32, 48 um bins).

    Bin ``(array_row, array_col)`` of side ``b`` goes into the new bin ``(array_row // k, array_col // k)``,
    ``k = bin_size_um / b``, as Space Ranger aggregates its 2 um bins (so re-binning 8 um bins to 16 um gives
    Space Ranger's 16 um bins). Counts are summed (sparse, linear time); a new bin exists when at least one
    of its members does.

    Parameters
    ----------
    adata
        Square bins: raw counts in ``X``, ``obs["array_row"]``/``obs["array_col"]``, ``obsm["spatial"]`` and
        ``bin_size_um`` in ``uns["spatial"][library_id]["metadata"]`` (as :func:`visium_hd` sets them).
    bin_size_um
        The new bin side in micrometres: an integer multiple of the current one.
    library_id
        Which ``uns["spatial"]`` library (default: the only one).

    Returns
    -------
    A new AnnData (the input is left alone) with barcodes ``s_{size:03d}um_{row:05d}_{col:05d}-1``.

    Sets the following fields:

    ``X``
        Summed counts (CSR float32).
    ``obs["in_tissue"]``, ``obs["array_row"]``, ``obs["array_col"]``
        The new grid (``in_tissue`` = 1 when any member is in tissue).
    ``obs["annotation"]``
        When the input has it: the most frequent label among the members (ties: the first category; NaN
        when no member is labelled).
    ``obsm["spatial"]``
        The centre of the new square in full-resolution pixels (from the grid's affine map; the mean of the
        members' centres where the bins lie on no regular grid).
    ``uns["spatial"]``
        Copied, with ``spot_diameter_fullres``, ``bin_size_um`` and ``spot_diameter_um`` set to the new side.
    ``uns["rebin"]["params"]``
        ``from_bin_size_um``, ``bin_size_um``, ``n_bins_from``, ``n_bins``.
    """
    import anndata as ad
    import scipy.sparse as sp

    from .._spatial import coordinates
    from .._spatial import library_id as _lib_id

    lib_id = _lib_id(adata, library_id)
    lib = adata.uns["spatial"][lib_id]
    b = _bin_size(adata, lib, lib_id)
    try:
        target = float(bin_size_um)
    except (TypeError, ValueError):
        target = float("nan")
    k = target / b if b > 0 else float("nan")
    if not (np.isfinite(k) and k >= 1 and abs(k - round(k)) < 1e-9):
        msg = (f"bin_size_um={bin_size_um!r} is not an integer multiple of the current bin size {b:g} um; "
               f"use e.g. {2 * b:g}, {3 * b:g} or {4 * b:g}.")
        raise InputError(msg)
    k = int(round(k))
    for col in ("array_row", "array_col"):
        if col not in adata.obs:
            msg = f'adata.obs["{col}"] is missing; re-binning needs the bins\' array coordinates.'
            raise InputError(msg)
    rows = np.asarray(adata.obs["array_row"], dtype=np.int64)
    cols = np.asarray(adata.obs["array_col"], dtype=np.int64)
    xy = coordinates(adata)
    X = adata.X if sp.issparse(adata.X) else sp.csr_matrix(np.asarray(adata.X))
    new_rows, new_cols, Xn, member = aggregate_bins(rows, cols, X, k)
    n_new = new_rows.size

    coef = _grid_affine(rows, cols, xy)
    if coef is not None:
        centre = np.column_stack([new_cols * k + (k - 1) / 2.0, new_rows * k + (k - 1) / 2.0, np.ones(n_new)])
        new_xy = centre @ coef
    else:
        size = np.bincount(member, minlength=n_new).astype(np.float64)
        new_xy = np.column_stack([np.bincount(member, xy[:, i], minlength=n_new) / size for i in range(2)])

    obs = pd.DataFrame({
        "in_tissue": (np.bincount(member, np.asarray(adata.obs["in_tissue"], dtype=np.float64), minlength=n_new) > 0
                      ).astype(np.int64) if "in_tissue" in adata.obs else np.ones(n_new, dtype=np.int64),
        "array_row": new_rows.astype(np.int64),
        "array_col": new_cols.astype(np.int64),
    }, index=pd.Index(bin_barcodes(int(round(target)), new_rows, new_cols), name=None))
    if "annotation" in adata.obs:
        lab = pd.Categorical(adata.obs["annotation"])
        codes = np.asarray(lab.codes, dtype=np.int64)
        n_cat = len(lab.categories)
        ok = codes >= 0
        out_codes = np.full(n_new, -1, dtype=np.int64)
        if n_cat and ok.any():
            votes = np.bincount(member[ok] * n_cat + codes[ok], minlength=n_new * n_cat).reshape(n_new, n_cat)
            best = votes.argmax(axis=1)
            out_codes = np.where(votes.max(axis=1) > 0, best, -1)
        obs["annotation"] = pd.Categorical.from_codes(out_codes, categories=lab.categories)

    out = ad.AnnData(X=Xn.astype(np.float32), obs=obs, var=adata.var.copy())
    out.obsm["spatial"] = np.ascontiguousarray(new_xy, dtype=np.float64)
    spatial = {key: copy.deepcopy(val) if key != lib_id else None for key, val in adata.uns["spatial"].items()}
    new_lib = {key: (dict(val) if isinstance(val, dict) else val) for key, val in lib.items() if key != "images"}
    new_lib["images"] = dict(lib.get("images", {}) or {})  # the same arrays: images do not change
    sf = dict(new_lib.get("scalefactors", {}) or {})
    if "spot_diameter_fullres" in sf:
        sf["spot_diameter_fullres"] = float(sf["spot_diameter_fullres"]) * k
    sf["bin_size_um"] = target
    new_lib["scalefactors"] = sf
    meta = dict(new_lib.get("metadata", {}) or {})
    meta.update(bin_size_um=target, spot_diameter_um=target)
    new_lib["metadata"] = meta
    spatial[lib_id] = new_lib
    out.uns["spatial"] = spatial
    if "synthetic" in adata.uns:
        out.uns["synthetic"] = copy.deepcopy(adata.uns["synthetic"])
    out.uns["rebin"] = {"params": {"from_bin_size_um": b, "bin_size_um": target, "n_bins_from": int(adata.n_obs),
                                   "n_bins": int(n_new)}}
    return out


# --------------------------------------------------------------------------- reader


def _outs(path: str | os.PathLike) -> Path:
    p = c.require_dir(path, "Visium HD outs/ folder")
    if not (p / "binned_outputs").exists() and (p / "outs" / "binned_outputs").is_dir():
        p = p / "outs"  # the sample folder was given
    return p


def bin_sizes(path: str | os.PathLike) -> dict[int, Path]:
    """The bin folders of a Visium HD ``outs/`` folder: ``{side in um: binned_outputs/square_XXXum}``."""
    outs = _outs(path)
    binned = outs / "binned_outputs"
    if not binned.is_dir():
        msg = "not a Visium HD outs/ folder: it has no binned_outputs/ folder."
        raise InputError(msg, outs)
    found = {}
    for d in binned.iterdir():
        m = _BIN_RE.match(d.name)
        if m and d.is_dir():
            found[int(m.group(1))] = d
    if not found:
        msg = "holds no square_XXXum bin folders (e.g. square_008um)."
        raise InputError(msg, binned)
    return dict(sorted(found.items()))


def visium_hd(
    path: str | os.PathLike,
    bin_size: int = 16,
    image: str | os.PathLike | None = None,
    *,
    library_id: str | None = None,
    labels: str | os.PathLike | None = "auto",
    in_tissue_only: bool = True,
):
    """Read one bin size of a Space Ranger 3/4 Visium HD ``outs/`` folder into one AnnData.

    Parameters
    ----------
    path
        The ``outs/`` folder (or the sample folder holding it) with ``binned_outputs/square_XXXum/``
        folders, each with ``filtered_feature_bc_matrix.h5`` and ``spatial/`` (``tissue_positions.parquet``,
        ``scalefactors_json.json`` with ``bin_size_um`` and ``microns_per_pixel``, the hires/lowres PNGs).
        Reading parquet needs ``pip install "stmorph[parquet]"``.
    bin_size
        Bin side in micrometres. A size Space Ranger wrote (2, 8, 16) is read as is; any multiple of one of
        them (24, 32, 48 ...) is read from the largest such folder and summed with :func:`rebin`.
    image
        The full-resolution H&E (BigTIFF, pyramidal or not, TIFF, JPEG, PNG) the bins were registered to;
        opened to check every bin lies on it, its path recorded (never loaded).
    library_id
        Key under ``uns["spatial"]`` (default: the sample folder's name, or the ``outs/`` folder's).
    labels
        ``"auto"`` loads ``labels.tsv`` from the bin folder when present (``barcode<TAB>label``); a path
        loads that file; ``None`` skips labels.
    in_tissue_only
        Keep only bins with ``in_tissue == 1``.

    Returns
    -------
    AnnData following :func:`stmorph.read.visium`'s data model (raw counts CSR float32 in ``X``).

    Sets the following fields:

    ``obs["in_tissue"]``, ``obs["array_row"]``, ``obs["array_col"]``, ``obs["annotation"]`` (with labels)
        From the positions and labels files.
    ``obsm["spatial"]``
        Bin centres in full-resolution pixels, x = column, y = row.
    ``uns["spatial"][library_id]``
        ``images`` (hires/lowres), ``scalefactors`` (incl. ``bin_size_um``, ``microns_per_pixel``;
        ``spot_diameter_fullres`` = the bin side in pixels) and ``metadata`` (``technology="visium_hd"``,
        ``bin_size_um``, ``spot_diameter_um`` = the bin side, ``microns_per_pixel``, ``source_image_path``,
        ``bin_folder``).

    Raises
    ------
    stmorph.InputError
        No ``binned_outputs/``, no folder for (or dividing) ``bin_size`` (the message lists the sizes present),
        a malformed file (named), barcodes of the matrix missing from the positions, scale factors whose
        ``bin_size_um`` disagrees with the folder name.
    stmorph.ImageError
        An unreadable image.
    stmorph.DependencyError
        pyarrow is not installed.
    """
    from ._visium import visium

    try:
        size = float(bin_size)
    except (TypeError, ValueError):
        size = float("nan")
    if not (np.isfinite(size) and size > 0 and size == round(size)):
        msg = f"bin_size={bin_size!r} is not allowed; give a whole number of micrometres (2, 8, 16, 24, 32 ...)."
        raise InputError(msg)
    size = int(size)
    outs = _outs(path)
    found = bin_sizes(outs)
    if size in found:
        read_size = size
    else:
        divisors = [s for s in found if size % s == 0]
        if not divisors:
            have = ", ".join(f"{s} um" for s in found)
            msg = (f"no {BIN_FOLDER.format(size)} bin folder and no smaller bin size that divides {size} um; "
                   f"this output has {have} (or pick a multiple of one of them).")
            raise InputError(msg, outs / "binned_outputs")
        read_size = max(divisors)
    folder = found[read_size]
    if library_id is None:
        library_id = outs.parent.name if outs.name == "outs" else outs.name
    adata = visium(folder, image=image, library_id=str(library_id), in_tissue_only=in_tissue_only, labels=labels)

    lib = adata.uns["spatial"][str(library_id)]
    sf = lib["scalefactors"]
    sf_path = folder / "spatial" / "scalefactors_json.json"
    if "bin_size_um" in sf and not np.isclose(sf["bin_size_um"], read_size):
        msg = (f"bin_size_um is {sf['bin_size_um']:g} but the folder is {folder.name}; "
               "the scale factors belong to another bin size.")
        raise InputError(msg, sf_path)
    mpp = sf.get("microns_per_pixel")
    if not (mpp is not None and np.isfinite(mpp) and mpp > 0):
        mpp = read_size / float(sf["spot_diameter_fullres"])  # Space Ranger: spot_diameter_fullres = bin / mpp
    sf["bin_size_um"] = float(read_size)
    lib["metadata"].update(
        technology="visium_hd", bin_size_um=float(read_size), spot_diameter_um=float(read_size),
        microns_per_pixel=float(mpp), bin_folder=str(folder.resolve()),
    )
    if read_size != size:
        adata = rebin(adata, size, library_id=str(library_id))
    return adata
