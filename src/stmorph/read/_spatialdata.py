"""SpatialData in: the table annotating a section's spots (or bins) as stmorph's AnnData.

A SpatialData object (``spatialdata.read_zarr``, or the readers of spatialdata-io: Visium, Visium HD,
...) keeps counts in a *table* whose ``uns["spatialdata_attrs"]`` names the shapes element it
annotates (``region``), the ``obs`` column holding that element's name (``region_key``) and the
``obs`` column holding each row's shape index (``instance_key``). Shapes and images live in their
own pixel grids, tied together by coordinate transformations. :func:`spatialdata` takes the table,
finds each spot's centre and size in its shapes element, and brings them into the full-resolution
pixels of the chosen image through the transformations (both elements into a coordinate system they
share, then out through the inverse of the image's), so ``obsm["spatial"]`` and
``spot_diameter_fullres`` follow stmorph's data model. The image stays on disk: a store's image
element is a folder (``store.zarr/images/<name>``) that :func:`stmorph.im.open_slide` reads lazily.
Needs the optional extra ``stmorph[spatialdata]``.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from .._spatial import SPOT_DIAMETER_UM
from ..errors import DependencyError, InputError
from . import _common as c

__all__ = ["spatialdata", "import_spatialdata"]

_INSTALL = "pip install 'stmorph[spatialdata]'"
#: Largest in-memory image (bytes) kept as ``images["fullres"]`` when the SpatialData object has no store.
MAX_INMEMORY_IMAGE_BYTES = 2**30
#: Bin size in a Visium HD shapes element's name (``..._square_008um``).
_BIN_UM = re.compile(r"_(\d+(?:\.\d+)?)um$")


def import_spatialdata():
    """The ``spatialdata`` module, or DependencyError saying how to install it."""
    try:
        import spatialdata
    except ImportError as exc:
        msg = f"reading or writing SpatialData needs the spatialdata package ({exc}); install it with: {_INSTALL}"
        raise DependencyError(msg) from None
    return spatialdata


def open_sdata(sdata_or_path):
    """``(sdata, store path or None)`` from a SpatialData object or the path of a ``.zarr`` store."""
    sd = import_spatialdata()
    if isinstance(sdata_or_path, sd.SpatialData):
        path = getattr(sdata_or_path, "path", None)
        return sdata_or_path, (Path(path) if path is not None else None)
    p = c.require_dir(sdata_or_path, "SpatialData store")
    if not any((p / n).is_file() for n in ("zarr.json", ".zgroup", ".zattrs")):
        msg = "is not a zarr store (no zarr.json or .zgroup); give the folder written by SpatialData.write."
        raise InputError(msg, p)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sdata = sd.read_zarr(p)
    except Exception as exc:  # noqa: BLE001 - zarr/ome-zarr/anndata raise many types for damaged stores
        msg = f"cannot be read as a SpatialData store ({type(exc).__name__}: {c.first_line(exc)})."
        raise InputError(msg, p) from None
    return sdata, p.resolve()


def table_attrs(table, name: str, where) -> tuple[list[str], str, str]:
    """``(regions, region_key, instance_key)`` of a table that annotates elements."""
    attrs = table.uns.get("spatialdata_attrs") or {}
    region, region_key, instance_key = attrs.get("region"), attrs.get("region_key"), attrs.get("instance_key")
    if region is None or region_key is None or instance_key is None:
        msg = f"table {name!r} annotates no element (its uns['spatialdata_attrs'] lacks region/region_key/instance_key)."
        raise InputError(msg, where)
    regions = [region] if isinstance(region, str) else [str(r) for r in region]
    return regions, str(region_key), str(instance_key)


def _choose_table(sdata, table: str | None, where) -> str:
    names = list(sdata.tables)
    if table is not None:
        if table not in sdata.tables:
            msg = f"no table {table!r}; the store has {names or 'no table'}."
            raise InputError(msg, where)
        return table
    candidates = []
    for n in names:
        attrs = sdata.tables[n].uns.get("spatialdata_attrs") or {}
        region = attrs.get("region")
        regions = [region] if isinstance(region, str) else list(region or [])
        if any(r in sdata.shapes for r in regions):
            candidates.append(n)
    if len(candidates) > 1:  # results stmorph wrote beside the counts are not a section's table
        candidates = [n for n in candidates if not sdata.tables[n].uns.get("stmorph_table")] or candidates
    if len(candidates) != 1:
        what = "no table annotating spot or bin shapes" if not candidates else f"several such tables {candidates}"
        msg = f"{what} (tables: {names or 'none'}); pass table= (on the command line, a store with one such table)."
        raise InputError(msg, where)
    return candidates[0]


def _affine(element, cs: str) -> np.ndarray:
    """The 3 x 3 affine (x, y) from an element's own pixels to coordinate system ``cs``."""
    from spatialdata.transformations import get_transformation

    t = get_transformation(element, to_coordinate_system=cs)
    return np.asarray(t.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")), dtype=np.float64)


def shapes_to_image(sdata, shapes_name: str, image_name: str | None, where) -> tuple[np.ndarray, str | None]:
    """Affine ``M`` (3 x 3) from the shapes' pixels to the image's level-0 pixels, and the coordinate system
    used (None without an image: the shapes' own pixels are then the section's pixels)."""
    from spatialdata.transformations import get_transformation

    if image_name is None:
        return np.eye(3), None
    shapes_cs = list(get_transformation(sdata.shapes[shapes_name], get_all=True))
    image_cs = list(get_transformation(sdata.images[image_name], get_all=True))
    common = [cs for cs in shapes_cs if cs in image_cs]
    if not common:
        msg = (f"the shapes {shapes_name!r} (coordinate systems {shapes_cs}) and the image {image_name!r} "
               f"({image_cs}) share no coordinate system; SpatialData cannot place one on the other.")
        raise InputError(msg, where)
    cs = "global" if "global" in common else common[0]
    M = np.linalg.inv(_affine(sdata.images[image_name], cs)) @ _affine(sdata.shapes[shapes_name], cs)
    return M, cs


def _image_size(element) -> tuple[int, int, int]:
    """``(height, width, bytes)`` of an image element's full-resolution level."""
    arr = _level0(element)
    dims = dict(zip(arr.dims, arr.shape))
    return int(dims["y"]), int(dims["x"]), int(np.prod(arr.shape)) * arr.dtype.itemsize


def _level0(element):
    """The full-resolution DataArray of an image element (single- or multi-scale)."""
    import xarray as xr

    if isinstance(element, xr.DataArray):
        return element
    first = next(iter(element.children.values()))  # a DataTree of scales, scale0 first
    return next(iter(first.ds.data_vars.values()))


def _choose_image(sdata, shapes_name: str, image: str | None, where) -> str | None:
    from spatialdata.transformations import get_transformation

    names = list(sdata.images)
    if image is not None:
        if image not in sdata.images:
            msg = f"no image {image!r}; the store has {names or 'no image'}."
            raise InputError(msg, where)
        return image
    shapes_cs = set(get_transformation(sdata.shapes[shapes_name], get_all=True))
    linked = [n for n in names if shapes_cs & set(get_transformation(sdata.images[n], get_all=True))]
    if not linked:
        return None
    return max(linked, key=lambda n: _image_size(sdata.images[n])[:2])  # the full-resolution one


def _centres_and_sizes(gdf, where, name: str) -> tuple[np.ndarray, np.ndarray, str]:
    """Centres ``(n, 2)`` (x, y), diameters ``(n,)`` in the shapes' pixels, and the kind of shape."""
    geom = gdf.geometry
    kinds = set(geom.geom_type.unique())
    if kinds <= {"Point"}:
        if "radius" not in gdf.columns:
            msg = f"shapes {name!r} are points without a 'radius' column; stmorph needs spot circles or bin polygons."
            raise InputError(msg, where)
        xy = np.column_stack([geom.x.to_numpy(), geom.y.to_numpy()])
        return xy, 2.0 * np.asarray(gdf["radius"], dtype=np.float64), "circle"
    if kinds <= {"Polygon", "MultiPolygon"}:
        cen = geom.centroid
        xy = np.column_stack([cen.x.to_numpy(), cen.y.to_numpy()])
        return xy, np.sqrt(np.asarray(geom.area, dtype=np.float64)), "polygon"
    msg = f"shapes {name!r} hold {sorted(kinds)}; stmorph reads spot circles or bin polygons."
    raise InputError(msg, where)


def _hires_lowres(slide) -> tuple[dict, dict]:
    images, sf = {}, {}
    for key, side in (("hires", c.HIRES_MAX_SIDE), ("lowres", c.LOWRES_MAX_SIDE)):
        img, scale = c.downsample(slide, side)
        images[key], sf[f"tissue_{key}_scalef"] = img, float(scale)
    return images, sf


def spatialdata(sdata_or_path, table: str | None = None, image: str | None = None, *,
                spot_diameter_um: float | None = None, microns_per_pixel: float | None = None):
    """Read the spots (or bins) of one section of a SpatialData object as stmorph's AnnData.

    Parameters
    ----------
    sdata_or_path
        A ``spatialdata.SpatialData`` or the path of its ``.zarr`` store.
    table
        Name of the table with the counts; default: the only table annotating a shapes element.
    image
        Name of the image element giving the section's pixels (the H&E); default: the largest image
        sharing a coordinate system with the shapes (the full-resolution one when the store has it).
    spot_diameter_um
        Physical diameter of a spot (side of a bin); default 55 um for circles (Visium), the bin size in the
        shapes' name for polygons (``..._square_008um``: 8 um, as spatialdata-io names Visium HD bins).
    microns_per_pixel
        Size of one pixel of the image; default: from the spot size in micrometres and in pixels.

    Returns
    -------
    AnnData in stmorph's data model: raw counts in ``X``, ``obsm["spatial"]`` (spot centres in the
    image's level-0 pixels), ``uns["spatial"][<region>]`` with ``spot_diameter_fullres`` from the circle
    radius (or polygon area), ``hires``/``lowres`` images made from the image, and
    ``metadata["source_image_path"]`` pointing at the image element's folder in the store (read lazily);
    ``metadata["spatialdata"]`` records the store, table, region, keys, image and coordinate system, and
    ``obs`` keeps the table's columns (its region and instance keys among them), so
    :func:`stmorph.write_spatialdata` can put results back on the same shapes.

    Raises
    ------
    stmorph.InputError
        Not a SpatialData store, no suitable table, shapes or image, spots missing from the shapes.
    stmorph.DependencyError
        spatialdata is not installed.
    """
    import scipy.sparse as sp

    sdata, store = open_sdata(sdata_or_path)
    where = store if store is not None else "SpatialData"
    tname = _choose_table(sdata, table, where)
    tab = sdata.tables[tname]
    regions, region_key, instance_key = table_attrs(tab, tname, where)
    shapes_regions = [r for r in regions if r in sdata.shapes]
    if len(shapes_regions) != 1:
        msg = (f"table {tname!r} annotates {regions}; stmorph reads one section: one shapes element "
               f"(subset the table to one region first).")
        raise InputError(msg, where)
    region = shapes_regions[0]
    if region_key not in tab.obs or instance_key not in tab.obs:
        msg = f"table {tname!r} lacks its region_key {region_key!r} or instance_key {instance_key!r} column."
        raise InputError(msg, where)
    rows = np.flatnonzero((tab.obs[region_key].astype(str) == region).to_numpy())
    if rows.size == 0:
        msg = f"table {tname!r} has no row annotating {region!r}."
        raise InputError(msg, where)
    tab = tab[rows]
    gdf = sdata.shapes[region]
    xy_s, diam_s, kind = _centres_and_sizes(gdf, where, region)
    pos = pd.Index(gdf.index).get_indexer(pd.Index(tab.obs[instance_key].to_numpy()))
    if (pos < 0).any():
        missing = tab.obs[instance_key].to_numpy()[pos < 0]
        msg = f"{int((pos < 0).sum())} table rows name shapes that {region!r} lacks: {c.examples(missing)}."
        raise InputError(msg, where)
    image_name = _choose_image(sdata, region, image, where)
    M, cs = shapes_to_image(sdata, region, image_name, where)
    xy = (np.column_stack([xy_s[pos], np.ones(pos.size)]) @ M.T)[:, :2]
    scale = float(np.sqrt(abs(np.linalg.det(M[:2, :2]))))
    diameter = float(np.median(diam_s[pos])) * scale
    if not np.isfinite(diameter) or diameter <= 0:
        msg = f"shapes {region!r} have no positive size (radius or area); cannot size spot patches."
        raise InputError(msg, where)

    technology = "visium" if kind == "circle" else "visium_hd"
    if spot_diameter_um is None:
        found = _BIN_UM.search(region)
        if kind == "circle":
            spot_diameter_um = SPOT_DIAMETER_UM["visium"]
        elif found:
            spot_diameter_um = float(found.group(1))
        elif microns_per_pixel is None:
            msg = (f"cannot tell the physical size of the bins of {region!r}: pass spot_diameter_um= "
                   "or microns_per_pixel=.")
            raise InputError(msg, where)
    metadata = {"technology": technology}
    if microns_per_pixel is not None:
        metadata["microns_per_pixel"] = float(microns_per_pixel)
        if spot_diameter_um is None:
            spot_diameter_um = diameter * float(microns_per_pixel)
    metadata["spot_diameter_um"] = float(spot_diameter_um)

    X = tab.layers["counts"] if "counts" in tab.layers else tab.X
    X = sp.csr_matrix(X)
    obs = tab.obs.copy()
    obs.index = c.make_unique([str(v) for v in tab.obs_names])
    for col in ("in_tissue", "array_row", "array_col"):
        if col in obs:
            obs[col] = pd.to_numeric(obs[col], errors="coerce").fillna(-1).astype(int)
    if "in_tissue" not in obs:
        obs["in_tissue"] = 1
    var = tab.var.copy()
    var.index = c.make_unique([str(v) for v in tab.var_names])
    images, sf = {}, {"spot_diameter_fullres": diameter}
    if image_name is not None:
        element = sdata.images[image_name]
        folder = store / "images" / image_name if store is not None else None
        if folder is not None and folder.is_dir():
            metadata["source_image_path"] = str(folder)
            from ..im.slide import open_slide

            with open_slide(folder) as slide:
                images, more = _hires_lowres(slide)
                c.check_spots_in_image(xy, obs.index, slide.width, slide.height, folder,
                                       hint="do the shapes and the image share a coordinate system?")
        else:
            h, w, nbytes = _image_size(element)
            if nbytes > MAX_INMEMORY_IMAGE_BYTES:
                warnings.warn(f"image {image_name!r} ({w} x {h}) lives only in memory and is too large to copy; "
                              "write the SpatialData object to a .zarr store and read that to use the H&E.",
                              stacklevel=2)
                image_name = None
            else:
                arr = np.asarray(_level0(element).transpose("y", "x", ...).values)
                images["fullres"] = arr
                from ..im.slide import open_slide

                with open_slide(arr) as slide:
                    small, more = _hires_lowres(slide)
                images.update(small)
        if image_name is not None:
            sf.update(more)
    metadata["spatialdata"] = {"store": str(store) if store is not None else None, "table": tname,
                               "region": region, "region_key": region_key, "instance_key": instance_key,
                               "image": image_name, "coordinate_system": cs}
    adata = c.build_anndata(X, obs, var, xy, library_id=region, images=images, scalefactors=sf, metadata=metadata)
    return c.check_counts(adata, store if store is not None else Path(str(region)), "table " + repr(tname))
