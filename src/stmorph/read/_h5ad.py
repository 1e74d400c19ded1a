"""Reader for ``.h5ad`` files (saved by stmorph, scanpy or squidpy), validated against the data model."""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from . import _common as c

__all__ = ["h5ad", "conform"]


def conform(adata):
    """Bring an AnnData made by scanpy/squidpy to stmorph's conventions, in place, where that is lossless.

    Dense ``X`` becomes CSR; ``obsm["spatial"]`` becomes float64 (scanpy stores integer pixels); a
    ``source_image_path`` of ``"None"`` or ``""`` (no image, as older stmorph saved it) is removed;
    ``obs["annotation"]``, when present and not categorical, becomes categorical.
    Nothing else is invented: what is missing stays missing for :func:`stmorph.validate` to report.
    """
    import pandas as pd
    import scipy.sparse as sp

    X = adata.X
    if X is not None and not sp.issparse(X) and isinstance(X, np.ndarray) and X.ndim == 2 and X.dtype.kind in "biuf":
        adata.X = sp.csr_matrix(X)
    elif sp.issparse(X) and X.format != "csr":
        adata.X = X.tocsr()
    if "spatial" in adata.obsm:
        xy = adata.obsm["spatial"]
        if isinstance(xy, np.ndarray) and xy.dtype.kind in "biuf" and xy.dtype != np.float64:
            adata.obsm["spatial"] = xy.astype(np.float64)
    spatial = adata.uns.get("spatial")
    for lib in (spatial.values() if isinstance(spatial, dict) else ()):
        meta = lib.get("metadata") if isinstance(lib, dict) else None
        # stmorph before 0.1 stored a missing image as the string "None": it is no path
        if isinstance(meta, dict) and isinstance(meta.get("source_image_path"), str) and \
                meta["source_image_path"].strip() in ("", "None"):
            del meta["source_image_path"]
    if "annotation" in adata.obs and not isinstance(adata.obs["annotation"].dtype, pd.CategoricalDtype):
        adata.obs["annotation"] = adata.obs["annotation"].astype("category")
    return adata


def _attach_image(adata, image, library_id: str | None) -> None:
    """Record ``image`` as the section's full-resolution image once its spots are checked to lie on it."""
    from pathlib import Path

    from .. import _spatial

    lib = _spatial.library(adata, library_id)
    width, height = c.image_size(image)
    c.check_spots_in_image(_spatial.coordinates(adata), adata.obs_names, width, height, Path(image),
                           hint="is it the full-resolution image of this section?")
    sf = {k: v for k, v in (lib.get("scalefactors") or {}).items() if isinstance(v, (int, float, np.number))}
    c.check_fullres_size(width, height, Path(image), dict(lib.get("images") or {}), sf,
                         Path("uns['spatial'] scalefactors"))
    lib.setdefault("metadata", {})["source_image_path"] = str(Path(image).resolve())


def h5ad(path, *, image=None, require_image: bool = False, library_id: str | None = None):
    """Read an ``.h5ad`` file (or take an AnnData) and check that it follows stmorph's data model.

    Parameters
    ----------
    path
        An ``.h5ad`` written by stmorph, ``scanpy`` (e.g. after ``sc.read_visium``) or ``squidpy``; or an
        in-memory AnnData made by them, which is conformed in place and returned.
    image
        Full-resolution H&E of the section (TIFF/BigTIFF, JPEG, PNG). Its path is recorded in
        ``uns["spatial"][library_id]["metadata"]["source_image_path"]`` after checking that every spot
        centre lies on it.
    require_image
        Also require a full-resolution image source (``metadata["source_image_path"]`` that exists, or an
        in-memory ``images["fullres"]``).
    library_id
        Validate only this library of ``uns["spatial"]``.

    Returns
    -------
    The AnnData, with dense ``X`` converted to CSR and ``obsm["spatial"]`` to float64 (see :func:`conform`).

    Raises
    ------
    stmorph.InputError
        The file is missing or not a readable ``.h5ad``, or the object lacks what stmorph needs; the message
        lists every problem (see :func:`stmorph.validate`).
    """
    import anndata as ad

    from .._validate import message, problems

    if isinstance(path, ad.AnnData):
        conform(path)
        found = problems(path, require_image=require_image and image is None, library_id=library_id)
        if found:
            raise InputError(message(found))
        c.check_counts(path, "AnnData", "X", inplace=True)
        if image is not None:
            _attach_image(path, image, library_id)
        return path
    p = c.require_file(path, ".h5ad file")
    try:
        adata = ad.read_h5ad(p)
    except Exception as exc:  # noqa: BLE001 - h5py/anndata raise many types for corrupt or foreign files
        text = c.first_line(exc)
        msg = f"cannot be read as an .h5ad file; truncated or not written by anndata ({type(exc).__name__}: {text})."
        raise InputError(msg, p) from None
    conform(adata)
    found = problems(adata, require_image=require_image and image is None, library_id=library_id)
    if found:
        raise InputError(message(found), p)
    adata = c.check_counts(adata, p, "X")
    if image is not None:
        _attach_image(adata, image, library_id)
    return adata
