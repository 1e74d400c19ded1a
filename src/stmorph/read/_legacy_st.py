"""Reader for the original Spatial Transcriptomics layout (Ståhl et al. 2016), as published for HER2ST.

Three tables describe a section, all keyed by the array coordinates ``(x, y)`` of a spot:

* counts: spots x genes, tab separated, first column the spot id ``"XxY"`` (genes x spots is recognised too);
* spot selection (``*_selection.tsv``): ``x y new_x new_y pixel_x pixel_y selected``; ``pixel_x``/``pixel_y``
  are the spot centre in pixels of the original full-resolution H&E;
* pathologist labels (optional, ``*_labeled_coordinates.tsv``): ``x y ... label`` with *fractional* array
  coordinates, rounded to the nearest integer to join.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from .._spatial import SPOT_DIAMETER_UM
from ..errors import InputError
from . import _common as c

__all__ = ["legacy_st"]

_SPOT_ID = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*x\s*(\d+(?:\.\d+)?)\s*$")
SELECTION_COLUMNS = ("x", "y", "pixel_x", "pixel_y")
LABEL_COLUMNS = ("x", "y", "label")
#: Legacy ST spots are 100 um wide with 200 um between centres: diameter = 0.5 x centre-to-centre pitch.
DIAMETER_PER_SPACING = 0.5


def _spot_key(x: np.ndarray, y: np.ndarray) -> pd.Index:
    return pd.Index([f"{int(a)}x{int(b)}" for a, b in zip(x, y)])


def _parse_ids(ids) -> tuple[np.ndarray, np.ndarray] | None:
    """Array coordinates from ``"XxY"`` ids, or None when they are not spot ids."""
    xs, ys = [], []
    for v in ids:
        m = _SPOT_ID.match(str(v))
        if m is None:
            return None
        xs.append(float(m.group(1)))
        ys.append(float(m.group(2)))
    return np.round(xs).astype(np.int64), np.round(ys).astype(np.int64)


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".gz", ".bz2", ".xz", ".zip", ".tsv", ".csv", ".txt"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name


def _first_line(path: Path) -> str:
    import bz2
    import gzip
    import lzma

    opener = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}.get(path.suffix, open)
    try:
        with opener(path, "rt", encoding="utf-8") as fh:
            line = fh.readline()
    except (OSError, EOFError, UnicodeDecodeError, lzma.LZMAError) as exc:
        msg = f"counts file cannot be parsed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})."
        raise InputError(msg, path) from None
    if not line.strip():
        msg = "counts file is empty."
        raise InputError(msg, path)
    return line


def read_counts(path: str | os.PathLike):
    """Counts table -> ``(X csr float32 spots x genes, spot x, spot y, gene names)``."""
    import scipy.sparse as sp

    path = c.require_file(path, "counts file")
    sep = "," if ".csv" in path.suffixes else "\t"
    # header read apart: pandas would rename duplicated gene names ("ACTB.1"); anndata's style is wanted
    names = [v.strip().strip('"') for v in _first_line(path).rstrip("\r\n").split(sep)]
    df = c.read_table(path, "counts file", sep=sep, header=None, skiprows=1, index_col=0)
    if df.isna().to_numpy().any():  # a short row is filled with NaN by pandas: say which row
        msg = c.ragged_message("counts file", path, sep, skip=1)
        if msg is not None:
            raise InputError(msg, path)
    if len(names) == df.shape[1] + 1:  # the usual layout: an empty (or named) first field above the ids
        names = names[1:]
    if len(names) != df.shape[1]:
        msg = f"counts file header has {len(names)} fields but its rows have {df.shape[1] + 1}."
        raise InputError(msg, path)
    df.columns = names
    if df.shape[1] == 0:
        msg = "counts file has a single column; expected spots as rows, genes as columns, tab separated."
        raise InputError(msg, path)
    parsed = _parse_ids(df.index)
    if parsed is None:
        parsed_cols = _parse_ids(df.columns)
        if parsed_cols is None:
            bad = next(v for v in df.index if _SPOT_ID.match(str(v)) is None)
            msg = (
                f"counts file: spot ids must look like 'XxY' (array coordinates, e.g. '10x13') in the first column "
                f"(or the header, for genes x spots); found e.g. {bad!r}."
            )
            raise InputError(msg, path)
        df = df.T  # genes x spots
        parsed = parsed_cols
    values = df.to_numpy()
    if values.dtype.kind not in "biuf":
        try:
            values = df.apply(pd.to_numeric, errors="raise").to_numpy()
        except (ValueError, TypeError) as exc:
            msg = f"counts file holds non-numeric values ({str(exc).splitlines()[0]})."
            raise InputError(msg, path) from None
    X = sp.csr_matrix(values.astype(np.float32, copy=False))
    c.check_matrix(X, path, "counts file")
    genes = [str(g) for g in df.columns]
    return X, parsed[0], parsed[1], genes


def read_selection(path: str | os.PathLike) -> pd.DataFrame:
    """Spot selection table -> DataFrame indexed by ``"XxY"`` with x, y, pixel_x, pixel_y, selected."""
    path = c.require_file(path, "spot selection file")
    df = c.read_table(path, "spot selection file", sep="\t" if ".csv" not in path.suffixes else ",")
    df.columns = [str(col).strip() for col in df.columns]
    c.require_columns(df, SELECTION_COLUMNS, path, "spot selection file")
    what = "spot selection file"
    out = pd.DataFrame(
        {
            "x": c.numeric_column(df, "x", path, what, integer=True),
            "y": c.numeric_column(df, "y", path, what, integer=True),
            "pixel_x": c.numeric_column(df, "pixel_x", path, what),
            "pixel_y": c.numeric_column(df, "pixel_y", path, what),
        }
    )
    if "selected" in df.columns:
        sel = c.numeric_column(df, "selected", path, what, integer=True)
        bad = ~np.isin(sel, (0, 1))
        if bad.any():
            msg = f"{what} column 'selected' must be 0 or 1; found {c.examples(pd.unique(sel[bad]))}."
            raise InputError(msg, path)
        out["selected"] = sel
    else:
        out["selected"] = 1
    out.index = _spot_key(out["x"], out["y"])
    c.check_unique(out.index, path, f"{what} (array coordinates x, y)")
    return out


def read_labels(path: str | os.PathLike) -> pd.Series:
    """Pathologist labels -> Series indexed by ``"XxY"`` (fractional array coordinates rounded)."""
    path = c.require_file(path, "labels file")
    what = "labels file"
    df = c.read_table(path, what, sep="\t" if ".csv" not in path.suffixes else ",", keep_default_na=False)
    df.columns = [str(col).strip() for col in df.columns]
    c.require_columns(df, LABEL_COLUMNS, path, what)
    # published HER2ST label files have rows with NA coordinates: unusable, so dropped (and counted)
    na = np.zeros(len(df), dtype=bool)
    for col in ("x", "y"):
        na |= df[col].astype(str).str.strip().str.upper().isin(("NA", "NAN", ""))
    if na.any():
        warnings.warn(f"{path.name}: dropped {int(na.sum())} label row(s) with NA coordinates.", stacklevel=3)
        df = df.loc[~na].reset_index(drop=True)
    x = np.round(c.numeric_column(df, "x", path, what)).astype(np.int64)
    y = np.round(c.numeric_column(df, "y", path, what)).astype(np.int64)
    index = _spot_key(x, y)
    if not index.is_unique:
        dup = index[index.duplicated()].unique()
        msg = f"{what}: {len(dup)} array position(s) carry more than one label after rounding x, y, e.g. {c.examples(dup)}."
        raise InputError(msg, path)
    return pd.Series(df["label"].astype(str).to_numpy(), index=index, name="annotation")


def _auto_pixel_scale(image: Path) -> float:
    sf_path = image.parent / "scalefactors.json"
    if not sf_path.exists():
        def msg(auto, given):
            return (f"{auto} looks for {sf_path.name} next to the image with a 'pixel_scale' entry, and there is "
                    f"none; pass {given}<image px per selection px> instead.")

        raise InputError(msg("pixel_scale='auto'", "pixel_scale="), sf_path,
                         cli=msg("--pixel-scale auto", "--pixel-scale "))
    sf = c.read_json(sf_path, "scale factors file")
    if "image" in sf and str(sf["image"]) != image.name:
        msg = f"scale factors describe image {sf['image']!r}, not {image.name!r}; pass"
        raise InputError(f"{msg} pixel_scale= explicitly.", sf_path,
                         cli=f"{msg} --pixel-scale <image px per selection px> explicitly.")
    try:
        scale = float(sf["pixel_scale"])
    except (KeyError, TypeError, ValueError):
        msg = f"scale factors lack a numeric 'pixel_scale' (found keys {c.examples(sorted(sf), 10)})."
        raise InputError(msg, sf_path) from None
    return scale


def legacy_st(
    counts: str | os.PathLike,
    spots: str | os.PathLike,
    image: str | os.PathLike | None = None,
    *,
    pixel_scale: float | Literal["auto"] = 1.0,
    labels: str | os.PathLike | None = None,
    library_id: str | None = None,
    in_tissue_only: bool = True,
    missing_spots: Literal["warn", "error"] = "warn",
):
    """Read one section of the original Spatial Transcriptomics layout (HER2ST).

    Counts, spot selection and labels are joined on the array coordinates ``(x, y)``.

    Parameters
    ----------
    counts
        Counts table (``.tsv``/``.tsv.gz``): spots x genes with the spot id ``"XxY"`` in the first column
        (a genes x spots table, ids in the header, is recognised too).
    spots
        Spot selection table with columns ``x``, ``y``, ``pixel_x``, ``pixel_y`` and optionally ``selected``;
        ``pixel_x`` is the column and ``pixel_y`` the row of the spot centre in the full-resolution H&E.
    image
        The H&E (TIFF/BigTIFF incl. pyramidal, JPEG or PNG). Every spot must lie inside it (after ``pixel_scale``).
    pixel_scale
        Image pixels per selection pixel, for an image that is a rescaled rendering of the original (HER2ST's
        ``A1_HE_2000px.png``: 2000/6954). ``"auto"`` reads ``pixel_scale`` from ``scalefactors.json`` next to
        the image. Spot coordinates in ``obsm["spatial"]`` are ``pixel_x/pixel_y * pixel_scale``.
    labels
        Pathologist labels table with columns ``x``, ``y`` (fractional array coordinates, rounded to join) and
        ``label``. Labelled positions with no spot are ignored.
    library_id
        Key under ``uns["spatial"]``; default the counts file name without extensions (``"A1"``).
    in_tissue_only
        Keep only spots with ``selected == 1`` (default).
    missing_spots
        Selected spots that have no row in the counts table (HER2ST omits a few, e.g. ``'18x20'``) are dropped
        with a warning (``"warn"``) or raise (``"error"``). Counts rows with no position always raise.

    Returns
    -------
    AnnData with raw counts in ``X`` (CSR float32) and unique gene names (``var_names_make_unique`` style).

    Sets the following fields:

    ``obs["in_tissue"]``, ``obs["array_row"]`` (= y), ``obs["array_col"]`` (= x)
        From the spot selection.
    ``obs["annotation"]``
        Labels (categorical, NaN where unlabelled) when ``labels`` is given.
    ``obsm["spatial"]``
        Spot centres in pixels of ``image`` (x = column, y = row).
    ``uns["spatial"][library_id]``
        ``scalefactors["spot_diameter_fullres"]`` = 0.5 x the centre-to-centre pitch (legacy ST spots are
        100 um across, 200 um apart), the pitch being the pixels per array step of a least-squares affine
        fit of the spot pixels on their array coordinates (the median nearest-neighbour distance when the
        spots lie on one line; it runs ~8% short on HER2ST, whose detected centres are jittered); with an image, ``images["hires"]``/``["lowres"]``
        (longer side at most 2000 / 600 px) and their scale factors; ``metadata`` with ``source_image_path``,
        ``technology="legacy_st"``, ``spot_diameter_um=100``, ``pixel_scale``.

    Raises
    ------
    stmorph.InputError
        Missing files or columns, malformed spot ids, counts rows with no selected position, duplicated spots,
        an empty matrix, labels matching no spot, spots outside ``image``.
    stmorph.ImageError
        An unreadable or truncated image.
    """
    from .._validate import message, problems

    if missing_spots not in ("warn", "error"):
        msg = f"missing_spots must be 'warn' or 'error'; got {missing_spots!r}."
        raise InputError(msg)
    counts_path = c.require_file(counts, "counts file")
    spots_path = c.require_file(spots, "spot selection file")
    image_path = None if image is None else c.require_file(image, "image")
    if isinstance(pixel_scale, str):
        if pixel_scale != "auto":
            msg = f"pixel_scale must be a positive number or 'auto'; got {pixel_scale!r}."
            raise InputError(msg)
        pixel_scale = 1.0 if image_path is None else _auto_pixel_scale(image_path)
    try:
        pixel_scale = float(pixel_scale)
    except (TypeError, ValueError):
        msg = f"pixel_scale must be a positive number or 'auto'; got {pixel_scale!r}."
        raise InputError(msg) from None
    if not np.isfinite(pixel_scale) or pixel_scale <= 0:
        msg = f"pixel_scale must be a positive number; got {pixel_scale!r}."
        raise InputError(msg)

    X, x, y, genes = read_counts(counts_path)
    ids = _spot_key(x, y)
    c.check_unique(ids, counts_path, "counts file spot ids")
    selection = read_selection(spots_path)

    no_position = ids.difference(selection.index, sort=False)
    if len(no_position):
        msg = (
            f"{len(no_position)} of {len(ids)} spots of {counts_path.name} have no row in this spot selection file, "
            f"e.g. {c.examples(no_position)}; counts and selection must describe the same section."
        )
        raise InputError(msg, spots_path)
    selected = selection.index[selection["selected"].to_numpy() == 1]
    no_counts = selected.difference(ids, sort=False)
    if len(no_counts):
        msg = (
            f"{len(no_counts)} of {len(selected)} selected spots of {spots_path.name} have no row in the counts "
            f"file, e.g. {c.examples(no_counts)}"
        )
        if missing_spots == "error" or len(no_counts) == len(selected):
            raise InputError(msg + "; counts and selection must describe the same section.", counts_path)
        warnings.warn(f"{counts_path}: {msg}; they are left out.", UserWarning, stacklevel=2)

    sel = selection.loc[ids]
    keep = np.ones(len(ids), dtype=bool)
    if in_tissue_only:
        keep = sel["selected"].to_numpy() == 1
        if not keep.any():
            msg = f"none of the spots of {counts_path.name} is selected (selected == 1)"
            raise InputError(f"{msg}; pass in_tissue_only=False.", spots_path,
                             cli=f"{msg}; the command line reads the selected spots only.")
    sel, X = sel.loc[keep], X[np.flatnonzero(keep)]
    c.check_matrix(X, counts_path, "counts file (selected spots)")
    xy = sel[["pixel_x", "pixel_y"]].to_numpy(dtype=np.float64) * pixel_scale
    c.check_spot_positions(xy, spots_path, "pixel_x, pixel_y")
    obs = pd.DataFrame(
        {
            "in_tissue": sel["selected"].to_numpy(dtype=np.int64),
            "array_row": sel["y"].to_numpy(dtype=np.int64),
            "array_col": sel["x"].to_numpy(dtype=np.int64),
        },
        index=sel.index,
    )
    var = pd.DataFrame(index=c.make_unique(genes))

    pitch = c.array_pitch(xy, obs["array_col"].to_numpy(), obs["array_row"].to_numpy())
    if pitch is None:  # array coordinates on one line: fall back to the spot spacing in pixels
        diameter = c.spot_diameter_from_spacing(xy, DIAMETER_PER_SPACING, spots_path)
    else:
        diameter = DIAMETER_PER_SPACING * pitch
    scalefactors = {"spot_diameter_fullres": diameter}
    images = {}
    source = None
    if image_path is not None:
        with c.open_image(image_path) as slide:
            width, height = int(slide.width), int(slide.height)
            hint = ("{0}{1:g}; if the image is a rescaled rendering of the original H&E, pass {0}<image px per "
                    "selection px> (or 'auto' to read it from scalefactors.json)")
            c.check_spots_in_image(xy, obs.index, width, height, image_path,
                                   hint=hint.format("pixel_scale=", pixel_scale),
                                   cli_hint=hint.format("--pixel-scale ", pixel_scale))
            for res, side in (("hires", c.HIRES_MAX_SIDE), ("lowres", c.LOWRES_MAX_SIDE)):
                images[res], scalefactors[f"tissue_{res}_scalef"] = c.downsample(slide, side)
        source = str(image_path.expanduser().resolve())

    metadata = {
        "source_image_path": source,
        "technology": "legacy_st",
        "spot_diameter_um": SPOT_DIAMETER_UM["legacy_st"],
        "pixel_scale": pixel_scale,
    }
    library_id = _stem(counts_path) if library_id is None else str(library_id)
    adata = c.build_anndata(
        X, obs, var, xy, library_id=library_id, images=images, scalefactors=scalefactors, metadata=metadata
    )
    if labels is not None:
        lab_path = Path(labels)
        c.attach_labels(adata.obs, read_labels(lab_path), lab_path)

    adata = c.check_counts(adata, counts_path, "the counts file")
    found = problems(adata)
    if found:
        raise InputError(message(found), counts_path)
    return adata
