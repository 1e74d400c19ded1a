"""Write an AnnData as a Space Ranger-like ``outs/`` folder (so the readers are exercised end to end)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .._outputs import record_entries, swap_into_place
from ..errors import DependencyError, InputError, OutputExistsError

__all__ = ["write_visium"]

POSITIONS = {"list": "tissue_positions_list.csv", "csv": "tissue_positions.csv", "parquet": "tissue_positions.parquet"}
POSITIONS_COLUMNS = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]


def _library(adata, library_id):
    from .._spatial import library_id as _lib_id

    lib = _lib_id(adata, library_id)
    return lib, adata.uns["spatial"][lib]


def _write_h5(path: Path, adata, genome: str) -> None:
    """10x HDF5 v3: features x barcodes in CSC, i.e. the CSR of the spots x genes matrix."""
    import h5py
    from scipy import sparse

    X = adata.X
    X = sparse.csr_matrix(X) if not sparse.issparse(X) else X.tocsr()
    if not X.has_sorted_indices:
        X = X.sorted_indices()  # a copy: the caller's matrix is left alone
    data = X.data
    if data.size and np.all(np.mod(data, 1) == 0):
        data = data.astype(np.int32)
    else:
        data = data.astype(np.float32)
    var = adata.var
    names = np.asarray(adata.var_names, dtype=str)
    ids = np.asarray(var["gene_ids"], dtype=str) if "gene_ids" in var else names
    ftype = np.asarray(var["feature_types"], dtype=str) if "feature_types" in var else np.full(names.size, "Gene Expression")
    gen = np.asarray(var["genome"], dtype=str) if "genome" in var else np.full(names.size, genome)

    def s(a):
        return np.char.encode(np.asarray(a, dtype=str), "utf-8")

    with h5py.File(path, "w") as f:
        f.attrs["filetype"] = "matrix"
        f.attrs["version"] = 2
        f.attrs["software_version"] = "stmorph write_visium"
        m = f.create_group("matrix")
        m.create_dataset("barcodes", data=s(adata.obs_names), compression="gzip")
        m.create_dataset("data", data=data, compression="gzip")
        m.create_dataset("indices", data=X.indices.astype(np.int64), compression="gzip")
        m.create_dataset("indptr", data=X.indptr.astype(np.int64), compression="gzip")
        m.create_dataset("shape", data=np.array([adata.n_vars, adata.n_obs], dtype=np.int32))
        ft = m.create_group("features")
        ft.create_dataset("_all_tag_keys", data=np.array([b"genome"]))
        ft.create_dataset("id", data=s(ids), compression="gzip")
        ft.create_dataset("name", data=s(names), compression="gzip")
        ft.create_dataset("feature_type", data=s(ftype), compression="gzip")
        ft.create_dataset("genome", data=s(gen), compression="gzip")


def _positions_table(adata, off_tissue: bool):
    import pandas as pd

    from .._spatial import coordinates

    xy = np.rint(coordinates(adata)).astype(np.int64)
    obs = adata.obs
    for col in ("array_row", "array_col"):
        if col not in obs:
            msg = f'adata.obs["{col}"] is missing; write_visium needs Visium array coordinates.'
            raise InputError(msg)
    df = pd.DataFrame({
        "barcode": np.asarray(adata.obs_names, dtype=str),
        "in_tissue": np.asarray(obs["in_tissue"], dtype=np.int64) if "in_tissue" in obs else 1,
        "array_row": np.asarray(obs["array_row"], dtype=np.int64),
        "array_col": np.asarray(obs["array_col"], dtype=np.int64),
        "pxl_row_in_fullres": xy[:, 1],
        "pxl_col_in_fullres": xy[:, 0],
    })
    extra = adata.uns.get("synthetic", {}).get("off_tissue") if off_tissue else None
    if extra is not None and len(extra.get("barcode", [])):
        oxy = np.rint(np.asarray(extra["spatial"], dtype=np.float64)).astype(np.int64)
        df = pd.concat([df, pd.DataFrame({
            "barcode": np.asarray(extra["barcode"], dtype=str),
            "in_tissue": 0,
            "array_row": np.asarray(extra["array_row"], dtype=np.int64),
            "array_col": np.asarray(extra["array_col"], dtype=np.int64),
            "pxl_row_in_fullres": oxy[:, 1],
            "pxl_col_in_fullres": oxy[:, 0],
        })], ignore_index=True)
    return df.sort_values(["array_row", "array_col"], kind="stable").reset_index(drop=True)[POSITIONS_COLUMNS]


def _write_tiff(path: Path, img: np.ndarray, compression: str, levels: int = 3, bigtiff: bool | None = None) -> None:
    """Tiled (512 px) pyramidal TIFF: full resolution plus ``levels`` 2x-reduced sub-resolutions (SubIFDs).

    ``bigtiff``: write a BigTIFF (default: when the pixels exceed 2 GiB)."""
    import tifffile
    from PIL import Image

    pyramid = [img]
    for _ in range(levels):
        prev = pyramid[-1]
        if min(prev.shape[:2]) < 1024:
            break
        pyramid.append(np.asarray(Image.fromarray(prev).reduce(2)))
    kw = dict(tile=(512, 512), photometric="rgb", compression=compression, maxworkers=os.cpu_count() or 1)
    if compression == "jpeg":
        kw["compressionargs"] = {"level": 90}
    elif compression in ("zlib", "deflate"):
        kw["predictor"] = True
        kw["compressionargs"] = {"level": 4}
    with tifffile.TiffWriter(path, bigtiff=img.nbytes > 2**31 if bigtiff is None else bigtiff) as tif:
        tif.write(pyramid[0], subifds=len(pyramid) - 1, resolutionunit=None, software=TIFF_SOFTWARE, **kw)
        for level in pyramid[1:]:
            tif.write(level, subfiletype=1, **kw)


#: The TIFF ``Software`` tag of the images the writers make: ``force=True`` replaces only such a file.
TIFF_SOFTWARE = "stmorph"


def check_output_folder(out: Path, force: bool) -> None:
    """An existing ``out`` may be replaced only when it is empty or, with ``force``, a folder stmorph wrote
    (its marker; see :func:`stmorph._outputs.check_writable`): a writer never deletes the user's files."""
    from .._outputs import check_writable

    if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
        return
    check_writable(out, force=force)


def check_output_image(path: Path, force: bool) -> None:
    """An existing image file is replaced only with ``force`` and only when a stmorph writer made it."""
    if not (path.exists() or path.is_symlink()):
        return
    if not force:
        raise OutputExistsError(f"{path}: exists; pass force=True to replace it.")
    try:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            ours = tif.pages[0].software == TIFF_SOFTWARE
    except Exception:  # noqa: BLE001 - not a TIFF, unreadable: not ours either way
        ours = False
    if not ours or path.is_symlink():
        raise OutputExistsError(f"{path}: exists and was not written by stmorph; force=True does not replace it.")


def write_visium(
    adata,
    path: str | os.PathLike,
    *,
    positions: str = "list",
    fullres: str | None = "image.tif",
    force: bool = False,
    off_tissue: bool = True,
    compression: str = "jpeg",
    library_id: str | None = None,
) -> Path:
    """Write ``adata`` as a Space Ranger-like ``outs/`` folder.

    Parameters
    ----------
    adata
        Counts in ``X`` (raw), ``obs`` with ``array_row``/``array_col`` (``in_tissue`` optional),
        ``obsm["spatial"]`` and ``uns["spatial"][library_id]`` (as :func:`stmorph.datasets.synthetic` makes).
    path
        The folder to create (the ``outs/`` folder).
    positions
        ``"list"``: ``spatial/tissue_positions_list.csv`` without header (Space Ranger 1.x);
        ``"csv"``: ``spatial/tissue_positions.csv`` with header (Space Ranger 2.x);
        ``"parquet"``: ``spatial/tissue_positions.parquet`` (Space Ranger 3.x, needs pyarrow).
    fullres
        File name (inside ``path``) of the full-resolution image, written as a tiled pyramidal TIFF from
        ``images["fullres"]``; ``None`` skips it.
    force
        Replace an existing folder that an earlier ``write_visium`` wrote (its ``.stmorph`` marker); a folder
        holding anything else is never replaced.
    off_tissue
        Also list the grid positions outside the tissue (``in_tissue = 0``) that synthetic data carry in
        ``uns["synthetic"]["off_tissue"]``, as Space Ranger lists every spot of the capture area.
    compression
        TIFF compression: ``"jpeg"`` (quality 90, default: the synthetic image carries pixel noise, so a
        lossless 13,000 px image would take ~450 MB), ``"zlib"`` (lossless, pixel-exact) or ``"none"``.
    library_id
        Which ``uns["spatial"]`` library to write (default: the only one).

    Returns
    -------
    The folder path. It holds ``filtered_feature_bc_matrix.h5`` (10x HDF5 v3), ``spatial/`` (positions
    file, ``scalefactors_json.json``, ``tissue_hires_image.png``, ``tissue_lowres_image.png`` when the
    images exist), the full-resolution TIFF, and ``labels.tsv`` (``barcode``, ``annotation``) when
    ``obs["annotation"]`` exists.

    Raises
    ------
    OutputExistsError
        ``path`` exists and is not empty, and ``force`` is False or stmorph did not write it.
    InputError
        Missing fields or an unknown ``positions`` layout.
    """
    from PIL import Image

    if positions not in POSITIONS:
        msg = f"positions={positions!r} is not allowed; use one of {sorted(POSITIONS)}."
        raise InputError(msg)
    if compression not in ("zlib", "jpeg", "none", "deflate"):
        msg = f"compression={compression!r} is not allowed; use 'zlib', 'jpeg' or 'none'."
        raise InputError(msg)
    out = Path(path).expanduser()
    check_output_folder(out, force)
    if positions == "parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            msg = "positions='parquet' needs pyarrow: pip install pyarrow (or use positions='csv')."
            raise DependencyError(msg) from None
    lib_id, lib = _library(adata, library_id)
    images = lib.get("images", {}) or {}
    sf = dict(lib.get("scalefactors", {}))
    if "spot_diameter_fullres" not in sf:
        msg = f'uns["spatial"]["{lib_id}"]["scalefactors"] lacks "spot_diameter_fullres".'
        raise InputError(msg)
    table = _positions_table(adata, off_tissue)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        spatial = tmp / "spatial"
        spatial.mkdir()
        _write_h5(tmp / "filtered_feature_bc_matrix.h5", adata, genome=lib_id)
        pos_path = spatial / POSITIONS[positions]
        if positions == "list":
            table.to_csv(pos_path, header=False, index=False)
        elif positions == "csv":
            table.to_csv(pos_path, header=True, index=False)
        else:
            table.to_parquet(pos_path, index=False)
        full = images.get("fullres")
        for res in ("hires", "lowres"):
            img = images.get(res)
            key = f"tissue_{res}_scalef"
            if img is None and full is not None and key in sf:
                from ._image import downsample

                img = downsample(np.asarray(full), float(sf[key]))
            if img is not None:
                Image.fromarray(np.asarray(img)).save(spatial / f"tissue_{res}_image.png")
        with open(spatial / "scalefactors_json.json", "w") as fh:
            json.dump({k: float(v) for k, v in sf.items() if np.isscalar(v)}, fh, indent=1)
        if fullres is not None and full is not None:
            _write_tiff(tmp / fullres, np.asarray(full), "none" if compression == "none" else compression)
        if "annotation" in adata.obs:
            import pandas as pd

            lab = pd.DataFrame({"barcode": np.asarray(adata.obs_names, dtype=str),
                                "annotation": adata.obs["annotation"].astype(object).to_numpy()})
            lab = lab[lab["annotation"].notna()]
            lab.to_csv(tmp / "labels.tsv", sep="\t", index=False)
        record_entries(tmp)
        swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
