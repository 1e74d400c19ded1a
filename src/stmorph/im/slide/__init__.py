"""Lazy access to the full-resolution H&E image of a section.

:func:`open_slide` returns a :class:`Slide` that reads only what a caller asks
for. Each file format is read by a *backend*, one module each, registered in
:data:`BACKENDS` (see :func:`register_backend`; adding a format touches one
file):

- ``openslide`` (:mod:`._openslide`, optional extra ``stmorph[openslide]``):
  vendor whole-slide formats ``.svs .ndpi .mrxs .scn .bif .vms .vmu .svslide``,
  lazily and pyramid-aware. Without OpenSlide, the TIFF-based ones fall back to
  ``tiff``; the others raise :class:`~stmorph.errors.DependencyError`.
- ``tiff`` (:mod:`._tiff`, tifffile): every other TIFF / BigTIFF (plain,
  OME-TIFF, SVS-like), tile by tile through a byte-bounded cache; the default
  for TIFF.
- ``ome_zarr`` (:mod:`._ome_zarr`): a *folder* holding an OME-NGFF multiscale image, e.g. the
  image ``store.zarr/images/<name>`` of a SpatialData store, lazily and pyramid-aware.
- ``pil`` (:mod:`._pil`): JPEG / PNG and other formats Pillow reads, decoded
  whole on first use.
- ``array`` (:mod:`._array`): numpy arrays ``(h, w)``, ``(h, w, 1|2|3|4)``.

Every read returns **uint8 RGB** ``(h, w, 3)``:

- grayscale (and gray + alpha) is replicated to three channels;
- alpha (RGBA, gray + alpha) is composited on the slide's background colour
  :attr:`Slide.background` (OpenSlide's ``openslide.background-color``, else
  white: the glass of a brightfield slide), so fully transparent pixels are glass
  and opaque pixels keep their colour;
- ``read_region(..., fill="glass")`` (what image features read, :mod:`._fill`)
  also paints pure-black fill (all channels <= 16) and the area outside the image
  with that colour;
- 16-bit (and 32-bit unsigned) data is scaled by the range of its type,
  ``v * 255 / (2**bits - 1)``, where ``bits`` is the TIFF ``BitsPerSample``
  (e.g. 12 for 12-bit data stored in uint16) or the dtype's width; this keeps the
  intensities of every tile consistent, which a per-tile data range would not;
- palette TIFFs go through their colour map, ``MinIsWhite`` is inverted;
- floating-point arrays in ``[0, 1]`` are scaled by 255, those in ``[0, 255]``
  are rounded; floating-point TIFFs, signed integers, CMYK and more than four
  samples raise :class:`~stmorph.errors.ImageError`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ... import _spatial
from ...errors import DependencyError, ImageError, InputError
from . import _ome_zarr, _openslide, _pil, _tiff
from ._array import open_array
from ._base import DEFAULT_CACHE_BYTES, MAX_PIL_PIXELS, Slide

__all__ = ["Slide", "open_slide", "slide_for", "SlideBackend", "register_backend", "BACKENDS", "MAX_PIL_PIXELS",
           "DEFAULT_CACHE_BYTES"]


@dataclass(frozen=True)
class SlideBackend:
    """How one file format is opened.

    Attributes
    ----------
    name
        What ``open_slide(path, backend=name)`` selects.
    open
        ``open(path, cache_bytes) -> Slide``.
    suffixes
        File suffixes (lower case, with the dot) the backend claims before any content sniffing.
    sniff
        ``sniff(first_8_bytes) -> bool``: claims a file by its header; None claims nothing this way.
    available
        ``available() -> bool``: whether its optional dependency imports; a backend that is not
        available gives way to the next one that claims the file.
    folder
        ``folder(path) -> bool``: claims a folder (an image stored as many files, e.g. OME-Zarr);
        None claims no folder.
    """

    name: str
    open: Callable[[str, int], Slide]
    suffixes: tuple[str, ...] = ()
    sniff: Callable[[bytes], bool] | None = None
    available: Callable[[], bool] = field(default=lambda: True)
    folder: Callable[[str], bool] | None = None


#: Registered backends, in the order they are asked to claim a file.
BACKENDS: list[SlideBackend] = []


def register_backend(backend: SlideBackend, *, first: bool = False) -> None:
    """Add (or replace, by name) a backend; ``first`` puts it before the others."""
    BACKENDS[:] = [b for b in BACKENDS if b.name != backend.name]
    BACKENDS.insert(0, backend) if first else BACKENDS.append(backend)


register_backend(SlideBackend("openslide", _openslide.open_openslide, suffixes=_openslide.SUFFIXES,
                              available=_openslide.available))
register_backend(SlideBackend("tiff", _tiff.open_tiff, sniff=_tiff.is_tiff))
register_backend(SlideBackend("ome_zarr", _ome_zarr.open_ome_zarr, folder=_ome_zarr.claims_folder))
register_backend(SlideBackend("pil", _pil.open_pil, sniff=lambda magic: True))


def _choose_backend(path: str, magic: bytes, name: str | None) -> SlideBackend:
    if name is not None:
        for b in BACKENDS:
            if b.name == name:
                return b
        msg = f"unknown slide backend {name!r}; expected one of {', '.join(b.name for b in BACKENDS)}."
        raise InputError(msg, path)
    suffix = Path(path).suffix.lower()
    missing = None
    for b in BACKENDS:
        if suffix in b.suffixes:
            if b.available():
                return b
            missing = missing or b
    for b in BACKENDS:
        if b.sniff is not None and b.sniff(magic) and (missing is None or b.name != "pil"):
            return b
    # a vendor format whose backend is not installed, and no other backend reads its bytes
    return missing


def _sniff(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(8)
    except IsADirectoryError as e:
        msg = "is a folder, not an image file."
        raise ImageError(msg, path) from e
    except OSError as e:
        msg = f"cannot open image file: {e.strerror or e}"
        raise ImageError(msg, path) from e


def open_slide(source: str | os.PathLike | np.ndarray, *, level: int = 0,
               cache_bytes: int = DEFAULT_CACHE_BYTES, backend: str | None = None) -> Slide:
    """Open a whole-slide image lazily.

    Parameters
    ----------
    source
        Path of a TIFF/BigTIFF (tiled or stripped, pyramidal or not), JPEG or PNG
        file, a vendor whole-slide file (``.svs .ndpi .mrxs .scn .bif .vms .vmu
        .svslide``, through OpenSlide when installed), a folder holding an OME-NGFF multiscale
        image (``store.zarr/images/<name>`` of a SpatialData store), or an image array ``(h, w[, c])``.
    level
        Pyramid level to treat as level 0 (full resolution) of the returned
        slide; spot coordinates must then be in that level's pixels. Default 0.
    cache_bytes
        Byte budget of the decoded-tile cache (TIFF and OpenSlide).
    backend
        Force a backend by name (``"tiff"``, ``"pil"``, ``"openslide"``, ...), e.g.
        ``"openslide"`` for a TIFF; default: chosen by suffix, then by the file's first bytes.

    Returns
    -------
    A :class:`Slide`; use it as a context manager or call ``close()``.

    Raises
    ------
    ImageError
        The file is missing, not an image, truncated, or has an unsupported layout.
    DependencyError
        The file needs OpenSlide (a vendor format that is not TIFF-based, or ``backend="openslide"``)
        and it cannot be imported.
    """
    if isinstance(source, Slide):
        return source
    if isinstance(source, np.ndarray):
        if backend not in (None, "array"):
            msg = f"an in-memory image is read by the array backend, not {backend!r}."
            raise InputError(msg)
        return open_array(source, level)
    if not isinstance(source, (str, os.PathLike)):
        msg = f"image must be a path or a numpy array, got {type(source).__name__}."
        raise InputError(msg)
    path = os.fspath(source)
    if not os.path.exists(path):
        msg = "image file not found."
        raise ImageError(msg, path)
    if os.path.isdir(path):  # an image stored as a folder (OME-Zarr); otherwise _sniff says it is a folder
        chosen = next((b for b in BACKENDS if b.folder is not None and (
            b.name == backend if backend else b.folder(path))), None)
        if chosen is not None:
            return _at_level(chosen.open(path, cache_bytes), level, path)
    magic = _sniff(path)
    if len(magic) == 0:
        msg = "image file is empty."
        raise ImageError(msg, path)
    chosen = _choose_backend(path, magic, backend)
    if not chosen.available():
        if chosen.name == "openslide":
            _openslide._module(path)  # raises DependencyError naming the file
        msg = f"{path}: the {chosen.name!r} slide backend is not available here."
        raise DependencyError(msg)
    return _at_level(chosen.open(path, cache_bytes), level, path)


def _at_level(slide: Slide, level: int, path: str) -> Slide:
    """``slide`` with pyramid level ``level`` as its level 0."""
    if level:
        if not 0 <= level < slide.n_levels:
            n = slide.n_levels
            slide.close()
            msg = f"level {level} does not exist; the image has {n} level(s)."
            raise InputError(msg, path)
        for lv in slide._levels[:level]:
            lv.close()
        slide._levels = slide._levels[level:]
        slide._base_level = level
    return slide


# --------------------------------------------------------------------------- AnnData helpers
def slide_for(adata, *, image=None, library_id: str | None = None) -> Slide:
    """The full-resolution slide of an AnnData.

    Resolution order: the explicit ``image`` (path, array or Slide);
    ``uns["spatial"][library_id]["metadata"]["source_image_path"]``;
    ``uns["spatial"][library_id]["images"]["fullres"]`` (in-memory data).
    """
    if image is not None:
        return open_slide(image)
    lib_id = _spatial.library_id(adata, library_id)
    lib = adata.uns["spatial"][lib_id]
    src = _spatial.source_image_path(adata, lib_id)
    fullres = lib.get("images", {}).get("fullres")
    if src:
        if Path(src).exists() or fullres is None:
            return open_slide(src)
    if fullres is not None:
        return open_slide(np.asarray(fullres))
    msg = (f"no full-resolution image for library {lib_id!r}: pass image=<path to the H&E TIFF/JPEG/PNG>, "
           f"or set adata.uns['spatial'][{lib_id!r}]['metadata']['source_image_path'].")
    raise InputError(msg)
