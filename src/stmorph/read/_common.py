"""Helpers shared by the readers: checked file access, table parsing, joins, images.

Every problem found in a user's files is raised as :class:`~stmorph.errors.InputError`
(or :class:`~stmorph.errors.ImageError` for images) naming the file and saying what is
wrong, on one line, so the command line can print it without a traceback. Nothing
here ever writes to disk.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import DependencyError, ImageError, InputError

#: Largest side of the ``hires`` / ``lowres`` images stmorph makes from a full-resolution image
#: (the sizes Space Ranger uses).
HIRES_MAX_SIDE = 2000
LOWRES_MAX_SIDE = 600


# --------------------------------------------------------------------------- files and messages


def examples(values: Iterable[Any], n: int = 3) -> str:
    """``'a', 'b', 'c' ...`` for the first ``n`` of ``values`` (for error messages)."""
    values = list(values)
    shown = ", ".join(repr(v.item() if isinstance(v, np.generic) else v) for v in values[:n])
    return shown + (f" ... ({len(values)} in all)" if len(values) > n else "")


def require_file(path: str | os.PathLike, what: str, hint: str = "") -> Path:
    """Return ``path`` as a :class:`~pathlib.Path`, raising InputError when it is not a readable file."""
    p = Path(path).expanduser()
    if not p.exists():
        msg = f"{what} not found" + (f"; {hint}" if hint else ".")
        raise InputError(msg, p)
    if not p.is_file():
        msg = f"{what} is not a file (found a folder or something else)."
        raise InputError(msg, p)
    if not os.access(p, os.R_OK):
        msg = f"{what} is not readable (permission denied)."
        raise InputError(msg, p)
    return p


def require_dir(path: str | os.PathLike, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        msg = f"{what} not found."
        raise InputError(msg, p)
    if not p.is_dir():
        msg = f"{what} must be a folder; got a file."
        raise InputError(msg, p)
    return p


def read_json(path: Path, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            obj = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        msg = f"{what} is not valid JSON ({exc})."
        raise InputError(msg, path) from None
    if not isinstance(obj, dict):
        msg = f"{what} must hold a JSON object; got {type(obj).__name__}."
        raise InputError(msg, path)
    return obj


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type name when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _open_text(path: Path):
    import bz2
    import gzip
    import lzma

    opener = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}.get(path.suffix, open)
    return opener(path, "rt", encoding="utf-8", errors="replace", newline="")


def ragged_row(path: Path, sep: str, skip: int = 0) -> tuple[int, int, int, int] | None:
    """``(line, fields, expected, first)`` of the first line of a delimited file (after ``skip`` lines) whose
    number of fields differs from that of line ``first``, the first one read, or None. Quotes are not
    interpreted (tables of counts and positions have none)."""
    expected = first = None
    try:
        with _open_text(path) as fh:
            for i, line in enumerate(fh, start=1):
                line = line.rstrip("\r\n")
                if i <= skip or not line.strip():
                    continue
                n = line.count(sep) + 1
                if expected is None:
                    expected, first = n, i
                elif n != expected:
                    return i, n, expected, first
    except (OSError, EOFError, ValueError):
        return None
    return None


def ragged_message(what: str, path: Path, sep: str, skip: int = 0) -> str | None:
    """``"<what>: line N has M fields, expected K"`` for the first ragged line of ``path``, or None."""
    found = ragged_row(path, sep, skip)
    if found is None:
        return None
    line, n, expected, first = found
    return f"{what}: line {line} has {n} fields, expected {expected} (as line {first} has); is the file cut or edited?"


def read_table(path: Path, what: str, **kwargs) -> pd.DataFrame:
    """``pandas.read_csv`` with parse failures turned into InputError naming the file."""
    try:
        df = pd.read_csv(path, **kwargs)
    except pd.errors.EmptyDataError:
        msg = f"{what} is empty."
        raise InputError(msg, path) from None
    except pd.errors.ParserError as exc:
        skip = kwargs.get("skiprows") if isinstance(kwargs.get("skiprows"), int) else 0
        msg = ragged_message(what, path, kwargs.get("sep", ","), skip) or f"{what} cannot be parsed ({first_line(exc)})."
        raise InputError(msg, path) from None
    except (UnicodeDecodeError, ValueError, EOFError, OSError) as exc:
        # OSError/EOFError: a truncated or corrupt .gz; ValueError: bad dtype conversions.
        text = first_line(exc)
        msg = f"{what} cannot be parsed ({text})."
        raise InputError(msg, path) from None
    if df.shape[0] == 0:
        msg = f"{what} has a header but no rows."
        raise InputError(msg, path)
    return df


def read_parquet(path: Path, what: str) -> pd.DataFrame:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        msg = f'reading {path.name} needs pyarrow: pip install "stmorph[parquet]"'
        raise DependencyError(msg) from None
    try:
        df = pq.read_table(path).to_pandas()
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several unrelated types on corrupt files
        text = first_line(exc)
        msg = f"{what} cannot be read as parquet ({text})."
        raise InputError(msg, path) from None
    if df.shape[0] == 0:
        msg = f"{what} has no rows."
        raise InputError(msg, path)
    return df


def require_columns(df: pd.DataFrame, columns: Sequence[str], path: Path, what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        msg = (
            f"{what} lacks column(s) {examples(missing, 10)}; "
            f"expected {list(columns)}, found {examples(map(str, df.columns), 10)}."
        )
        raise InputError(msg, path)


def numeric_column(df: pd.DataFrame, column: str, path: Path, what: str, *, integer: bool = False) -> np.ndarray:
    """Column as float64 (or int64 with ``integer=True``); non-numbers / non-finite values raise InputError."""
    values = pd.to_numeric(df[column], errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        raw = df[column].to_numpy()[bad]
        msg = f"{what} column {column!r} has {int(bad.sum())} missing or non-numeric value(s), e.g. {examples(raw)}."
        raise InputError(msg, path)
    if integer:
        bad = (values != np.round(values)) | (np.abs(values) > 2**53)  # beyond 2**53 a float64 is not exact
        if bad.any():
            raw = df[column].to_numpy()[bad]
            msg = f"{what} column {column!r} must hold whole numbers (of at most 2**53); found {examples(raw)}."
            raise InputError(msg, path)
        return values.astype(np.int64)
    return values


def check_unique(ids: Sequence, path: Path | None, what: str) -> None:
    ids = pd.Index(ids)
    if not ids.is_unique:
        dup = ids[ids.duplicated()].unique()
        msg = f"{what} has {len(dup)} duplicated id(s): {examples(dup)}."
        raise InputError(msg, path)


def make_unique(names: Sequence[str]) -> pd.Index:
    """Unique names as anndata's ``var_names_make_unique`` makes them (``GENE``, ``GENE-1``, ...)."""
    from anndata.utils import make_index_unique

    return make_index_unique(pd.Index([str(n) for n in names]))


#: Largest value a count matrix may hold: no spot or bin has this many UMIs of one gene (float32 holds
#: whole numbers exactly only up to 2**24; sums of larger values overflow the normalisation).
MAX_COUNT = 1e8


def check_matrix(X, path: Path, what: str) -> None:
    """Raise InputError for an empty matrix, negative, non-finite or absurdly large (> :data:`MAX_COUNT`) counts."""
    n_obs, n_vars = X.shape
    if n_obs == 0 or n_vars == 0:
        msg = f"{what} is empty ({n_obs} spots x {n_vars} genes)."
        raise InputError(msg, path)
    data = X.data if hasattr(X, "data") and not isinstance(X, np.ndarray) else np.asarray(X)
    if data.size == 0 or not np.any(data):
        msg = f"{what} holds no counts (all {n_obs} x {n_vars} entries are zero)."
        raise InputError(msg, path)
    if data.dtype.kind == "f" and not np.all(np.isfinite(data)):
        msg = f"{what} holds {int((~np.isfinite(data)).sum())} non-finite value(s) (NaN or inf); counts must be finite."
        raise InputError(msg, path)
    if (data < 0).any():
        msg = f"{what} holds {int((data < 0).sum())} negative value(s); raw counts must be >= 0."
        raise InputError(msg, path)
    top = float(data.max())
    if top > MAX_COUNT:
        msg = (f"{what} holds {int((data > MAX_COUNT).sum())} value(s) above {MAX_COUNT:.0e} (the largest "
               f"{top:.3g}); these are not UMI counts of one gene in one spot: is this the right file?")
        raise InputError(msg, path)


#: Largest value of a matrix whose non-integer values are taken for log-normalised data.
_LOG_MAX = 50.0


def check_counts(adata, path: Path, what: str, *, inplace: bool = False):
    """Warn when ``adata.X`` is not raw counts; drop spots with zero counts, with a warning that counts them.

    Non-integer values mean normalised, log-transformed or ambient-corrected data: stmorph normalises
    and log-transforms the counts itself, so such input would be transformed twice. Spots with no
    counts at all (Space Ranger keeps a few under the tissue) carry no expression and are left out.
    Returns the AnnData (a subset copy unless ``inplace``).
    """
    import scipy.sparse as sp

    X = adata.X
    data = X.data if sp.issparse(X) else np.asarray(X).ravel()
    if data.dtype.kind == "f" and data.size:
        sample = data[:: max(1, data.size // 1_000_000)]
        frac = sample[sample != np.floor(sample)]
        if frac.size:
            top = float(data.max())
            looks = f", which looks log-normalised (largest value {top:.3g})" if top <= _LOG_MAX else ""
            hint = ""
            for name, M in (("layers['counts']", adata.layers.get("counts")),
                            ("raw.X", adata.raw.X if adata.raw is not None else None)):
                if M is not None and M.shape == X.shape:
                    m = M.data if sp.issparse(M) else np.asarray(M).ravel()
                    if m.size and np.all(m == np.floor(m)) and m.min() >= 0:
                        hint = f"; this file has integer counts in {name}: set adata.X = adata.{name} and save it"
                        break
            warnings.warn(
                f"{path}: {what} holds non-integer values (e.g. {float(frac[0]):.4g}){looks}; stmorph normalises and "
                f"log-transforms counts itself, so give raw counts (Space Ranger's filtered_feature_bc_matrix.h5){hint}.",
                UserWarning, stacklevel=3)
    totals = np.asarray(X.sum(axis=1)).ravel()
    empty = totals <= 0
    if empty.any() and not empty.all():
        warnings.warn(
            f"{path}: left out {int(empty.sum())} of {len(empty)} spot(s) with zero counts in {what} "
            f"(e.g. {examples(adata.obs_names[empty])}).", UserWarning, stacklevel=3)
        if inplace:
            adata._inplace_subset_obs(~empty)
        else:
            adata = adata[~empty].copy()
    return adata


# --------------------------------------------------------------------------- spots


def spot_diameter_from_spacing(xy: np.ndarray, factor: float = 0.5, path: Path | None = None) -> float:
    """``factor`` x the median nearest-neighbour distance between spot centres (pixels); InputError naming
    ``path`` (the file the positions came from) when it is undefined."""
    from scipy.spatial import cKDTree

    xy = np.asarray(xy, dtype=np.float64)
    if len(xy) < 2:
        msg = "need at least two spots to derive the spot diameter from their spacing."
        raise InputError(msg, path)
    dist, _ = cKDTree(xy).query(xy, k=2)
    nn = dist[:, 1]
    nn = nn[nn > 0]
    if nn.size == 0:
        msg = "all spots share the same pixel position; cannot derive the spot diameter."
        raise InputError(msg, path)
    return float(np.median(nn) * factor)


def check_spot_positions(xy: np.ndarray, path: Path, columns: str) -> None:
    """InputError naming ``path`` when every spot lies at the same pixel (the pixel columns hold no positions)."""
    xy = np.asarray(xy, dtype=np.float64)
    if len(xy) > 1 and np.all(xy == xy[0]):
        msg = (f"all {len(xy)} spots lie at the same pixel (x={xy[0, 0]:g}, y={xy[0, 1]:g}); the columns {columns} "
               "must hold each spot's centre in full-resolution pixels.")
        raise InputError(msg, path)


#: Relative mismatch between a full-resolution image and the size its Space Ranger hires/lowres image
#: implies, beyond which the image is refused (a warning above 2%).
SCALE_MISMATCH_REFUSED = 0.10
SCALE_MISMATCH_WARNED = 0.02


def check_fullres_size(width: int, height: int, image: Path, images: dict, scalefactors: dict, sf_path: Path) -> None:
    """Compare an image given as the full resolution with the size that ``tissue_hires_image.png`` (else the
    lowres one) and its scale factor imply: Space Ranger made that image from the full resolution one, so a
    copy upscaled 2x (or a downscaled one) is refused, a slight mismatch warned about."""
    for res in ("hires", "lowres"):
        scalef = scalefactors.get(f"tissue_{res}_scalef")
        if res not in images or not scalef or scalef <= 0:
            continue
        h, w = images[res].shape[:2]
        ew, eh = w / scalef, h / scalef
        off = max(abs(width / ew - 1), abs(height / eh - 1))
        slack = 2.0 / (scalef * min(ew, eh))  # the rounding of the small image's size
        if off <= SCALE_MISMATCH_WARNED + slack:
            return
        what = (f"the image is {width} x {height} px, but tissue_{res}_image.png ({w} x {h} px) at "
                f"tissue_{res}_scalef={scalef:g} was made from a {ew:.0f} x {eh:.0f} px image "
                f"({width / ew:.2f}x in width, {height / eh:.2f}x in height)")
        if off > SCALE_MISMATCH_REFUSED:
            msg = (f"{what}; give the full-resolution image the spots were aligned to (not a rescaled copy), or "
                   f"scale factors from the same Space Ranger run ({sf_path.name}).")
            raise InputError(msg, image)
        warnings.warn(f"{image}: {what}; spot patches may be cut at a slightly wrong scale.", UserWarning,
                      stacklevel=3)
        return


def array_pitch(xy: np.ndarray, array_col: np.ndarray, array_row: np.ndarray) -> float | None:
    """Pixels per array step, from a least-squares affine fit ``pixel ~ (array_col, array_row)``.

    The mean length of the two fitted step vectors (rotation-invariant). Unlike the nearest-neighbour
    distance, which takes the smallest of four jittered neighbours and so runs short, it uses every spot.
    None when the array coordinates do not span two dimensions.
    """
    xy = np.asarray(xy, dtype=np.float64)
    A = np.column_stack([np.asarray(array_col, np.float64), np.asarray(array_row, np.float64), np.ones(len(xy))])
    if len(xy) < 4 or np.linalg.matrix_rank(A) < 3:
        return None
    coef, *_ = np.linalg.lstsq(A, xy, rcond=None)  # (3, 2): rows = d/dcol, d/drow, offset
    steps = np.linalg.norm(coef[:2], axis=1)
    if not np.all(np.isfinite(steps)) or np.any(steps <= 0):
        return None
    return float(steps.mean())


def check_spots_in_image(xy: np.ndarray, names: Sequence[str], width: int, height: int, image_path: Path,
                         hint: str = "", cli_hint: str | None = None) -> None:
    """Raise InputError when any spot centre lies outside a ``width`` x ``height`` image; ``hint`` ends the
    message, ``cli_hint`` the command line's (default ``hint``)."""
    xy = np.asarray(xy, dtype=np.float64)
    outside = (xy[:, 0] < 0) | (xy[:, 1] < 0) | (xy[:, 0] >= width) | (xy[:, 1] >= height)
    if outside.any():
        i = int(np.flatnonzero(outside)[0])
        msg = (
            f"{int(outside.sum())} of {len(xy)} spot centres lie outside the {width} x {height} px image, "
            f"e.g. spot {names[i]!r} at x={xy[i, 0]:.1f}, y={xy[i, 1]:.1f} "
            f"(spot pixels span x {xy[:, 0].min():.0f}..{xy[:, 0].max():.0f}, y {xy[:, 1].min():.0f}..{xy[:, 1].max():.0f})"
        )
        cli_hint = hint if cli_hint is None else cli_hint
        raise InputError(msg + (f"; {hint}" if hint else "."), image_path,
                         cli=msg + (f"; {cli_hint}" if cli_hint else "."))


# --------------------------------------------------------------------------- images


def open_image(path: str | os.PathLike):
    """Open a full-resolution image with :func:`stmorph.im.open_slide` (ImageError when unreadable).

    Also refused here, before any work: an image whose full resolution could not be decoded within the
    decode memory budget (:meth:`stmorph.im.Slide.check_decode`: a JPEG/PNG decoded whole, a TIFF strip).
    """
    p = require_file(path, "image")
    from ..im import open_slide

    try:
        slide = open_slide(p)
    except (ImageError, InputError):
        raise
    except Exception as exc:  # noqa: BLE001 - any decoder failure means the file is unreadable
        text = first_line(exc)
        msg = f"image cannot be read ({text})."
        raise ImageError(msg, p) from None
    try:
        slide.check_decode()
    except BaseException:
        slide.close()
        raise
    return slide


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(width, height)`` of a full-resolution image, via :func:`stmorph.im.open_slide`."""
    with open_image(path) as slide:
        return int(slide.width), int(slide.height)


def read_png(path: Path, what: str) -> np.ndarray:
    """A Space Ranger ``tissue_*_image.png`` as ``uint8`` (H, W, 3); ImageError when unreadable/truncated."""
    from PIL import Image, UnidentifiedImageError

    from ..im.slide._base import check_decode

    try:
        with Image.open(path) as im:
            w, h = im.size
            # Pillow's buffer, its RGB conversion (4 bytes a pixel each) and the array copied out
            check_decode(path, w * h * 11, f"{what} ({w} x {h} px; Space Ranger's are at most {HIRES_MAX_SIDE} "
                                           "px, 6000 for Visium HD)", hint="give the image Space Ranger wrote")
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16-bit/float grey: scale by the value range
                raw = np.asarray(im, dtype=np.float64)
                top = 65535.0 if im.mode.startswith("I;16") else max(float(raw.max()), 1.0)
                grey = np.clip(raw / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
                arr = np.repeat(grey[..., None], 3, axis=2)
            else:
                arr = np.asarray(im if im.mode == "RGB" else im.convert("RGB"))
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        msg = (f"{what} is too large for a downscaled image ({first_line(exc)}); Space Ranger's are at most "
               f"{HIRES_MAX_SIDE} px (6000 for Visium HD): give the image Space Ranger wrote.")
        raise ImageError(msg, path) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        text = first_line(exc)
        msg = f"{what} cannot be read or is truncated ({text})."
        raise ImageError(msg, path) from None
    return np.ascontiguousarray(arr, dtype=np.uint8)


def downsample(slide, max_side: int) -> tuple[np.ndarray, float]:
    """An RGB ``uint8`` rendering of ``slide`` whose longer side is at most ``max_side``, and its scale."""
    img, scale = slide.thumbnail(max_side)
    return np.ascontiguousarray(img, dtype=np.uint8), float(scale)


# --------------------------------------------------------------------------- labels


#: Share of a labels file's labelled spots that may lie off the data's spots without a warning (a section's
#: own labels match all, or all but a few, of its spots; another section's leave several percent out).
UNMATCHED_LABELS = 0.02


def attach_labels(obs: pd.DataFrame, labels: pd.Series, path: Path, key: str = "annotation") -> None:
    """Put ``labels`` (indexed like ``obs``) into ``obs[key]`` as a categorical, NaN where unlabelled.

    Raises InputError when no label matches any spot (the label file belongs to another section); warns,
    saying how many match, when more than :data:`UNMATCHED_LABELS` of the labelled spots are not spots of
    the data (likely another section's labels, which match most barcodes on Visium).
    """
    labels = labels.astype(object).where(labels.notna(), None)
    labels = labels.map(lambda v: None if v is None or str(v).strip() in ("", "nan", "NaN", "NA") else str(v).strip())
    matched = labels.index.intersection(obs.index)
    if len(matched) == 0:
        msg = (
            f"none of the {len(labels)} labelled spots matches a spot of the data "
            f"(labels e.g. {examples(labels.index)}; spots e.g. {examples(obs.index)})."
        )
        raise InputError(msg, path)
    labelled = labels.index[labels.notna()]
    unmatched = labelled.difference(obs.index, sort=False)
    if len(labelled) and len(unmatched) > UNMATCHED_LABELS * len(labelled):
        covered = int(obs.index.isin(labelled).sum())
        warnings.warn(
            f"{path}: {len(unmatched)} of its {len(labelled)} labelled spots are not spots of this section "
            f"(e.g. {examples(unmatched)}), and its labels cover {covered} of the {len(obs)} spots; are these the "
            "labels of another section? (Visium barcodes repeat across slides, so another section's labels "
            "match most spots, and ARI/NMI against them mean nothing.)", UserWarning, stacklevel=3)
    values = labels.reindex(obs.index)
    cats = sorted({v for v in values if v is not None and v == v})
    obs[key] = pd.Categorical(values.where(values.notna(), np.nan), categories=cats)


# --------------------------------------------------------------------------- the AnnData


def build_anndata(
    X,
    obs: pd.DataFrame,
    var: pd.DataFrame,
    xy: np.ndarray,
    *,
    library_id: str,
    images: dict[str, np.ndarray],
    scalefactors: dict[str, float],
    metadata: dict[str, Any],
):
    """Assemble the stmorph data model (see ``docs/ARCHITECTURE.md``)."""
    import anndata as ad
    import scipy.sparse as sp

    X = sp.csr_matrix(X, dtype=np.float32)
    X.sort_indices()
    adata = ad.AnnData(X=X, obs=obs, var=var)
    adata.obsm["spatial"] = np.ascontiguousarray(xy, dtype=np.float64)
    adata.uns["spatial"] = {
        library_id: {
            "images": dict(images),
            "scalefactors": {k: float(v) for k, v in scalefactors.items()},
            "metadata": dict(metadata),
        }
    }
    return adata
