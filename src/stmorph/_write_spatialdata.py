"""SpatialData out: domains and embeddings as a table annotating the section's spot (or bin) shapes.

napari-spatialdata colours a shapes element by the ``obs`` columns of any table that annotates it
(``uns["spatialdata_attrs"]``: ``region`` = the shapes' name, ``region_key`` = the ``obs`` column
holding it, ``instance_key`` = the ``obs`` column holding each row's shape index). So
:func:`write_spatialdata` adds *a new table* (default ``"stmorph"``) with one categorical column per
method (and its colours in ``uns["<method>_colors"]``), the embeddings in ``obsm`` and the region and
instance columns, annotating the same shapes as the counts table: the domains then show over the H&E
of the store. Nothing the store had is touched: only the new table's folder is written, built in a
temporary folder beside the store and renamed into place; an existing table of that name is replaced
only with ``force=True`` and only when stmorph wrote it, and is moved aside only once the new one is
complete. A path that does not exist becomes a new store, written under a temporary name and renamed
into place: for a section read from a store, that store's spot shapes and its images up to
:data:`RESULT_IMAGE_MAX_BYTES` (so the same shapes and H&E as the input); otherwise spot circles and the
``hires`` image. Its one table holds the counts and the results (``stmorph run STORE.zarr`` writes
``result.zarr`` this way).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from . import _spatial
from .errors import InputError, OutputError, OutputExistsError

__all__ = ["write_spatialdata"]

#: Embeddings written by default when present.
EMBEDDINGS = ("X_stmorph", "X_stmorph_expr", "X_stmorph_image", "X_stmic", "X_expr_pca", "X_image_pca", "X_senca",
              "X_joint")
#: Largest image (bytes at full resolution) copied from the input store into a new result store: the
#: hires and lowres images of Visium and Visium HD stores; the full-resolution H&E stays in the input.
RESULT_IMAGE_MAX_BYTES = 256 * 2**20
_INSTANCE = "instance_id"
_REGION = "region"


def _domain_keys(adata) -> list[str]:
    from .tl import available_methods

    keys = [m for m in available_methods() if m in adata.obs]
    return keys + [k for k in ("joint",) if k in adata.obs and k not in keys]


def _origin(adata) -> dict:
    lib = _spatial.library(adata)
    return dict(lib.get("metadata", {}).get("spatialdata") or {})


def _instances(adata, sdata, region: str, where) -> tuple[np.ndarray, str]:
    """Shape index of each spot in ``sdata.shapes[region]``, and the instance key to name them by."""
    from .read._spatialdata import table_attrs

    origin = _origin(adata)
    key = origin.get("instance_key")
    if key and origin.get("region") == region and key in adata.obs:
        ids, name = adata.obs[key].to_numpy(), key
    else:  # match barcodes with a table that annotates the region
        ids, name = None, _INSTANCE
        for tname, tab in sdata.tables.items():
            try:
                regions, region_key, instance_key = table_attrs(tab, tname, where)
            except InputError:
                continue
            if region not in regions or tab.uns.get("stmorph_table"):
                continue
            rows = tab.obs[tab.obs[region_key].astype(str) == region]
            pos = pd.Index(rows.index.astype(str)).get_indexer(adata.obs_names.astype(str))
            if (pos >= 0).all():
                ids, name = rows[instance_key].to_numpy()[pos], instance_key
                break
        if ids is None:
            msg = (f"cannot tell which shape of {region!r} each spot is: the AnnData was not read from this store "
                   "and no table annotating the shapes has the same barcodes.")
            raise InputError(msg, where)
    index = sdata.shapes[region].index
    missing = ~pd.Index(ids).isin(index)
    if missing.any():
        msg = f"{int(missing.sum())} spots name no shape of {region!r} (e.g. {ids[missing][:3].tolist()})."
        raise InputError(msg, where)
    return ids, name


def _results_table(adata, keys: Sequence[str], obsm_keys: Sequence[str], region: str, instance_key: str,
                   ids: np.ndarray, with_counts: bool):
    import anndata as ad
    import scipy.sparse as sp
    from spatialdata.models import TableModel

    from . import __version__
    from .pl._colors import domain_colors

    obs = pd.DataFrame(index=adata.obs_names.astype(str))
    if with_counts:  # a new store: the section's own columns (array positions, annotation ...) too
        obs = adata.obs.copy()
        obs.index = obs.index.astype(str)
    for k in keys:
        obs[k] = pd.Categorical(adata.obs[k].astype(str).to_numpy(), categories=[str(c) for c in (
            adata.obs[k].cat.categories if isinstance(adata.obs[k].dtype, pd.CategoricalDtype)
            else sorted(adata.obs[k].astype(str).unique()))])
    obs[_REGION] = pd.Categorical([region] * adata.n_obs)
    obs[instance_key] = ids
    X = adata.X if with_counts else sp.csr_matrix((adata.n_obs, 0), dtype=np.float32)
    table = ad.AnnData(X=X, obs=obs, var=adata.var.copy() if with_counts else None)
    for k in obsm_keys:
        table.obsm[k] = np.asarray(adata.obsm[k], dtype=np.float32)
    colors = domain_colors(adata, keys)  # matched between methods, as in spatial_domains.png
    for k in keys:
        table.uns[f"{k}_colors"] = np.asarray([colors[k].get(c, "#d3d3d3") for c in obs[k].cat.categories],
                                              dtype=object)
    table.uns["stmorph_table"] = {"stmorph_version": __version__, "domains": list(keys), "embeddings": list(obsm_keys)}
    return TableModel.parse(table, region=region, region_key=_REGION, instance_key=instance_key)


def _write_new(sdata, path: Path) -> None:
    """Write ``sdata`` as the new store ``path``: under a temporary name beside it, then renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sdata.write(tmp / "store.zarr")
        if path.exists():
            raise OutputExistsError(f"{path} appeared while writing; nothing was replaced.")
        os.replace(tmp / "store.zarr", path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _source(adata):
    """``(sdata, store, region)`` of the store ``adata`` was read from, or None when it is gone or changed."""
    from .read._spatialdata import open_sdata

    origin = _origin(adata)
    store, region = origin.get("store"), origin.get("region")
    if not store or store == "None" or not region or not Path(store).is_dir():
        return None
    try:
        sdata, store = open_sdata(store)
    except InputError:
        return None
    return (sdata, store, region) if region in sdata.shapes else None


def _result_images(adata, sdata, region: str) -> dict:
    """The images of ``sdata`` placed with the shapes ``region``, each up to RESULT_IMAGE_MAX_BYTES; when
    none is that small, the section's ``hires`` image placed through the transformations of the image
    stmorph read."""
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Scale, Sequence, get_transformation

    from .read._spatialdata import _image_size

    shapes_cs = set(get_transformation(sdata.shapes[region], get_all=True))
    linked = {n: im for n, im in sdata.images.items() if shapes_cs & set(get_transformation(im, get_all=True))}
    images = {n: im for n, im in linked.items() if _image_size(im)[2] <= RESULT_IMAGE_MAX_BYTES}
    lib = _spatial.library(adata)
    source = _origin(adata).get("image")
    hires = (lib.get("images") or {}).get("hires")
    scalef = (lib.get("scalefactors") or {}).get("tissue_hires_scalef")
    if images or source not in linked or hires is None or not scalef:
        return images
    to_full = Scale([1.0 / scalef, 1.0 / scalef], axes=("y", "x"))
    ts = {cs: Sequence([to_full, t]) for cs, t in get_transformation(linked[source], get_all=True).items()}
    name = f"{region}_stmorph_hires_image"
    return {name: Image2DModel.parse(_rgb_chw(hires), dims=("c", "y", "x"), c_coords=["r", "g", "b"],
                                     transformations=ts)}


def _rgb_chw(img) -> np.ndarray:
    arr = np.asarray(img)
    arr = np.repeat(arr[:, :, None], 3, axis=2) if arr.ndim == 2 else arr[:, :, :3]
    if arr.dtype != np.uint8:
        arr = np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    return np.transpose(arr, (2, 0, 1))


def _new_store(adata, path: Path, keys, obsm_keys, table_name: str, region: str | None):
    """A new SpatialData store for ``adata``: the shapes and small images of the store it was read from (else
    spot circles and the hires image), counts + results in one table."""
    import geopandas as gpd
    from shapely.geometry import Point
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel, ShapesModel
    from spatialdata.transformations import Identity, Scale

    from ._outputs import _check_creatable

    _check_creatable(path)
    source = _source(adata)
    if source is not None and region in (None, source[2]):
        src, store, region = source
        ids, instance_key = _instances(adata, src, region, store)
        table = _results_table(adata, keys, obsm_keys, region, instance_key, ids, with_counts=True)
        sdata = SpatialData(images=_result_images(adata, src, region), shapes={region: src.shapes[region]},
                            tables={table_name: table})
        _write_new(sdata, path)
        return sdata
    lib_id = _spatial.library_id(adata)
    lib = _spatial.library(adata)
    region = region or str(lib_id)
    xy = _spatial.coordinates(adata)
    radius = _spatial.spot_diameter_fullres(adata) / 2.0
    ids = np.arange(adata.n_obs)
    gdf = gpd.GeoDataFrame({"radius": np.full(adata.n_obs, radius)}, geometry=[Point(x, y) for x, y in xy],
                           index=pd.Index(ids, name=_INSTANCE))
    shapes = {region: ShapesModel.parse(gdf, transformations={"global": Identity()})}
    images = {}
    hires = (lib.get("images") or {}).get("hires")
    scalef = (lib.get("scalefactors") or {}).get("tissue_hires_scalef")
    if hires is not None and scalef:
        images[f"{region}_hires_image"] = Image2DModel.parse(
            _rgb_chw(hires), dims=("c", "y", "x"), c_coords=["r", "g", "b"],
            transformations={"global": Scale([1.0 / scalef, 1.0 / scalef], axes=("y", "x"))})
    table = _results_table(adata, keys, obsm_keys, region, _INSTANCE, ids, with_counts=True)
    sdata = SpatialData(images=images, shapes=shapes, tables={table_name: table})
    _write_new(sdata, path)
    return sdata


def _zarr_format(store: Path) -> int:
    return 2 if (store / ".zgroup").is_file() and not (store / "zarr.json").is_file() else 3


def _write_table(sdata, store: Path, table_name: str) -> None:
    """Write ``sdata.tables[table_name]`` into ``store`` so that a failure never loses the table it replaces.

    The table is written as the only element of a store in a temporary folder beside ``store`` (same zarr
    format), then its folder is swapped into ``store/tables/`` (:func:`stmorph._outputs.swap_into_place`:
    the old table moved aside, the new one renamed in, the old one removed). When the folder holding
    ``store`` cannot take it (not writable, or another file system) it is a hidden folder in ``store``.
    """
    import zarr
    from spatialdata import SpatialData

    from ._outputs import clean_stale, staging_dir, swap_into_place

    beside = store.parent
    try:
        if not os.access(beside, os.W_OK | os.X_OK) or os.stat(beside).st_dev != os.stat(store).st_dev:
            beside = store
        clean_stale(beside / store.name)  # staging folders of killed runs
        stage = staging_dir(beside / store.name)
    except OSError as exc:
        raise OutputError(f"cannot write into {store}: {exc.strerror or exc}.") from None
    try:
        staged = stage / "table.zarr"
        zarr.open_group(staged, mode="w", zarr_format=_zarr_format(store))
        one = SpatialData(tables={table_name: sdata.tables[table_name]})
        one.path = staged
        one.write_element(table_name)
        zarr.open_group(store, mode="r+", use_consolidated=False).require_group("tables")
        swap_into_place(staged / "tables" / table_name, store / "tables" / table_name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    if sdata.has_consolidated_metadata():
        sdata.write_consolidated_metadata()


def write_spatialdata(adata, sdata_or_path, *, keys: Sequence[str] | None = None,
                      obsm_keys: Sequence[str] | None = None, table_name: str = "stmorph", region: str | None = None,
                      force: bool = False):
    """Put stmorph's domains and embeddings into a SpatialData object or store, for napari-spatialdata.

    Parameters
    ----------
    adata
        A section with results (``obs[<method>]``), read by :func:`stmorph.read.spatialdata` (its spots then
        keep their shape ids) or by any reader whose barcodes match a table of the store.
    sdata_or_path
        A ``SpatialData`` object (the table is added to it, and written into its store when it has one), the
        path of an existing ``.zarr`` store (only the new table is written into it), or a path that does
        not exist (a new store: the shapes and the images up to :data:`RESULT_IMAGE_MAX_BYTES` of the store
        ``adata`` was read from, else spot circles and the ``hires`` image; one table with counts and results).
    keys
        ``obs`` columns to write (default: every method's domains present).
    obsm_keys
        Embeddings to write (default: those of :data:`EMBEDDINGS` present).
    table_name
        Name of the new table.
    region
        The shapes element the table annotates; default: the one the AnnData was read from (new store:
        the library id).
    force
        Replace a table of that name that stmorph wrote earlier (never one it did not write). The new table
        is complete on disk before the old one is moved aside, so a failed write leaves the old one.

    Returns
    -------
    The ``SpatialData`` object holding the new table.

    Sets the following fields (of the new table ``sdata.tables[table_name]``):

    ``obs[<key>]``
        Domains, categorical, with colours in ``uns[f"{key}_colors"]``.
    ``obs["region"]``, ``obs[<instance key>]``
        The shapes element and each spot's shape index (``uns["spatialdata_attrs"]``).
    ``obsm[<embedding>]``
        Embeddings.
    ``uns["stmorph_table"]``
        The stmorph version and what was written.
    """
    from .read._spatialdata import import_spatialdata, open_sdata

    sd = import_spatialdata()
    keys = list(keys) if keys is not None else _domain_keys(adata)
    for k in keys:
        if k not in adata.obs:
            raise InputError(f"adata.obs[{k!r}] is missing (have {list(adata.obs)}).")
    if not keys:
        raise InputError("adata holds no domains to write (run stmorph.tl.stmorph or another method first).")
    obsm_keys = list(obsm_keys) if obsm_keys is not None else [k for k in EMBEDDINGS if k in adata.obsm]
    for k in obsm_keys:
        if k not in adata.obsm:
            raise InputError(f"adata.obsm[{k!r}] is missing (have {list(adata.obsm)}).")
    if not isinstance(sdata_or_path, sd.SpatialData):
        path = Path(sdata_or_path).expanduser()
        if not path.exists() and not path.is_symlink():
            return _new_store(adata, path, keys, obsm_keys, table_name, region)
    sdata, store = open_sdata(sdata_or_path)
    where = store if store is not None else "SpatialData"
    region = region or _origin(adata).get("region")
    if region is None:
        if len(sdata.shapes) != 1:
            msg = f"pass region= (the shapes element to annotate); the store has {list(sdata.shapes)}."
            raise InputError(msg, where)
        region = next(iter(sdata.shapes))
    if region not in sdata.shapes:
        msg = f"no shapes element {region!r}; the store has {list(sdata.shapes) or 'none'}."
        raise InputError(msg, where)
    if table_name in sdata.tables:
        if not force:
            msg = f"already has a table {table_name!r}; pass another table_name or force=True (stmorph's own only)."
            raise OutputExistsError(f"{where}: {msg}")
        if not sdata.tables[table_name].uns.get("stmorph_table"):
            msg = f"table {table_name!r} was not written by stmorph; it is never replaced. Pass another table_name."
            raise OutputExistsError(f"{where}: {msg}")
    for k in (_REGION,):
        if k in keys:
            raise InputError(f"a domain column cannot be named {k!r} (the table's region column).")
    ids, instance_key = _instances(adata, sdata, region, where)
    table = _results_table(adata, keys, obsm_keys, region, instance_key, ids, with_counts=False)
    previous = sdata.tables.get(table_name)
    sdata.tables[table_name] = table
    if store is not None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _write_table(sdata, store, table_name)  # an earlier table of stmorph's (checked above) is kept
        except BaseException:                           # until the new one is complete
            if previous is None:
                del sdata.tables[table_name]
            else:
                sdata.tables[table_name] = previous
            raise
    return sdata
