"""Spot-centred square patches from a whole-slide image.

A patch of side ``size`` (full-resolution pixels) around a spot centre
``(x, y)`` (x = column, y = row, as in ``obsm["spatial"]``) covers the
``size`` columns whose pixel centres lie in ``[x - size / 2, x + size / 2)``,
i.e. ``x0 .. x0 + size - 1`` with ``x0 = ceil(x - size / 2)``, and likewise
rows. Pixel ``i`` has its centre at coordinate ``i`` (the numpy / scikit-image /
``imshow`` convention scanpy plots spots with), so for an odd ``size`` the
centre pixel of the patch is the pixel containing the spot centre. Pixels outside the image are filled with ``fill`` (white by default;
``fill="glass"``, what :func:`stmorph.im.features` reads, paints them and the image's black fill with the
slide's background colour, see :mod:`stmorph.im.slide._fill`) and
the fraction of the patch lying inside the image is reported per spot, so
border spots are padded and flagged, never silently shifted; a spot whose patch
lies entirely outside the image gets ``inside == 0``.

:func:`iter_patches` visits spots band by band along the image's tile rows
(sorted by tile row of the patch's top edge, then by x), so each tile of a tiled
TIFF is decoded once and only a couple of tile rows are cached at a time: memory
stays bounded whatever the slide size.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import numpy as np

from .. import _spatial
from ..errors import InputError
from ._slide import Slide, open_slide, slide_for
from .slide._fill import check_fill

__all__ = ["PatchBatch", "MultiPatchBatch", "iter_patches", "iter_patches_multi", "crop_patches", "patch_size_px",
           "check_patch_sizes", "patch_origins", "spot_spacing"]

_SIZE_RE = re.compile(
    r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*"
    r"(px|pixels?|um|µm|μm|microns?|micrometers?|micrometres?|spots?|spacings?)?\s*$"
)


def spot_spacing(xy: np.ndarray) -> float:
    """Median distance from each spot to its nearest other spot (full-resolution px), as SENCA-st's; refuses
    fewer than two spots or a single shared position."""
    return _spatial.required_spot_spacing(xy, "a patch in spot spacings")


class PatchBatch(NamedTuple):
    """One batch of patches.

    Attributes
    ----------
    index
        int64 ``(B,)``: rows of ``xy`` (spots) these patches belong to.
    patches
        uint8 ``(B, s, s, 3)`` RGB patches.
    inside
        float32 ``(B,)``: fraction of each patch's area inside the image
        (1 = fully inside, 0 = entirely outside, filled with ``fill``).
    """

    index: np.ndarray
    patches: np.ndarray
    inside: np.ndarray


class MultiPatchBatch(NamedTuple):
    """One batch of patches of several sizes around the same spots (:func:`iter_patches_multi`).

    Attributes
    ----------
    index
        int64 ``(B,)``: rows of ``xy``.
    patches
        One uint8 ``(B, s, s, 3)`` array per requested size, in the order of ``sizes``.
    inside
        float32 ``(k, B)``: fraction of each size's patch inside the image.
    """

    index: np.ndarray
    patches: tuple
    inside: np.ndarray


def patch_list(patch, key_added) -> tuple[list, list[str]]:
    """``patch`` / ``key_added`` as equal-length lists (one patch: ``(55, "um")`` stays one)."""
    single = not isinstance(patch, (list, tuple)) or (
        isinstance(patch, tuple) and len(patch) == 2 and isinstance(patch[0], (int, float, np.number))
        and isinstance(patch[1], str) and not any(c.isdigit() for c in patch[1]))
    patches = [patch] if single else list(patch)
    keys = [key_added] if isinstance(key_added, str) else list(key_added)
    if not patches or len(keys) != len(patches) or not all(isinstance(k, str) and k for k in keys):
        msg = (f"key_added needs one obsm key per patch size: got patch={patch!r}, key_added={key_added!r} "
               "(e.g. patch=('spot', '6spacing'), key_added=('X_image', 'X_image_senca')).")
        raise InputError(msg)
    if len(set(keys)) != len(keys):
        raise InputError(f"key_added has a repeated key: {key_added!r}.")
    return patches, keys


def patch_size_px(adata, patch="spot", *, library_id: str | None = None) -> int:
    """Patch side in full-resolution pixels.

    Parameters
    ----------
    patch
        ``"spot"``: the spot diameter (``scalefactors["spot_diameter_fullres"]``);
        ``"1.5spot"``: a multiple of it; ``"6spacing"``: a multiple of the spot
        spacing (median distance to the nearest other spot; SENCA-st's image
        patch of radius 3 spacings is ``"6spacing"``); an int (or float) or ``"224px"``: pixels;
        ``"55um"`` / ``"55µm"`` or ``(55, "um")``: micrometres, converted with the
        library's pixel size (:func:`stmorph._spatial.microns_per_pixel`).

    Returns
    -------
    The side, rounded, at least 1.
    """
    value, unit = _parse_patch(patch)
    if unit == "px":
        px = value
    elif unit == "spot":
        px = value * _spatial.spot_diameter_fullres(adata, library_id)
    elif unit == "spacing":
        px = value * spot_spacing(_spatial.coordinates(adata))
    else:  # um
        px = value / _spatial.microns_per_pixel(adata, library_id)
    if not np.isfinite(px) or round(px) < 1:
        msg = f"gives a patch of {px:.3g} pixels; it must be a finite number of at least 1 pixel."
        raise InputError(f"patch={patch!r} {msg}", cli=f"--patch {patch} {msg}")
    return int(round(px))


def check_patch_sizes(sizes, patches, slide) -> None:
    """InputError naming the image when a patch of ``sizes`` (pixels, one per entry of ``patches``) is wider than
    the whole image: every spot's patch would hold the whole section, and each read a ``side x side`` square."""
    side = max(int(slide.width), int(slide.height))
    for z, p in zip(sizes, patches):
        if z > side:
            shown = str(z) if z < 10**9 else f"{float(z):.3g}"
            of = {"spot": " (a multiple of the spot diameter, the scale factors' spot_diameter_fullres)",
                  "spacing": " (a multiple of the spot spacing)"}.get(_parse_patch(p)[1], "")
            msg = (f"is {shown} px wide{of}, wider than the whole {slide.width} x {slide.height} px image; give a "
                   f"patch of at most {side} px")
            raise InputError(f"patch={p!r} {msg} (e.g. 'spot', '224px' or '100um').", slide.path,
                             cli=f"--patch {p} {msg} (e.g. spot, 224px or 100um).")


def _parse_patch(patch) -> tuple[float, str]:
    if isinstance(patch, (bool, np.bool_)):
        pass
    elif isinstance(patch, (int, np.integer, float, np.floating)):
        return float(patch), "px"
    elif isinstance(patch, tuple) and len(patch) == 2 and isinstance(patch[1], str):
        value, unit = _parse_patch(f"{patch[0]}{patch[1]}")
        return value, unit
    elif isinstance(patch, str):
        if patch.strip().lower() == "spot":
            return 1.0, "spot"
        m = _SIZE_RE.match(patch.lower())
        if m:
            unit = m.group(2) or "px"
            unit = ("px" if unit.startswith("p") else "spacing" if unit.startswith("spacing")
                    else "spot" if unit.startswith("spot") else "um")
            return float(m.group(1)), unit
    msg = (f"patch={patch!r} is not understood; use 'spot', '1.5spot', '6spacing', an int (pixels), '224px', "
           "'55um' or (55, 'um').")
    raise InputError(msg, cli=f"--patch {patch} is not understood; use spot, 1.5spot, 6spacing, 224 or 224px (pixels), "
                              "or 55um.")


def patch_origins(xy: np.ndarray, size: int) -> np.ndarray:
    """Top-left corners ``(N, 2)`` int64 (x0, y0) of the patches of side ``size`` centred on ``xy``."""
    return np.ceil(np.asarray(xy, np.float64) - size / 2).astype(np.int64)


def _check_xy(xy) -> np.ndarray:
    xy = np.asarray(xy, dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] != 2:
        msg = f"spot coordinates must have shape (n, 2) (x = column, y = row); got {xy.shape}."
        raise InputError(msg)
    bad = ~np.isfinite(xy).all(axis=1)
    if bad.any():
        msg = (f"{int(bad.sum())} spot coordinate(s) are NaN or infinite (first at row {int(np.flatnonzero(bad)[0])}); "
               "drop those spots or fix obsm['spatial'].")
        raise InputError(msg)
    return xy


def iter_patches(slide: Slide, xy: np.ndarray, size: int, *, out_size: int | None = None, batch_size: int = 64,
                 fill: int | str = 255) -> Iterator[PatchBatch]:
    """Spot-centred square patches, in batches, with bounded memory.

    Parameters
    ----------
    slide
        An open :class:`Slide` (or anything :func:`open_slide` accepts; then it is
        opened here and closed when the iterator is exhausted or closed).
    xy
        ``(N, 2)`` spot centres in full-resolution pixels, x = column, y = row.
    size
        Patch side in full-resolution pixels (see :func:`patch_size_px`).
    out_size
        Resize every patch to ``out_size`` x ``out_size`` (Pillow bilinear,
        antialiased when shrinking). None keeps ``size``.
    batch_size
        Patches per batch.
    fill
        Value (0-255) of the pixels of a patch that fall outside the image; ``"glass"``: those
        pixels and the image's pure-black fill get the slide's background colour
        (:attr:`Slide.background`), before any resize.

    Yields
    ------
    :class:`PatchBatch` ``(index, patches, inside)``. Spots come in storage
    order (tile row, then x), not in the order of ``xy``: scatter with
    ``index``. Every spot appears exactly once.

    Notes
    -----
    The work happens in numpy, tifffile/imagecodecs and Pillow, which release
    the GIL, so the iterator can be consumed from a background thread (one
    consumer at a time; the slide's cache and file access are locked).
    """
    size = int(size)
    if size < 1:
        msg = f"patch size must be >= 1 pixel, got {size}."
        raise InputError(msg)
    out_size, batch_size, fill = _check_batching(out_size, batch_size, fill)
    if out_size == size:
        out_size = None
    xy = _check_xy(xy)
    with _opened(slide) as s:
        yield from _iter(s, xy, size, out_size, batch_size, fill)


def _check_batching(out_size, batch_size, fill) -> tuple[int | None, int, int | str]:
    """``out_size``, ``batch_size`` and ``fill`` of the patch iterators, checked."""
    if out_size is not None:
        out_size = int(out_size)
        if out_size < 1:
            msg = f"out_size must be >= 1 pixel, got {out_size}."
            raise InputError(msg)
    batch_size = int(batch_size)
    if batch_size < 1:
        msg = f"batch_size must be >= 1, got {batch_size}."
        raise InputError(msg)
    return out_size, batch_size, check_fill(fill)


@contextmanager
def _opened(slide):
    """The slide itself, or one opened here (and closed on exit) from anything :func:`open_slide` takes."""
    own = not isinstance(slide, Slide)
    slide = open_slide(slide) if own else slide
    try:
        yield slide
    finally:
        if own:
            slide.close()


def _iter(slide: Slide, xy, size, out_size, batch_size, fill):
    lv = slide._level(0)
    n = len(xy)
    origin = patch_origins(xy, size)  # (N, 2) x0, y0
    # fraction of the patch inside the image
    ix = np.clip(origin[:, 0] + size, 0, lv.width) - np.clip(origin[:, 0], 0, lv.width)
    iy = np.clip(origin[:, 1] + size, 0, lv.height) - np.clip(origin[:, 1], 0, lv.height)
    inside = (ix * iy / float(size * size)).astype(np.float32)
    # storage order: tile row of the top edge, then x, so each tile is decoded once
    th = lv.tile[0]
    order = np.lexsort((origin[:, 0], np.clip(origin[:, 1], 0, None) // th))

    resample = None
    if out_size is not None:
        from PIL import Image

        resample = Image.BILINEAR
    crop = np.empty((size, size, 3), np.uint8)
    for start in range(0, n, batch_size):
        idx = order[start: start + batch_size].astype(np.int64)
        s = out_size or size
        out = np.empty((len(idx), s, s, 3), np.uint8)
        for j, i in enumerate(idx):
            x0, y0 = int(origin[i, 0]), int(origin[i, 1])
            if out_size is None:
                slide._read(lv, x0, y0, size, size, fill, out=out[j])
                continue
            slide._read(lv, x0, y0, size, size, fill, out=crop)
            im = Image.fromarray(crop).resize((out_size, out_size), resample)
            out[j] = np.asarray(im)
        yield PatchBatch(idx, out, inside[idx])


def iter_patches_multi(slide: Slide, xy: np.ndarray, sizes, *, out_size: int | None = None, batch_size: int = 64,
                       fill: int | str = 255) -> Iterator[MultiPatchBatch]:
    """Patches of several sizes centred on the same spots, each slide region decoded once.

    For every spot the square of the largest size is read once; the smaller
    patches are cut out of it (they share the centre convention of
    :func:`iter_patches`, so each equals what :func:`iter_patches` gives for
    that size), then each is resized to ``out_size`` (None keeps its own size).
    ``fill`` as in :func:`iter_patches`.
    Spots come in storage order of the largest patch; every spot appears once.
    """
    sizes = [int(z) for z in sizes]
    if not sizes or min(sizes) < 1:
        raise InputError(f"patch sizes must be >= 1 pixel, got {sizes}.")
    out_size, batch_size, fill = _check_batching(out_size, batch_size, fill)
    xy = _check_xy(xy)
    with _opened(slide) as s:
        yield from _iter_multi(s, xy, sizes, out_size, batch_size, fill)


def _iter_multi(slide: Slide, xy, sizes, out_size, batch_size, fill):
    from PIL import Image

    lv = slide._level(0)
    big = max(sizes)
    origins = [patch_origins(xy, z) for z in sizes]  # each (N, 2)
    o_big = patch_origins(xy, big)
    inside = np.empty((len(sizes), len(xy)), np.float32)
    for k, (z, o) in enumerate(zip(sizes, origins)):
        ix = np.clip(o[:, 0] + z, 0, lv.width) - np.clip(o[:, 0], 0, lv.width)
        iy = np.clip(o[:, 1] + z, 0, lv.height) - np.clip(o[:, 1], 0, lv.height)
        inside[k] = ix * iy / float(z * z)
    order = np.lexsort((o_big[:, 0], np.clip(o_big[:, 1], 0, None) // lv.tile[0]))
    crop = np.empty((big, big, 3), np.uint8)
    for start in range(0, len(xy), batch_size):
        idx = order[start: start + batch_size].astype(np.int64)
        outs = [np.empty((len(idx), out_size or z, out_size or z, 3), np.uint8) for z in sizes]
        for j, i in enumerate(idx):
            slide._read(lv, int(o_big[i, 0]), int(o_big[i, 1]), big, big, fill, out=crop)  # one read per spot
            for k, z in enumerate(sizes):
                dx, dy = int(origins[k][i, 0] - o_big[i, 0]), int(origins[k][i, 1] - o_big[i, 1])
                sub = crop[dy: dy + z, dx: dx + z]
                if out_size is None or out_size == z:
                    outs[k][j] = sub
                else:
                    outs[k][j] = np.asarray(Image.fromarray(np.ascontiguousarray(sub)).resize((out_size, out_size),
                                                                                           Image.BILINEAR))
        yield MultiPatchBatch(idx, tuple(outs), inside[:, idx])


def crop_patches(adata, patch="spot", *, image=None, out_size: int | None = None, library_id: str | None = None,
                 fill: int | str = 255) -> np.ndarray:
    """All spot patches of an AnnData in memory (convenience for small data).

    Parameters
    ----------
    adata
        AnnData with ``obsm["spatial"]`` (full-resolution pixels) and ``uns["spatial"]``.
    patch
        Patch size, see :func:`patch_size_px`.
    image
        Path, array or :class:`Slide`; default: see :func:`slide_for`.
    out_size
        Resize patches to this side.
    library_id
        Library to use when ``uns["spatial"]`` has several.
    fill
        Value of pixels outside the image, or ``"glass"`` (see :func:`iter_patches`).

    Returns
    -------
    uint8 ``(n_obs, s, s, 3)`` in the order of ``obs_names``.

    Sets the following fields
    -------------------------
    ``adata.obs["patch_inside_frac"]``
        float32, fraction of the patch inside the image (0 = entirely outside).
    ``adata.obs["patch_border"]``
        bool, the patch crosses the image border (or lies outside it).
    """
    size = patch_size_px(adata, patch, library_id=library_id)
    xy = _spatial.coordinates(adata)
    own = not isinstance(image, Slide)
    slide = slide_for(adata, image=image, library_id=library_id)
    try:
        s = int(out_size) if out_size else size
        out = np.empty((len(xy), s, s, 3), np.uint8)
        inside = np.empty(len(xy), np.float32)
        for b in iter_patches(slide, xy, size, out_size=out_size, fill=fill):
            out[b.index] = b.patches
            inside[b.index] = b.inside
    finally:
        if own:
            slide.close()
    adata.obs["patch_inside_frac"] = inside
    adata.obs["patch_border"] = inside < 1.0
    return out
