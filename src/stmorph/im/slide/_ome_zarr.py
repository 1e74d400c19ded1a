"""OME-NGFF multiscale images in a zarr store: the image elements of a SpatialData store.

A SpatialData store keeps each image as a folder ``store.zarr/images/<name>/`` holding an
OME-NGFF ``multiscales`` group (zarr v2 ``.zattrs`` or v3 ``zarr.json``; axes ``c, y, x``, or
``y, x``), one array per pyramid level. This backend claims such a *folder* and reads it lazily
with zarr: a region decodes only the chunks it touches, and every stored scale is a level of the
slide (so thumbnails and coarse reads use the stored downsampled data). It needs only ``zarr``
(a dependency of anndata), not spatialdata itself.
"""

from __future__ import annotations

import json
import os
import threading

import numpy as np

from ...errors import ImageError
from ._base import DECODE_CHECK_FLOOR, Slide, _Level, _ToRGB8


def _attributes(folder: str) -> dict | None:
    """The group attributes of a zarr folder (v3 ``zarr.json`` or v2 ``.zattrs``), or None."""
    for name, v3 in (("zarr.json", True), (".zattrs", False)):
        p = os.path.join(folder, name)
        if os.path.isfile(p):
            try:
                with open(p, encoding="utf-8") as fh:
                    obj = json.load(fh)
            except (OSError, ValueError):
                return None
            if not isinstance(obj, dict):
                return None
            return obj.get("attributes", {}) if v3 else obj
    return None


def _multiscales(attrs: dict) -> dict | None:
    ms = (attrs.get("ome") or {}).get("multiscales") or attrs.get("multiscales")
    return ms[0] if isinstance(ms, list) and ms and isinstance(ms[0], dict) else None


def claims_folder(path: str) -> bool:
    """Whether ``path`` is a folder holding an OME-NGFF multiscale image."""
    attrs = _attributes(path)
    return attrs is not None and _multiscales(attrs) is not None


class _ZarrArrayLevel(_Level):
    """One scale: a zarr array with named axes, read as (y, x, c)."""

    def __init__(self, array, axes: list[str], convert: _ToRGB8, lock: threading.Lock):
        self.z, self.axes, self.convert, self.lock = array, axes, convert, lock
        shape = dict(zip(axes, array.shape))
        self.height, self.width = int(shape["y"]), int(shape["x"])
        chunks = dict(zip(axes, array.chunks))
        self.tile = (int(chunks["y"]), int(chunks["x"]))
        self.path = None
        chunk_px = self.tile[0] * self.tile[1]
        self._decode_need = (2 * int(np.prod(array.chunks)) * np.dtype(array.dtype).itemsize
                             + chunk_px * convert.work_bytes_per_px())

    def decode_bytes(self) -> tuple[int, str]:
        th, tw = self.tile
        return self._decode_need, f"one {tw} x {th} px chunk of this {self.width} x {self.height} px zarr image"

    def read(self, y0, y1, x0, x1, cache=True):
        if self._decode_need > DECODE_CHECK_FLOOR:
            self.check_decode(self.path)
        sel = tuple(slice(y0, y1) if a == "y" else slice(x0, x1) if a == "x" else slice(None) if a == "c" else 0
                    for a in self.axes)
        with self.lock:
            a = np.asarray(self.z[sel])
        kept = [a_ for a_ in self.axes if a_ in ("y", "x", "c")]
        order = [kept.index("y"), kept.index("x")] + ([kept.index("c")] if "c" in kept else [])
        return self.convert(np.transpose(a, order))

    def close(self):
        self.z = None


def open_ome_zarr(path: str, cache_bytes: int) -> Slide:
    import zarr

    attrs = _attributes(path)
    ms = _multiscales(attrs or {})
    if ms is None:
        msg = "not an OME-NGFF multiscale image (no 'multiscales' in its zarr attributes)."
        raise ImageError(msg, path)
    axes = [a["name"] if isinstance(a, dict) else str(a) for a in ms.get("axes", [])] or ["c", "y", "x"]
    if "y" not in axes or "x" not in axes:
        msg = f"image axes {axes} lack 'y' and 'x'."
        raise ImageError(msg, path)
    datasets = [d.get("path") for d in ms.get("datasets", []) if isinstance(d, dict)]
    if not datasets:
        msg = "the multiscale image lists no scale."
        raise ImageError(msg, path)
    try:
        group = zarr.open_group(path, mode="r")
        arrays = [group[d] for d in datasets]
    except Exception as e:  # noqa: BLE001 - any zarr failure on a damaged store
        msg = f"cannot open the zarr arrays of this image: {type(e).__name__}: {e}"
        raise ImageError(msg, path) from e
    first = arrays[0]
    if len(first.shape) != len(axes):
        msg = f"scale {datasets[0]!r} has {len(first.shape)} dimensions for the axes {axes}."
        raise ImageError(msg, path)
    samples = int(dict(zip(axes, first.shape)).get("c", 1))
    float_scale = 255.0 if np.dtype(first.dtype).kind == "f" else None  # float images: [0, 1] by convention
    convert = _ToRGB8(first.dtype, samples, float_scale=float_scale, path=path)
    lock = threading.Lock()
    slide = Slide([], path=path, dtype=first.dtype, fmt="OME-Zarr", cache_bytes=cache_bytes, backend="ome_zarr")
    slide._levels = [_ZarrArrayLevel(a, axes, convert, lock) for a in arrays]
    for lv in slide._levels:
        lv.path = path
    if slide.width < 1 or slide.height < 1:
        msg = "the image is empty."
        raise ImageError(msg, path)
    return slide
