"""Reader for a 10x Genomics Space Ranger ``outs/`` folder (Visium)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from .._spatial import SPOT_DIAMETER_UM
from ..errors import InputError
from . import _common as c

__all__ = ["visium", "read_10x_h5"]

#: Positions files Space Ranger has written, in the order they are looked for.
#: ``tissue_positions.csv`` (Space Ranger >= 2.0, with header), ``tissue_positions_list.csv``
#: (Space Ranger 1.x, no header), ``tissue_positions.parquet`` (Space Ranger >= 3 / Visium HD).
POSITIONS_FILES = ("tissue_positions.csv", "tissue_positions_list.csv", "tissue_positions.parquet")
POSITIONS_COLUMNS = ("barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres")


# --------------------------------------------------------------------------- counts


def _dataset(f, name: str, path: Path) -> np.ndarray:
    if name not in f:
        msg = f"10x HDF5 file lacks the dataset {name!r} (expected the 10x HDF5 v3 layout: matrix/data, indices, indptr, shape, barcodes, features/name, features/id, features/feature_type)."
        raise InputError(msg, path)
    obj = f[name]
    if not hasattr(obj, "shape") or not hasattr(obj, "dtype"):
        msg = f"10x HDF5 entry {name!r} is a group, expected a dataset."
        raise InputError(msg, path)
    try:
        return obj[()]
    except OSError as exc:
        msg = f"10x HDF5 dataset {name!r} cannot be read; the file is probably truncated ({exc})."
        raise InputError(msg, path) from None


def _strings(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values).reshape(-1)
    if values.dtype.kind == "S":
        return np.char.decode(values, "utf-8").astype(object)
    return values.astype(str).astype(object)


def read_10x_h5(path: str | os.PathLike, *, gene_expression_only: bool = True):
    """Read a 10x HDF5 feature-barcode matrix with h5py.

    Parameters
    ----------
    path
        ``filtered_feature_bc_matrix.h5`` (10x HDF5 v3; the v2 layout ``<genome>/genes`` is read too).
    gene_expression_only
        Keep features whose ``feature_type`` is ``Gene Expression`` (v3 only).

    Returns
    -------
    ``(X, barcodes, var)``: ``X`` a ``scipy.sparse.csr_matrix`` float32 (barcodes x features),
    ``barcodes`` a :class:`pandas.Index`, ``var`` a DataFrame indexed by unique feature names with
    ``gene_ids`` (and ``feature_types``/``genome`` when present).
    """
    import h5py
    import scipy.sparse as sp

    path = c.require_file(path, "10x HDF5 count matrix")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        text = str(exc).splitlines()[0] if str(exc) else "unknown reason"
        msg = f"not a readable HDF5 file; truncated or not a 10x .h5 ({text})."
        raise InputError(msg, path) from None
    with f:
        if "matrix" in f:  # v3
            grp = "matrix"
            ids = _strings(_dataset(f, "matrix/features/id", path))
            # symbols where present; some writers store ids only
            names = _strings(_dataset(f, "matrix/features/name", path)) if "matrix/features/name" in f else ids
            types = _strings(_dataset(f, "matrix/features/feature_type", path))
            genome = _strings(f["matrix/features/genome"][()]) if "matrix/features/genome" in f else None
        else:  # v2: one group per genome
            groups = [k for k in f if isinstance(f[k], h5py.Group)]
            if len(groups) != 1 or "barcodes" not in f[groups[0]]:
                msg = f"10x HDF5 file has neither a 'matrix' group (v3 layout) nor a single genome group (v2 layout); top-level entries: {c.examples(list(f), 10)}."
                raise InputError(msg, path)
            grp = groups[0]
            ids = _strings(_dataset(f, f"{grp}/genes", path))
            names = _strings(_dataset(f, f"{grp}/gene_names", path))
            types, genome = None, None
        data = _dataset(f, f"{grp}/data", path)
        indices = _dataset(f, f"{grp}/indices", path)
        indptr = _dataset(f, f"{grp}/indptr", path)
        shape = _dataset(f, f"{grp}/shape", path)
        barcodes = _strings(_dataset(f, f"{grp}/barcodes", path))

    shape = np.asarray(shape).reshape(-1)
    if shape.size != 2:
        msg = f"dataset '{grp}/shape' must hold 2 numbers (features, barcodes); got {shape.tolist()}."
        raise InputError(msg, path)
    n_features, n_barcodes = int(shape[0]), int(shape[1])
    problems = []
    if len(barcodes) != n_barcodes:
        problems.append(f"'{grp}/barcodes' has {len(barcodes)} entries but shape says {n_barcodes} barcodes")
    if len(ids) != n_features or len(names) != n_features:
        problems.append(f"feature ids/names have {len(ids)}/{len(names)} entries but shape says {n_features} features")
    if len(indptr) != n_barcodes + 1:
        problems.append(f"'{grp}/indptr' has {len(indptr)} entries, expected {n_barcodes + 1}")
    if len(data) != len(indices):
        problems.append(f"'{grp}/data' ({len(data)}) and '{grp}/indices' ({len(indices)}) differ in length")
    if not problems and (indptr[0] != 0 or indptr[-1] != len(data) or np.any(np.diff(indptr) < 0)):
        problems.append(f"'{grp}/indptr' is not a valid pointer array (0 ... {len(data)}, non-decreasing)")
    if not problems and len(indices) and (indices.min() < 0 or indices.max() >= n_features):
        problems.append(f"'{grp}/indices' has feature indices outside 0..{n_features - 1}")
    if problems:
        msg = "inconsistent 10x HDF5 matrix: " + "; ".join(problems) + "."
        raise InputError(msg, path)
    if data.dtype.kind not in "biuf":
        msg = f"dataset '{grp}/data' is not numeric (dtype {data.dtype})."
        raise InputError(msg, path)

    # stored as CSC (features x barcodes) == CSR (barcodes x features)
    X = sp.csr_matrix((data.astype(np.float32, copy=False), indices, indptr), shape=(n_barcodes, n_features))
    var = pd.DataFrame({"gene_ids": ids})
    if types is not None:
        var["feature_types"] = types
    if genome is not None and len(genome) == n_features:
        var["genome"] = genome
    if gene_expression_only and types is not None:
        keep = np.asarray(types == "Gene Expression")
        if not keep.any():
            msg = f"no feature has feature_type 'Gene Expression' (found {c.examples(pd.unique(types))})."
            raise InputError(msg, path)
        X = X[:, np.flatnonzero(keep)]
        var = var.loc[keep].reset_index(drop=True)
        names = names[keep]
    # gene symbols where present (fall back to the id where a name is empty)
    names = np.where(pd.Series(names).astype(str).str.len().to_numpy() > 0, names, var["gene_ids"].to_numpy())
    var.index = c.make_unique(names)
    return X.tocsr(), pd.Index(barcodes, name=None), var


# --------------------------------------------------------------------------- positions


def find_positions(spatial_dir: Path) -> Path:
    """The positions file of a Space Ranger ``spatial/`` folder (first of :data:`POSITIONS_FILES` present)."""
    for name in POSITIONS_FILES:
        p = spatial_dir / name
        if p.exists():
            return p
    msg = f"no spot positions file: expected one of {', '.join(POSITIONS_FILES)}."
    raise InputError(msg, spatial_dir)


def read_positions(path: str | os.PathLike) -> pd.DataFrame:
    """Read a Space Ranger positions file in any of its three layouts.

    Returns a DataFrame indexed by barcode with integer ``in_tissue``, ``array_row``, ``array_col`` and
    float ``pxl_row_in_fullres``, ``pxl_col_in_fullres``.
    """
    path = c.require_file(path, "spot positions file")
    what = "positions file"
    if path.suffix == ".parquet":
        df = c.read_parquet(path, what)
    else:
        df = c.read_table(path, what, header=None, dtype=str, keep_default_na=False)
        first = [str(v).strip() for v in df.iloc[0]]
        if "barcode" in first:  # a header row (tissue_positions.csv, or a list file written with one)
            df = df.iloc[1:].reset_index(drop=True)
            df.columns = first
            if df.shape[0] == 0:
                msg = f"{what} has a header but no rows."
                raise InputError(msg, path)
        elif df.shape[1] == len(POSITIONS_COLUMNS):
            df.columns = list(POSITIONS_COLUMNS)
        else:
            msg = (
                f"{what} has {df.shape[1]} column(s) and no header; expected {len(POSITIONS_COLUMNS)} columns "
                f"({', '.join(POSITIONS_COLUMNS)}) or a header row naming them."
            )
            raise InputError(msg, path)
    df.columns = [str(col).strip() for col in df.columns]
    c.require_columns(df, POSITIONS_COLUMNS, path, what)
    barcodes = df["barcode"].astype(str).str.strip()
    if (barcodes == "").any():
        msg = f"{what} has {int((barcodes == '').sum())} row(s) with an empty barcode."
        raise InputError(msg, path)
    c.check_unique(barcodes, path, f"{what} column 'barcode'")
    out = pd.DataFrame(index=pd.Index(barcodes.to_numpy(), name=None))
    for col in ("in_tissue", "array_row", "array_col"):
        out[col] = c.numeric_column(df, col, path, what, integer=True)
    bad = ~np.isin(out["in_tissue"].to_numpy(), (0, 1))
    if bad.any():
        msg = f"{what} column 'in_tissue' must be 0 or 1; found {c.examples(pd.unique(out['in_tissue'].to_numpy()[bad]))}."
        raise InputError(msg, path)
    for col in ("pxl_row_in_fullres", "pxl_col_in_fullres"):
        out[col] = c.numeric_column(df, col, path, what)
    return out


# --------------------------------------------------------------------------- labels


def read_barcode_labels(path: str | os.PathLike) -> pd.Series:
    """A two-column table ``barcode<TAB>label`` with a header (``labels.tsv`` of DLPFC, ``write_visium``)."""
    path = c.require_file(path, "labels file")
    sep = "," if path.suffix == ".csv" else "\t"
    df = c.read_table(path, "labels file", sep=sep, dtype=str, keep_default_na=False)
    if df.shape[1] < 2:
        msg = (
            f"labels file needs two columns (barcode, label) separated by {'a comma' if sep == ',' else 'a tab'}; "
            f"found {df.shape[1]} column(s) {c.examples(map(str, df.columns))}."
        )
        raise InputError(msg, path)
    cols = [str(col).strip() for col in df.columns]
    bc_col = "barcode" if "barcode" in cols else df.columns[0]
    rest = [col for col in df.columns if col != bc_col]
    lab_col = next((col for col in rest if str(col).strip() in ("annotation", "label", "layer")), rest[0])
    barcodes = df[bc_col].astype(str).str.strip()
    c.check_unique(barcodes, path, "labels file")
    return pd.Series(df[lab_col].to_numpy(), index=pd.Index(barcodes.to_numpy()), name="annotation")


# --------------------------------------------------------------------------- reader


def _outs_folder(path: str | os.PathLike) -> Path:
    p = c.require_dir(path, "Space Ranger outs/ folder")
    if not (p / "spatial").exists() and (p / "outs" / "spatial").is_dir():
        p = p / "outs"  # the sample folder was given
    return p


def visium(
    path: str | os.PathLike,
    image: str | os.PathLike | None = None,
    *,
    library_id: str | None = None,
    in_tissue_only: bool = True,
    labels: str | os.PathLike | Literal["auto"] | None = "auto",
    counts_file: str = "filtered_feature_bc_matrix.h5",
):
    """Read a Space Ranger ``outs/`` folder into one AnnData.

    Parameters
    ----------
    path
        The ``outs/`` folder (or the sample folder holding ``outs/``) with ``filtered_feature_bc_matrix.h5`` and
        ``spatial/``: a positions file in any layout Space Ranger has written (``tissue_positions_list.csv``
        without header, ``tissue_positions.csv`` with header, ``tissue_positions.parquet``, which needs
        ``pip install "stmorph[parquet]"``), ``scalefactors_json.json`` and, where present,
        ``tissue_hires_image.png`` / ``tissue_lowres_image.png``.
    image
        The full-resolution H&E (TIFF/BigTIFF incl. pyramidal, JPEG or PNG) the spots were aligned to. It is
        opened to check that every spot lies inside it; its path is recorded, never loaded into the AnnData.
    library_id
        Key under ``uns["spatial"]``; default the folder name (the sample folder when ``path`` ends in ``outs``).
    in_tissue_only
        Keep only spots with ``in_tissue == 1`` (default), as Space Ranger's filtered matrix does.
    labels
        ``"auto"`` loads ``<path>/labels.tsv`` when it exists; a path loads that file (``barcode<TAB>label``
        with a header); ``None`` skips labels.
    counts_file
        Name of the count matrix inside ``path``.

    Returns
    -------
    AnnData with raw counts in ``X`` (CSR float32), gene symbols as ``var_names`` (unique) and the ids in
    ``var["gene_ids"]``.

    Sets the following fields:

    ``obs["in_tissue"]``, ``obs["array_row"]``, ``obs["array_col"]``
        From the positions file.
    ``obs["annotation"]``
        Labels (categorical, NaN where unlabelled) when a labels file is read.
    ``obsm["spatial"]``
        Spot centres in full-resolution pixels, x = column, y = row.
    ``uns["spatial"][library_id]``
        ``images`` (``hires``/``lowres`` uint8 RGB where present), ``scalefactors`` (as in
        ``scalefactors_json.json``, incl. ``spot_diameter_fullres``) and ``metadata`` (``source_image_path``,
        ``technology="visium"``, ``spot_diameter_um=55``, ``positions_file``).

    Raises
    ------
    stmorph.InputError
        Missing files or columns, barcodes in the matrix but not in the positions (or in-tissue positions absent
        from the matrix), duplicated barcodes, an empty matrix, spots outside ``image``.
    stmorph.ImageError
        An unreadable or truncated image.
    stmorph.DependencyError
        A parquet positions file without pyarrow installed.
    """
    from .._validate import message, problems

    outs = _outs_folder(path)
    h5 = c.require_file(outs / counts_file, "count matrix", hint=f"expected {counts_file} in the Space Ranger outs/ folder.")
    spatial_dir = c.require_dir(outs / "spatial", "spatial/ folder of the Space Ranger output")
    sf_path = c.require_file(spatial_dir / "scalefactors_json.json", "scale factors file")
    pos_path = find_positions(spatial_dir)

    X, barcodes, var = read_10x_h5(h5)
    c.check_matrix(X, h5, "count matrix")
    c.check_unique(barcodes, h5, "count matrix barcodes")
    positions = read_positions(pos_path)

    # join the matrix and the positions on barcodes
    missing = barcodes.difference(positions.index, sort=False)
    if len(missing):
        msg = (
            f"{len(missing)} of {len(barcodes)} barcodes of {h5.name} have no position in this file, "
            f"e.g. {c.examples(missing)}; the matrix and the positions must come from the same Space Ranger run."
        )
        raise InputError(msg, pos_path)
    in_tissue = positions.index[positions["in_tissue"].to_numpy() == 1]
    absent = in_tissue.difference(barcodes, sort=False)
    if len(absent):
        msg = (
            f"{len(absent)} in-tissue spots of {pos_path.name} are not in the count matrix, e.g. {c.examples(absent)}; "
            "the matrix and the positions must come from the same Space Ranger run."
        )
        raise InputError(msg, h5)
    obs = positions.loc[barcodes]
    if in_tissue_only:
        keep = obs["in_tissue"].to_numpy() == 1
        if not keep.any():
            msg = f"no spot of {h5.name} is in tissue (in_tissue == 1)"
            raise InputError(f"{msg}; pass in_tissue_only=False to keep them all.", pos_path,
                             cli=f"{msg}; the command line reads the spots under the tissue only.")
        obs, X = obs.loc[keep], X[np.flatnonzero(keep)]
    c.check_matrix(X, h5, "count matrix (in-tissue spots)")
    xy = obs[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(dtype=np.float64)
    c.check_spot_positions(xy, pos_path, "pxl_row_in_fullres, pxl_col_in_fullres")
    obs = obs[["in_tissue", "array_row", "array_col"]].copy()

    # scale factors and the Space Ranger images
    sf_raw = c.read_json(sf_path, "scale factors file")
    scalefactors = {}
    for key, value in sf_raw.items():
        try:
            scalefactors[key] = float(value)
        except (TypeError, ValueError):
            continue  # scale factors are numbers; anything else is not ours to interpret
    d = scalefactors.get("spot_diameter_fullres")
    if d is None or not np.isfinite(d) or d <= 0:
        msg = f"scale factors lack a positive 'spot_diameter_fullres' (found keys {c.examples(sorted(sf_raw), 10)})."
        raise InputError(msg, sf_path)
    images = {}
    for res in ("hires", "lowres"):
        png = spatial_dir / f"tissue_{res}_image.png"
        if png.exists():
            key = f"tissue_{res}_scalef"
            if not scalefactors.get(key, 0) > 0:
                msg = f"tissue_{res}_image.png is present but '{key}' is missing or not positive."
                raise InputError(msg, sf_path)
            images[res] = c.read_png(png, f"tissue_{res}_image.png")
            # the scaled spots must fall on the image (one spot diameter of slack): catches scale factors
            # or positions from another run
            scalef, (h, w) = scalefactors[key], images[res].shape[:2]
            pad = scalefactors["spot_diameter_fullres"] * scalef
            sxy = xy * scalef
            off = (sxy[:, 0] < -pad) | (sxy[:, 1] < -pad) | (sxy[:, 0] > w + pad) | (sxy[:, 1] > h + pad)
            if off.any():
                i = int(np.flatnonzero(off)[0])
                msg = (
                    f"{int(off.sum())} of {len(xy)} spots fall outside tissue_{res}_image.png ({w} x {h} px) once "
                    f"scaled by {key}={scalef:g}, e.g. {obs.index[i]!r} at x={sxy[i, 0]:.1f}, y={sxy[i, 1]:.1f}; "
                    "the scale factors and the positions must come from the same Space Ranger run."
                )
                raise InputError(msg, sf_path)

    source = None
    if image is not None:
        width, height = c.image_size(image)
        c.check_spots_in_image(
            xy, obs.index, width, height, Path(image),
            hint="is this the full-resolution image the spots were aligned to (not a downscaled copy)?",
        )
        c.check_fullres_size(width, height, Path(image), images, scalefactors, sf_path)
        source = str(Path(image).expanduser().resolve())

    if library_id is None:
        library_id = outs.parent.name if outs.name == "outs" else outs.name
    metadata = {
        "source_image_path": source,
        "technology": "visium",
        "spot_diameter_um": SPOT_DIAMETER_UM["visium"],
        "positions_file": pos_path.name,
    }
    adata = c.build_anndata(
        X, obs, var, xy, library_id=str(library_id), images=images, scalefactors=scalefactors, metadata=metadata
    )

    if labels is not None:
        lab_path = outs / "labels.tsv" if isinstance(labels, str) and labels == "auto" else Path(labels)
        if not (isinstance(labels, str) and labels == "auto") or lab_path.exists():
            c.attach_labels(adata.obs, read_barcode_labels(lab_path), lab_path)

    adata = c.check_counts(adata, h5, "the count matrix")
    found = problems(adata)
    if found:
        raise InputError(message(found), outs)
    return adata
