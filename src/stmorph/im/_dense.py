"""Dense image features: the CNN run fully convolutionally over tissue tiles, pooled per bin.

The per-spot patch path (:mod:`._features`) crops, resizes and encodes one patch per spot: its
cost grows with the number of spots, about ten hours for 700,000 Visium HD bins on a 2-core CPU.
This path encodes the *tissue* once instead:

1. The slide is read lazily, tile by tile, at a working scale ``mpp`` (micrometres per pixel),
   from the best pyramid level and resized with Pillow (bilinear, antialiased, as the patch
   path resizes its patches). With ``fill="glass"`` (the default) pixels outside the image and the
   image's pure-black fill get the slide's glass colour before the resize, as in the patch path
   (:mod:`stmorph.im.slide._fill`); with ``fill=None`` pixels are as read, white outside.
2. Each tile is a *core* of ``tile_px`` working pixels plus ``overlap_px`` on every side; the
   encoder's trunk (no global pooling) maps it to a feature map of cells of ``stride`` pixels,
   and only the cells whose centres lie in the core are kept: the overlap margins are cropped,
   so what a cell sees never depends on where the tile ends (given enough overlap; the border
   effect of EfficientNet-Lite2 was measured in ``benchmarks/bench_dense.py``).
3. Tiles are laid on one global grid aligned to the stride, so the core cells of all tiles
   form one whole-slide grid; tiles are only visited where some bin's pooling window falls, and
   those whose footprint holds no tissue (thumbnail, Otsu on saturation, see
   :func:`tissue_mask`, which never counts black fill as tissue) are not encoded: their cells get
   the encoder's response to a uniform tile of the glass colour (white with ``fill=None``; computed once).
4. Every bin (spot) gets the mean of the map over each of its pooling windows (its own square
   ``"spot"`` and a context square such as ``"6spacing"``), each cell taken as a constant
   square: the weight of a cell is the area it shares with the window. A window smaller than
   a cell therefore gets the cell it falls in (nearest), or the area-weighted mix of the two
   to four cells it straddles. With a pointwise encoder at the image's own scale this is
   exactly the patch path's global average over the same square (``tests/test_dense_features.py``).
   With ``pool="section"`` (the ``stmorph`` method's context window) a cell also weighs 1 when its
   centre lies inside the tissue section (:func:`~stmorph.im._section.section_of`: the tissue mask
   closed and with its holes filled) and almost nothing (:data:`OUTSIDE_SECTION_WEIGHT`) outside it,
   as the patch path's :class:`~stmorph.im._section.SectionPool` weighs a patch's cells; a window with no
   cell inside the section keeps the plain average.
   A tile's map is pooled into running per-bin sums as soon as it is computed and dropped:
   memory holds a few tiles and the outputs, never a whole-slide map or image.

Cost therefore grows with the tissue area (tiles encoded), not with the number of bins (pooling
is a sparse product with a few nonzeros per bin).
"""

from __future__ import annotations

import math
import os
import queue
import threading
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import _spatial
from ..errors import InputError
from . import _cache
from ._fmap import _trunk, cell_geometry
from ._patches import check_patch_sizes, patch_list, patch_size_px
from ._runtime import _amp_dtype, _resolve_device, n_cores, resolve_backend
from ._section import check_pool, in_mask, section_of
from ._tissue import tissue_mask
from .slide import Slide, slide_for
from .slide._fill import GLASS_FILL, fill_params, read_fill

__all__ = ["choose_method", "dense_features"]

#: Finest default working scale (micrometres per pixel): 20x magnification, where nuclei are resolved
#: and a 6.5 mm Visium HD capture area is about 170 Mpx; finer scales cost (0.5 / mpp)^2 more.
FINEST_DEFAULT_MPP = 0.5
#: Default overlap in feature-map cells (x the encoder's stride). For EfficientNet-Lite2 (stride 32)
#: 12 cells = 384 px: the measured per-cell relative error against an untiled map fell from 5%
#: (256 px) to 0.15% (384 px) on H&E (BENCHMARKS.md section "dense features").
DEFAULT_OVERLAP_CELLS = 12
#: Default tile core side in working pixels (rounded to the stride): 1536 + 2 x 384 = 2304 px input,
#: about 1.4 GB of activations for EfficientNet-Lite2 in float32.
DEFAULT_TILE_PX = 1536
#: Number of spots above which ``features(method="auto")`` takes the dense path.
AUTO_DENSE_MIN_SPOTS = 50_000
#: With ``pool="section"``, the weight of a map cell outside the section relative to one inside. Not 0, so a
#: window with no cell inside the section gets the plain average from the same running sums (no second
#: accumulator of bins x features); inside the section it moves the average by less than a part in 10^5.
OUTSIDE_SECTION_WEIGHT = 1e-6


# --------------------------------------------------------------------------- reading at a working scale
def _read_scaled(slide: Slide, x0: int, y0: int, n: int, f: float, fill: int | str = 255) -> np.ndarray:
    """Working-scale pixels ``[x0, x0 + n) x [y0, y0 + n)`` (downsample ``f`` from level 0) as uint8 ``(n, n, 3)``.

    Working pixel ``k`` covers level-0 pixel edges ``[k f, (k + 1) f)``. Read from the best pyramid
    level with a margin (``fill``: outside the image, or ``"glass"``, see ``Slide._read``), then
    resized by Pillow (bilinear, antialiased) with the exact box, so a tile equals the same window
    of a resize of the whole image.
    """
    from PIL import Image

    li = slide.best_level_for_downsample(f)
    lv = slide._level(li)
    dx, dy = slide.width / lv.width, slide.height / lv.height
    bx0, by0, bx1, by1 = x0 * f / dx, y0 * f / dy, (x0 + n) * f / dx, (y0 + n) * f / dy
    if li == 0 and f == 1:
        return slide._read(lv, int(x0), int(y0), n, n, fill)
    m = int(math.ceil(max(f / dx, f / dy))) + 2  # the filter's support beyond the box
    lx0, ly0 = int(math.floor(bx0)) - m, int(math.floor(by0)) - m
    lx1, ly1 = int(math.ceil(bx1)) + m, int(math.ceil(by1)) + m
    region = slide._read(lv, lx0, ly0, lx1 - lx0, ly1 - ly0, fill)
    im = Image.fromarray(region).resize((n, n), Image.BILINEAR, box=(bx0 - lx0, by0 - ly0, bx1 - lx0, by1 - ly0))
    return np.asarray(im)


# --------------------------------------------------------------------------- pooling weights
def _cell_weights(a: np.ndarray, b: np.ndarray, centres: np.ndarray, s: float) -> np.ndarray:
    """``(n_bins, n_cells)``: share of each window ``[a, b)`` covered by each cell ``[c - s/2, c + s/2)``."""
    lo = np.maximum(a[:, None], centres[None, :] - s / 2)
    hi = np.minimum(b[:, None], centres[None, :] + s / 2)
    return np.clip(hi - lo, 0, None) / (b - a)[:, None]


@dataclass
class _Plan:
    f: float  # level-0 pixels per working pixel
    stride: int
    offset: float  # centre of cell 0 in working pixels
    tile: int  # core side, working px (multiple of stride)
    overlap: int  # working px each side (multiple of stride)
    n_in: int  # input side of every tile
    cells_in: int  # cells per side of a tile's map
    j0: int  # first core cell in a tile's map
    n_core: int  # core cells per side


def _plan(f, stride, lost, tile_px, overlap_px) -> _Plan:
    t = max(stride, int(round(tile_px / stride)) * stride)
    ov = int(math.ceil(overlap_px / stride)) * stride
    n_in = t + 2 * ov
    n_in += (lost - n_in) % stride  # (n_in - lost) divisible by the stride
    cells_in = (n_in - lost) // stride + 1
    offset = (lost - 1) / 2
    # tile 0's core [0, t): cells g with offset + stride g in it; its map starts at cell -ov / stride
    g0, g1 = math.ceil(-offset / stride), math.ceil((t - offset) / stride)
    j0 = g0 + ov // stride
    if j0 < 0 or j0 + (g1 - g0) > cells_in:
        msg = (f"overlap_px={overlap_px} is too small for this encoder (its map loses {lost} px at the borders); "
               f"use overlap_px >= {int(math.ceil(lost / 2))}.")
        raise InputError(msg)
    return _Plan(f, stride, offset, t, ov, n_in, cells_in, j0, g1 - g0)


# --------------------------------------------------------------------------- which path
def choose_method(adata, encoder="efficientnet_lite2", weights=None, library_id: str | None = None) -> str:
    """``"dense"`` or ``"patch"``: what ``features(method="auto")`` runs.

    Dense for Visium HD (``metadata["technology"] == "visium_hd"``) or more than
    :data:`AUTO_DENSE_MIN_SPOTS` spots, when the encoder returns a feature map; patch otherwise
    (Visium and legacy ST spots, where one patch per spot is cheap and is what stMIC and
    SENCA-st define; vision transformers).
    """
    from .encoders import VIT_PRESETS, get_encoder

    try:
        tech = str(_spatial.library(adata, library_id).get("metadata", {}).get("technology", ""))
    except InputError:
        tech = ""
    if tech != "visium_hd" and adata.n_obs <= AUTO_DENSE_MIN_SPOTS:
        return "patch"
    if isinstance(encoder, str):
        return "patch" if encoder in VIT_PRESETS else "dense"
    try:
        cell_geometry(get_encoder(encoder, weights))
    except InputError:
        return "patch"
    return "dense"


# --------------------------------------------------------------------------- the tool
def dense_features(
    adata,
    encoder: str | Any = "efficientnet_lite2",
    *,
    patch=("spot", "6spacing"),
    key_added: str | tuple[str, ...] = ("X_image", "X_image_context"),
    mpp: float | None = None,
    tile_px: int = DEFAULT_TILE_PX,
    overlap_px: int | None = None,
    tissue: str | bool = "auto",
    image=None,
    weights=None,
    device: str = "auto",
    batch_size: int | None = None,
    precision: str = "auto",
    backend: str = "auto",
    cache: bool = True,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    library_id: str | None = None,
    fill: str | None = "glass",
    pool: str | tuple[str, ...] = "mean",
    copy: bool = False,
):
    """Image features of every spot or bin from one fully convolutional pass over the tissue.

    See the module docstring for the method. Use it for Visium HD bins and any section with many
    spots; :func:`stmorph.im.features` dispatches here with ``method="auto"`` (Visium HD, or more
    than 50,000 spots) and keeps the per-spot patch path for Visium and legacy ST.

    Parameters
    ----------
    adata
        AnnData with ``obsm["spatial"]`` (full-resolution pixels) and ``uns["spatial"]``.
    encoder
        A convolutional encoder: ``"efficientnet_lite2"`` (default), ``"resnet50"``, or an
        :class:`~stmorph.im.encoders.Encoder` whose module returns a feature map (or has a
        ``forward_features`` that does). Vision transformers need the patch path.
    patch
        Pooling windows, as in :func:`stmorph.im.features`: ``"spot"`` (the bin's own square,
        ``spot_diameter_fullres`` = the bin side), ``"3spacing"`` (the ``stmorph`` method's
        context: the bin and its first ring, 3 bin pitches), ``"6spacing"`` (SENCA-st's), pixels, ``"48um"``;
        one or a tuple, one ``key_added`` each.
    key_added
        ``obsm`` key(s) of the features (and ``uns`` keys of the parameters).
    mpp
        Working scale in micrometres per pixel. Default: the scale at which the patch path shows
        the largest window to the encoder (window / ``input_size``, e.g. 6 x 16 um / 260 px =
        0.37 um/px for 16 um bins), but never finer than 0.5 um/px (20x; each halving of ``mpp``
        costs 4x) nor than the image's own pixels.
    tile_px, overlap_px
        Tile core side and the margin read beyond it on each side, in working pixels (rounded up
        to the encoder's stride). Default overlap: 12 cells (384 px for EfficientNet-Lite2).
    tissue
        ``"auto"``: skip tiles without tissue in :func:`tissue_mask` (their cells get the
        encoder's response to a tile of the glass colour); ``False``: encode every tile a window touches.
    image, weights, device, precision, cache, cache_dir, progress, library_id, fill, copy
        As in :func:`stmorph.im.features` (CPU inference runs one tile at a time on all cores;
        ``precision="auto"`` uses bf16 autocast only where the hardware has it).
    pool
        ``"mean"`` (each window's cells by area) or ``"section"`` (only the cells inside the tissue
        section, as :func:`stmorph.im.features`' ``pool="section"``), one value or one per window.
    batch_size
        Tiles per forward pass (default 1; tiles are large).
    backend
        ``"auto"``: ONNX Runtime for float32 on CPU when it is installed (the encoder's trunk exported
        once per call for the tile size and checked against PyTorch on a random tile), else PyTorch;
        ``"torch"`` or ``"onnxruntime"`` to choose. Recorded in the parameters; the cache key does not
        depend on it (both compute the same map).

    Returns
    -------
    The AnnData when ``copy=True``, else None.

    Sets the following fields (for each key of ``key_added``)
    -------------------------
    ``adata.obsm[key_added]``
        float32 ``(n_obs, dim)``; NaN rows for spots whose window lies entirely outside the image.
    ``adata.uns[key_added]["params"]``
        ``path="dense"``, the encoder's identity (``encoder``, ``weights_sha256``, ...),
        ``patch``, ``patch_size_px`` (window side, level-0 px), ``mpp``, ``downsample``,
        ``stride``, ``tile_px``, ``overlap_px``, ``tissue_threshold``, ``n_tiles`` (tiles some
        window touches), ``n_tiles_encoded``, ``n_tiles_background`` (skipped: no tissue),
        ``tissue_mm2`` (area of the encoded tile cores), ``n_outside``, ``device``, ``dtype``,
        ``image``, ``library_id``, ``cache_key``, ``from_cache``, ``seconds``, ``fill`` (and with
        ``"glass"``: ``glass_rgb``, ``black_fill_max``), ``pool`` (and with ``"section"``:
        ``n_section_fallback``, the windows with no cell inside the section, which kept the plain average).
    """
    import time

    import torch

    from .encoders import get_encoder

    t_start = time.perf_counter()
    adata = adata.copy() if copy else adata
    if adata.n_obs == 0:
        raise InputError("adata has no spots (n_obs == 0); nothing to extract features for.")
    patches, keys = patch_list(patch, key_added)
    pools = check_pool(pool, len(patches))
    lib = _spatial.library_id(adata, library_id) if "spatial" in adata.uns or image is None else library_id
    xy = _check_xy(_spatial.coordinates(adata))
    sizes = [patch_size_px(adata, p, library_id=lib) for p in patches]
    if isinstance(encoder, torch.nn.Module):
        msg = ("a torch.nn.Module needs its input size and normalisation: pass "
               "encoder=stmorph.im.encoders.get_encoder(module, input_size=..., mean=..., std=...).")
        raise InputError(msg)
    tile_px = _positive_int(tile_px, "tile_px")
    if overlap_px is not None:
        overlap_px = _positive_int(overlap_px, "overlap_px", allow_zero=True)
    if tissue not in ("auto", True, False):
        raise InputError(f"tissue must be 'auto', True or False; got {tissue!r}.")
    rfill = read_fill(fill)
    batch_size = _positive_int(batch_size or 1, "batch_size")
    dev = _resolve_device(device)
    enc = get_encoder(encoder, weights)
    if enc.weights_sha256 is None:
        enc.weights_sha256 = "module:" + _cache.module_sha256(enc.model)
    amp = _amp_dtype(dev, precision)
    if precision == "int8":
        raise InputError("precision='int8' is not available on the dense path; use 'auto', 'float32' or 'bfloat16'.")
    backend = resolve_backend(dev, backend, "float32" if amp is None else "bfloat16")
    dtype = str(amp).replace("torch.", "") if amp is not None else "float32"
    image_mpp = _spatial.microns_per_pixel(adata, lib) if lib is not None else None
    if mpp is None:
        if image_mpp is None:
            raise InputError("mpp= is needed when adata has no uns['spatial'] to give the pixel size.")
        mpp = max(FINEST_DEFAULT_MPP, image_mpp, max(sizes) * image_mpp / enc.input_size)
    elif isinstance(mpp, bool) or not isinstance(mpp, (int, float, np.number)) or not np.isfinite(mpp) or mpp <= 0:
        raise InputError(f"mpp must be a positive number of micrometres per pixel; got {mpp!r}.")
    f = float(mpp) / image_mpp if image_mpp else 1.0
    if f < 1 - 1e-9:
        warnings.warn(f"mpp={mpp} is finer than the image's {image_mpp:.4g} um/px: the image is upsampled "
                      f"{1 / f:.2f}x.", UserWarning, stacklevel=2)

    enc.to(dev)
    stride, lost, dim = cell_geometry(enc, dev)
    if overlap_px is None:
        overlap_px = DEFAULT_OVERLAP_CELLS * stride
    plan = _plan(f, stride, lost, tile_px, overlap_px)
    dense_params = {"path": "dense", "mpp": round(float(mpp), 6), "downsample": round(f, 6), "tile_px": plan.tile,
                    "overlap_px": plan.overlap, "tissue": str(tissue), "pool": "cell-area"}

    own = not isinstance(image, Slide)
    slide = slide_for(adata, image=image, library_id=lib)
    try:
        check_patch_sizes(sizes, patches, slide)
        image_id = _cache.slide_identity(slide) if (cache or slide.path) else "in-memory"
        cdir = cache_dir if cache_dir is not None else _cache.default_dir()
        dense_params.update(fill_params(slide, fill))
        ckeys = [_cache.make_key(image=image_id, xy=xy, patch_size_px=z,
                                 encoder={**enc.params(), "dtype": dtype, **dense_params,
                                          **({"pool_section": True} if pl == "section" else {})})
                 for z, pl in zip(sizes, pools)]
        found = [_cache.load(cdir, k, (adata.n_obs, dim)) if cache else None for k in ckeys]
        stats: dict[str, Any] = {}
        if any(x is None for x in found):
            threads = torch.get_num_threads()
            if dev.type == "cpu":
                torch.set_num_threads(n_cores())
            try:
                runner = _ort_trunk(enc, plan.n_in, n_cores(), stride) if backend == "onnxruntime" else None
                feats = _run(slide, xy, sizes, enc, plan, dev, amp, tissue, batch_size, progress, stats, runner,
                             fill=rfill, pools=pools)
            finally:
                torch.set_num_threads(threads)
            for i, a in enumerate(feats):
                if found[i] is None:
                    found[i] = a
                    if cache and np.isfinite(a).all():
                        _cache.save(cdir, ckeys[i], a)
            from_cache = False
        else:
            from_cache = True
        width, height = slide.width, slide.height
    finally:
        if own:
            slide.close()

    seconds = round(time.perf_counter() - t_start, 3)
    for k, (p, z, key, feats, ck) in enumerate(zip(patches, sizes, keys, found, ckeys)):
        n_outside = int(np.isnan(feats).all(axis=1).sum())
        if n_outside:
            warnings.warn(f"{n_outside} of {adata.n_obs} spots have windows entirely outside the {width} x {height} "
                          f"image ({z} px windows); their obsm[{key!r}] rows are NaN (check obsm['spatial'] is in "
                          "full-resolution pixels).", UserWarning, stacklevel=2)
        adata.obsm[key] = feats
        params = enc.params()
        params.update(dense_params)
        params.update(
            patch=str(p), patch_size_px=int(z), stride=int(stride), image_mpp=float(image_mpp or 0.0),
            device=str(dev), dtype=dtype, backend=backend if not from_cache else "", batch_size=batch_size,
            n_outside=n_outside,
            image=image_id.split("|")[0] if image_id.startswith("file:") else "in-memory",
            library_id=str(lib) if lib is not None else "", cache_key=ck, from_cache=from_cache, seconds=seconds,
            tissue_mm2=round(stats.get("n_tiles_encoded", 0) * (plan.tile * float(mpp) / 1000) ** 2, 4),
            **{n: v for n, v in stats.items() if n != "n_section_fallback"},
        )
        params["pool"] = pools[k]
        if pools[k] == "section" and not from_cache:
            params["n_section_fallback"] = int(stats["n_section_fallback"][k])
        adata.uns[key] = {"params": params}
    return adata if copy else None


def _positive_int(v, name: str, allow_zero: bool = False) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer, float, np.floating)) or not np.isfinite(v) \
            or int(v) != v or v < (0 if allow_zero else 1):
        raise InputError(f"{name} must be an integer >= {0 if allow_zero else 1}; got {v!r}.")
    return int(v)


def _check_xy(xy: np.ndarray) -> np.ndarray:
    from ._patches import _check_xy as check

    return check(xy)


def _windows(xy, sizes, plan: _Plan):
    """Per window size: working-pixel bounds ``(a_x, b_x, a_y, b_y)`` and the tile range each touches."""
    out = []
    u = (xy + 0.5) / plan.f - 0.5  # level-0 pixel centres -> working pixel coordinates
    for z in sizes:
        h = z / plan.f / 2
        a, b = u - h + 0.5, u + h + 0.5  # edges, in working px edge coordinates (pixel k spans [k, k+1))
        # cells (centre offset + s g, edge coords offset + 0.5 + s g) overlapping [a, b)
        c0 = plan.offset + 0.5
        glo = np.floor((a - c0 - plan.stride / 2) / plan.stride).astype(np.int64) + 1
        ghi = np.ceil((b - c0 + plan.stride / 2) / plan.stride).astype(np.int64) - 1
        # the tile of cell g: the one whose core [t T, (t + 1) T) holds its centre offset + s g
        tlo = np.floor((plan.offset + plan.stride * glo) / plan.tile).astype(np.int64)
        thi = np.floor((plan.offset + plan.stride * ghi) / plan.tile).astype(np.int64)
        out.append((a, b, tlo, thi))
    return out


def _tile_pairs(windows):
    """Sorted unique tiles ``(ty, tx)`` any window touches, and per window the (bin, tile index) pairs."""
    all_pairs = []
    for a, b, tlo, thi in windows:
        span = thi - tlo + 1  # (n, 2) tiles per axis
        reps = span[:, 0] * span[:, 1]
        bins = np.repeat(np.arange(len(a)), reps)
        k = np.arange(reps.sum()) - np.repeat(np.cumsum(reps) - reps, reps)
        tx = tlo[bins, 0] + k % span[bins, 0]
        ty = tlo[bins, 1] + k // span[bins, 0]
        all_pairs.append((bins, ty, tx))
    tiles = np.unique(np.concatenate([np.c_[ty, tx] for _, ty, tx in all_pairs]), axis=0)
    out = []
    for bins, ty, tx in all_pairs:
        idx = np.searchsorted(tiles[:, 0] * (1 << 32) + (tiles[:, 1] - tiles[:, 1].min()),
                              ty * (1 << 32) + (tx - tiles[:, 1].min()))
        order = np.argsort(idx, kind="stable")
        bins, idx = bins[order], idx[order]
        starts = np.searchsorted(idx, np.arange(len(tiles) + 1))
        out.append((bins, starts))
    return tiles, out


def _tile_is_tissue(tiles, plan: _Plan, mask, scale) -> np.ndarray:
    """Whether the region each tile reads (core + overlap) holds a tissue pixel of the thumbnail mask."""
    h, w = mask.shape
    integral = np.zeros((h + 1, w + 1), np.int64)
    integral[1:, 1:] = mask.cumsum(0).cumsum(1)
    k = plan.f * scale  # thumbnail px per working px
    y0 = np.clip(np.floor((tiles[:, 0] * plan.tile - plan.overlap) * k).astype(np.int64) - 1, 0, h)
    x0 = np.clip(np.floor((tiles[:, 1] * plan.tile - plan.overlap) * k).astype(np.int64) - 1, 0, w)
    y1 = np.clip(np.ceil(((tiles[:, 0] + 1) * plan.tile + plan.overlap) * k).astype(np.int64) + 1, 0, h)
    x1 = np.clip(np.ceil(((tiles[:, 1] + 1) * plan.tile + plan.overlap) * k).astype(np.int64) + 1, 0, w)
    count = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return count > 0


def _ort_trunk(enc, n_in: int, threads: int, stride: int):
    """``f(x) -> feature map`` of the encoder's trunk run by ONNX Runtime on ``n_in`` px tiles (NCHW float32
    in and out). Exporting at the tile size costs a minute (the trace is a forward pass at that size), so the
    trunk is exported at a small size with the same remainder modulo the stride (hence the same "SAME"
    paddings) with height and width left dynamic, and checked against PyTorch at another such size."""
    import onnxruntime as ort
    import torch

    from . import _onnx

    class _Trunk(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            fn = getattr(self.model, "forward_features", None)
            return fn(x) if fn is not None else self.model(x)

    small = 8 * stride + n_in % stride
    data = _onnx.export_onnx(_Trunk(enc.model), small, dynamic_size=True)
    so = ort.SessionOptions()
    so.intra_op_num_threads = max(1, int(threads))
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    session = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])

    def run(x: torch.Tensor) -> torch.Tensor:
        y = session.run(None, {"x": np.ascontiguousarray(x.detach().cpu().float().numpy())})[0]
        return torch.from_numpy(y)

    check = 12 * stride + n_in % stride
    x = enc.preprocess(np.random.default_rng(0).integers(0, 256, (1, check, check, 3), dtype=np.uint8)).cpu()
    with torch.inference_mode():
        want = _trunk(enc)(x.to(enc.device)).float().cpu().numpy()
    got = run(x).numpy()
    scale = float(np.abs(want).max()) or 1.0
    if got.shape != want.shape or not np.allclose(got, want, rtol=1e-3, atol=1e-3 * scale):
        msg = f"the ONNX export of encoder {enc.name!r}'s trunk differs from the module; use backend='torch'"
        raise RuntimeError(msg)
    return run


def _run(slide, xy, sizes, enc, plan: _Plan, dev, amp, tissue, batch_size, progress, stats,
         runner=None, fill: int | str = 255, pools=None) -> list[np.ndarray]:
    """Encode the tiles and pool them into per-bin features, one array per window size (``runner``: the
    trunk run by ONNX Runtime, else PyTorch; ``fill``: how tiles are read, see :func:`_read_scaled`;
    ``pools``: ``"mean"`` or ``"section"`` per window size)."""
    import contextlib
    import time

    import scipy.sparse as sp
    import torch
    from tqdm.auto import tqdm

    fn = runner or _trunk(enc)
    n = len(xy)
    t0 = time.perf_counter()
    windows = _windows(xy, sizes, plan)
    tiles, pairs = _tile_pairs(windows)
    pools = list(pools or ["mean"] * len(sizes))
    skip_glass = tissue in ("auto", True)
    if skip_glass or "section" in pools:  # one thumbnail mask for both
        mask, scale, thr = tissue_mask(slide)
    if skip_glass:
        is_tissue = _tile_is_tissue(tiles, plan, mask, scale)
    else:
        thr, is_tissue = float("nan"), np.ones(len(tiles), bool)
    section = (section_of(mask), float(scale)) if "section" in pools else None
    stats["seconds_plan"] = round(time.perf_counter() - t0, 3)
    autocast = (torch.autocast(device_type=dev.type, dtype=amp) if amp is not None else contextlib.nullcontext())
    dim = enc.dim or None

    def forward(batch: np.ndarray) -> np.ndarray:  # (B, n_in, n_in, 3) uint8 -> (B, C, n_core, n_core)
        with torch.inference_mode(), autocast:
            y = fn(enc.preprocess(batch))  # (B, C, cells_in, cells_in)
        j0, j1 = plan.j0, plan.j0 + plan.n_core
        return y[:, :, j0:j1, j0:j1].float().cpu().numpy()  # overlap margins cropped

    # the encoder's response to a tile of glass (white without fill="glass"): what a skipped tile's cells get
    background = None
    if not is_tissue.all():
        glass = np.asarray(slide.background if fill == GLASS_FILL else (255, 255, 255), np.uint8)
        background = forward(np.broadcast_to(glass, (1, plan.n_in, plan.n_in, 3)).copy())[0]
        background = background[:, plan.n_core // 2, plan.n_core // 2]
    dim = dim or (background.shape[0] if background is not None else None)
    accs: list[np.ndarray | None] = [None] * len(sizes)
    wsums = [np.zeros(n, np.float64) for _ in sizes]
    insides = [np.zeros(n, np.float64) for _ in sizes]  # per bin, the window's area inside the section
    # bins whose window lies entirely outside the image get NaN, as on the patch path
    outside = []
    W, H = slide.width / plan.f, slide.height / plan.f
    for a, b, _, _ in windows:
        outside.append((b[:, 0] <= 0) | (a[:, 0] >= W) | (b[:, 1] <= 0) | (a[:, 1] >= H))

    def pool(ti: int, fmap: np.ndarray | None) -> None:
        ty, tx = tiles[ti]
        gy0 = math.ceil((ty * plan.tile - plan.offset) / plan.stride)
        gx0 = math.ceil((tx * plan.tile - plan.offset) / plan.stride)
        cy = plan.offset + 0.5 + plan.stride * (gy0 + np.arange(plan.n_core))  # cell centres, edge coords
        cx = plan.offset + 0.5 + plan.stride * (gx0 + np.arange(plan.n_core))
        inside = _inside_section(section, cy, cx, plan.f) if section is not None else None
        for k, ((a, b, _, _), (bins_all, starts)) in enumerate(zip(windows, pairs)):
            bins = bins_all[starts[ti]: starts[ti + 1]]
            if not len(bins):
                continue
            wx = _cell_weights(a[bins, 0], b[bins, 0], cx, plan.stride)  # (nb, n_core)
            wy = _cell_weights(a[bins, 1], b[bins, 1], cy, plan.stride)
            if pools[k] == "section":
                cw = np.where(inside, 1.0, OUTSIDE_SECTION_WEIGHT).astype(np.float32)  # (n_core, n_core)
                w = _sparse_pool(sp, wy, wx, cw[None])[:, 0]
                insides[k][bins] += _sparse_pool(sp, wy, wx, inside[None].astype(np.float32))[:, 0]
            else:
                cw, w = None, wy.sum(1) * wx.sum(1)
            wsums[k][bins] += w
            if fmap is None:  # background tile: every cell is the white tile's vector
                contrib = np.outer(w.astype(np.float32), background)
            else:
                contrib = _sparse_pool(sp, wy, wx, fmap if cw is None else fmap * cw[None])
            if accs[k] is None:
                accs[k] = np.zeros((n, contrib.shape[1]), np.float32)
            accs[k][bins] += contrib

    # a reader thread decodes and resizes the next tiles while the encoder runs
    todo = np.flatnonzero(is_tissue)
    q: queue.Queue = queue.Queue(maxsize=2)
    stop = threading.Event()
    errors: list[BaseException] = []
    reads: list[float] = []

    def produce() -> None:
        try:
            for start in range(0, len(todo), batch_size):
                idx = todo[start: start + batch_size]
                t = time.perf_counter()
                batch = np.stack([_read_scaled(slide, int(tiles[i, 1]) * plan.tile - plan.overlap,
                                               int(tiles[i, 0]) * plan.tile - plan.overlap, plan.n_in, plan.f,
                                               fill)
                                  for i in idx])
                reads.append(time.perf_counter() - t)
                while not stop.is_set():
                    try:
                        q.put((idx, batch), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(None)
        except BaseException as e:
            errors.append(e)
            q.put(None)

    t_enc = t_pool = 0.0
    bar = tqdm(total=len(tiles), desc=f"dense features ({enc.name}, {plan.n_in} px tiles)", unit="tile",
               disable=not progress)
    reader = threading.Thread(target=produce, daemon=True, name="stmorph-dense-tiles")
    reader.start()
    try:
        for ti in np.flatnonzero(~is_tissue):
            pool(int(ti), None)
            bar.update(1)
        while True:
            item = q.get()
            if item is None:
                break
            idx, batch = item
            t = time.perf_counter()
            maps = forward(batch)
            t_enc += time.perf_counter() - t
            t = time.perf_counter()
            for i, fmap in zip(idx, maps):
                pool(int(i), fmap)
            t_pool += time.perf_counter() - t
            bar.update(len(idx))
    finally:
        stop.set()
        reader.join(timeout=10)
        bar.close()
    if errors:
        raise errors[0]
    out = []
    for k in range(len(sizes)):
        acc = accs[k] if accs[k] is not None else np.zeros((n, dim or 0), np.float32)
        acc /= np.maximum(wsums[k], 1e-12)[:, None].astype(np.float32)
        acc[outside[k]] = np.nan
        out.append(acc)
    stats.update(
        n_section_fallback=[int(((insides[k] <= 0) & ~outside[k]).sum()) for k in range(len(sizes))],
        n_tiles=len(tiles), n_tiles_encoded=int(is_tissue.sum()), n_tiles_background=int((~is_tissue).sum()),
        tissue_threshold=round(thr, 4) if np.isfinite(thr) else None, tile_input_px=int(plan.n_in),
        seconds_read=round(sum(reads), 3), seconds_encode=round(t_enc, 3), seconds_pool=round(t_pool, 3),
    )
    return out


def _inside_section(section, cy: np.ndarray, cx: np.ndarray, f: float) -> np.ndarray:
    """bool ``(len(cy), len(cx))``: whether each map cell's centre (working-pixel edge coordinates) lies in the
    section mask ``(mask, thumbnail px per level-0 px)``; outside the image it does not."""
    mask, scale = section
    return in_mask(mask, cy * f * scale, cx * f * scale)


def _sparse_pool(sp, wy: np.ndarray, wx: np.ndarray, fmap: np.ndarray) -> np.ndarray:
    """``sum_ij wy[b, i] wx[b, j] fmap[:, i, j]`` for every bin ``b``, as a sparse product. ``fmap``: (C, ny, nx)."""
    nb, ny = wy.shape
    nx = wx.shape[1]
    by, iy = np.nonzero(wy)
    bx, ix = np.nonzero(wx)
    # nonzeros of each row's outer product: pair every y-entry with every x-entry of the same bin
    cy = np.bincount(by, minlength=nb)
    cx = np.bincount(bx, minlength=nb)
    sy = np.cumsum(cy) - cy
    sx = np.cumsum(cx) - cx
    per = cy * cx
    rows = np.repeat(np.arange(nb), per)
    k = np.arange(per.sum()) - np.repeat(np.cumsum(per) - per, per)
    ky = sy[rows] + k // cx[rows]
    kx = sx[rows] + k % cx[rows]
    vals = (wy[by[ky], iy[ky]] * wx[bx[kx], ix[kx]]).astype(np.float32)
    m = sp.csr_matrix((vals, (rows, iy[ky] * nx + ix[kx])), shape=(nb, ny * nx))
    flat = np.ascontiguousarray(fmap.reshape(fmap.shape[0], -1).T)  # (ny * nx, C)
    return np.asarray(m @ flat, dtype=np.float32)
