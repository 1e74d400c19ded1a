"""Spot image features: a streaming patch -> encoder pipeline.

Producer thread(s) run :func:`~stmorph.im.iter_patches` (decode, crop, resize
to the encoder's input size, as uint8) into a small bounded queue; inference
stream thread(s) take whole batches, convert them to float, normalise in torch
and run the encoder under ``torch.inference_mode`` (BatchNorm folded into the
convolutions, channels_last, bf16 autocast where the hardware has it), writing
rows into a preallocated float32 array by spot index. Decoding and cropping
therefore overlap with inference, and memory is bounded by a few batches
whatever the slide size.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import warnings
from typing import Any

import numpy as np

from .. import _spatial
from ..errors import InputError
from . import _cache
from ._runtime import (  # noqa: F401 - n_cores, cpu_has_native_bf16, PRECISIONS and BACKENDS are re-exported
    BACKENDS,
    PRECISIONS,
    _amp_dtype,
    _resolve_device,
    cpu_has_native_bf16,
    n_cores,
    plan_threads,
    resolve_backend,
)
from ._patches import MultiPatchBatch, check_patch_sizes, iter_patches, iter_patches_multi, patch_list, patch_size_px
from ._section import SectionPool, check_pool, pooled
from ._slide import Slide, slide_for
from .encoders import Encoder, get_encoder
from .slide._fill import fill_params, read_fill

__all__ = ["features"]

_DONE = object()


def _calibration(slide: Slide, xy: np.ndarray, size: int, enc: Encoder, n: int = 64, fill="glass") -> np.ndarray:
    """Preprocessed patches of ``n`` spots spread over the section, for int8 calibration (deterministic)."""
    idx = np.unique(np.linspace(0, len(xy) - 1, min(n, len(xy))).round().astype(int))
    batches = [b.patches[b.inside > 0] for b in iter_patches(slide, xy[idx], size, out_size=enc.input_size,
                                                             batch_size=len(idx), fill=fill)]
    patches = np.concatenate(batches) if batches else np.zeros((0, enc.input_size, enc.input_size, 3), np.uint8)
    if not len(patches):
        patches = np.full((1, enc.input_size, enc.input_size, 3), 255, np.uint8)
    return np.ascontiguousarray(enc.preprocess(patches).numpy())


def _bands(xy: np.ndarray, k: int) -> list[np.ndarray]:
    """Split spot indices into ``k`` horizontal bands of equal count (one per producer)."""
    order = np.argsort(xy[:, 1], kind="stable")
    return [b for b in np.array_split(order, k) if len(b)]


def extract(
    slide: Slide,
    xy: np.ndarray,
    size,
    enc: Encoder,
    *,
    device="cpu",
    batch_size: int = 32,
    num_workers: int = 1,
    streams: int = 1,
    progress: bool = True,
    amp_dtype=None,
    runner=None,
    fill: int | str = 255,
    pool=None,
) -> np.ndarray:
    """Features ``(N, enc.dim)`` float32 of the patches of side ``size`` centred on ``xy``.

    ``size`` may be a list of sides: then a list of arrays comes back, one per
    side, and every slide region is read once (:func:`iter_patches_multi`).

    ``num_workers`` producer threads crop patches into a bounded queue;
    ``streams`` consumer threads each run whole batches through the encoder
    (torch releases the GIL; the caller sets torch's thread count). Rows of
    spots whose patch lies entirely outside the image are NaN. This is the
    engine behind :func:`features`, usable without an AnnData. ``runner``
    replaces ``enc``'s own forward on preprocessed batches (e.g. an
    :class:`~stmorph.im._onnx.OrtRunner`). ``fill``: as in :func:`iter_patches`
    (:func:`features` passes ``"glass"``). ``pool``: one entry per size, ``None`` (the encoder's
    own average over the whole map) or a :class:`~stmorph.im._section.SectionPool` (the map averaged
    with its cell weights, computed by PyTorch); a size may be listed twice with different pools,
    and its patches then run through the encoder once.
    """
    import torch
    from tqdm.auto import tqdm

    device = torch.device(device)
    n = len(xy)
    multi = isinstance(size, (list, tuple))
    sizes = [int(z) for z in size] if multi else [int(size)]
    pools = list(pool) if isinstance(pool, (list, tuple)) else [pool] * len(sizes)
    if len(pools) != len(sizes):
        raise InputError(f"pool has {len(pools)} entries for {len(sizes)} patch sizes.")
    read = sorted(set(sizes))  # each size cropped and encoded once, however many pools it has
    outs = [np.full((n, enc.dim), np.nan, dtype=np.float32) for _ in sizes]
    users = [[e for e, z in enumerate(sizes) if z == u] for u in read]
    trunk = next((p.trunk for p in pools if p is not None), None)  # the map, for pooled sizes
    q: queue.Queue = queue.Queue(maxsize=2 * (num_workers + streams))
    stop = threading.Event()
    errors: list[BaseException] = []
    lock = threading.Lock()
    run = runner if runner is not None else enc
    prep = getattr(runner, "preprocess", enc.preprocess)  # a runner may want its input made its own way
    bar = tqdm(total=n, desc=f"features ({enc.name}{', ' + ' + '.join(map(str, sizes)) + ' px' if multi else ''})",
               unit="spot", disable=not progress, smoothing=0.1)

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce(rows: np.ndarray) -> None:
        try:
            if len(read) > 1:
                it = iter_patches_multi(slide, xy[rows], read, out_size=enc.input_size, batch_size=batch_size,
                                        fill=fill)
            else:
                it = (MultiPatchBatch(b.index, (b.patches,), b.inside[None])
                      for b in iter_patches(slide, xy[rows], read[0], out_size=enc.input_size, batch_size=batch_size,
                                            fill=fill))
            for b in it:
                if not put(MultiPatchBatch(rows[b.index], b.patches, b.inside)):
                    return
        except BaseException as e:
            errors.append(e)
            stop.set()

    def consume() -> None:
        # inference_mode and autocast are thread-local: entered in each stream
        autocast = (torch.autocast(device_type=device.type, dtype=amp_dtype) if amp_dtype is not None
                    else contextlib.nullcontext())
        try:
            with torch.inference_mode(), autocast:
                while not stop.is_set():
                    try:
                        item = q.get(timeout=0.1)
                    except queue.Empty:
                        continue
                    if item is _DONE:
                        return
                    for u, entries, patches, inside in zip(read, users, item.patches, item.inside):
                        keep = inside > 0  # entirely-outside patches are pure fill: leave their rows NaN
                        if not keep.any():
                            continue
                        rows = item.index[keep]
                        if all(pools[e] is None for e in entries):
                            x = prep(patches if keep.all() else patches[keep])  # (B, 3, S, S)
                            y = run(x).float().cpu().numpy()  # (B, dim)
                            for e in entries:
                                outs[e][rows] = y
                            continue
                        # a pooled size: the map from PyTorch (ONNX Runtime's graph ends pooled)
                        fmap = trunk(enc.preprocess(patches if keep.all() else patches[keep]))  # (B, C, h, w)
                        for e in entries:
                            if pools[e] is None:
                                outs[e][rows] = fmap.float().mean(dim=(2, 3)).cpu().numpy()
                            else:
                                wts = pools[e](rows, u, fmap.shape[2], fmap.shape[3])
                                outs[e][rows] = pooled(fmap, wts).cpu().numpy()
                    with lock:
                        bar.update(len(item.index))
        except BaseException as e:
            errors.append(e)
            stop.set()

    producers = [threading.Thread(target=produce, args=(rows,), daemon=True, name=f"stmorph-patches-{i}")
                 for i, rows in enumerate(_bands(xy, max(1, num_workers)))]
    consumers = [threading.Thread(target=consume, daemon=True, name=f"stmorph-encoder-{i}")
                 for i in range(max(1, streams))]
    try:
        for t in producers + consumers:
            t.start()
        for t in producers:
            while t.is_alive():
                t.join(timeout=0.2)
        for _ in consumers:
            put(_DONE)
        for t in consumers:
            while t.is_alive():
                t.join(timeout=0.2)
    finally:
        stop.set()  # also on KeyboardInterrupt: every thread polls it
        for t in producers + consumers:
            t.join(timeout=10)
        bar.close()
    if errors:
        raise errors[0]
    return outs if multi else outs[0]


def features(
    adata,
    encoder: str | Encoder | Any = "efficientnet_lite2",
    *,
    patch="spot",
    image=None,
    weights=None,
    device: str = "auto",
    batch_size: int | None = None,
    num_workers: int | None = None,
    key_added: str | tuple[str, ...] = "X_image",
    cache: bool = True,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    library_id: str | None = None,
    precision: str = "auto",
    backend: str = "auto",
    method: str = "auto",
    fill: str | None = "glass",
    pool: str | tuple[str, ...] = "mean",
    copy: bool = False,
):
    """Image features of every spot from a pretrained encoder.

    Crops a square patch around each spot from the full-resolution image,
    resizes it to the encoder's input, normalises it and runs the encoder in
    batches; cropping overlaps with inference (see the module docstring).
    For Visium HD bins and other large spot counts, ``method="auto"`` runs the
    dense path instead (:func:`stmorph.im.dense_features`).

    Parameters
    ----------
    adata
        AnnData with ``obsm["spatial"]`` (full-resolution pixels, x = column)
        and ``uns["spatial"]`` (see ``docs/ARCHITECTURE.md``).
    encoder
        ``"efficientnet_lite2"`` (default, 1280-d), ``"resnet50"`` (2048-d,
        stMIC's encoder; needs a weights file), any name registered with
        :func:`stmorph.im.encoders.register_encoder`, or an
        :class:`~stmorph.im.encoders.Encoder` (wrap a ``torch.nn.Module`` with
        :func:`stmorph.im.encoders.get_encoder`).
    patch
        Patch side: ``"spot"`` (the spot diameter), ``"1.5spot"``, spot
        spacings (``"6spacing"``: SENCA-st's patch of radius 3 spacings), pixels
        (``224`` or ``"224px"``) or micrometres (``"100um"``); see
        :func:`stmorph.im.patch_size_px`. A tuple of them, e.g.
        ``("spot", "6spacing")``, computes features at every size in one pass
        over the slide: each spot's region is decoded and cropped once (the
        largest square; the smaller patches are cut out of it), and each size
        is stored under its own key of ``key_added``.
    image
        Full-resolution image (path, array or Slide); default: the source image
        path in ``uns["spatial"][library_id]["metadata"]``, else the in-memory
        ``images["fullres"]``.
    weights
        Weights file for a registered encoder (default: the encoder's own lookup).
    device
        ``"auto"``: CUDA when available (with bf16/fp16 autocast), else CPU using
        all available cores (as independent batch streams, see
        :func:`plan_threads`). Or ``"cpu"``, ``"cuda"``, ``"cuda:1"``.
    batch_size
        Patches per forward pass; default 32 on CPU, 128 on CUDA.
    num_workers
        Patch-producing threads; default 1 on CPU (inference needs the cores),
        up to 4 with CUDA.
    key_added
        ``obsm`` key of the features and ``uns`` key of the parameters; with a
        tuple of patches, a tuple of as many keys (e.g.
        ``("X_image", "X_image_senca")``).
    cache
        Reuse/store features in ``cache_dir``, keyed by (image, coordinates,
        patch size, encoder, weights hash, input size, preprocessing); any change
        to one of them recomputes. ``False`` always recomputes and writes nothing.
    cache_dir
        Default ``$STMORPH_CACHE_DIR`` or ``~/.cache/stmorph/features``.
    progress
        Show a progress bar.
    library_id
        Library in ``uns["spatial"]`` when there are several.
    precision
        ``"auto"``: bf16 autocast on CUDA (fp16 where bf16 is unsupported) and
        on CPUs with native bf16 instructions (AVX512-BF16/AMX; about 2x faster,
        features within ~3% relative error / cosine > 0.999 of float32), else
        float32. ``"float32"`` for exact, machine-independent float32 features;
        ``"bfloat16"``; ``"float16"`` (CUDA only); ``"int8"`` (CPU, ONNX Runtime:
        static int8 quantisation calibrated on 64 patches of this section, the
        high-resolution layers kept float32; 1.3x faster again than float32 ONNX
        Runtime but only approximately equal: cosine to float32 0.998 on average,
        0.985 at worst on HER2ST, see BENCHMARKS.md section 3b). Part of the cache key.
    backend
        ``"auto"``: ONNX Runtime on CPU when installed (``pip install
        onnxruntime onnx``) and inference runs in float32 (forward 2.1x faster,
        whole call 2.2x on a 2-core AVX-512 machine; same float32 features);
        PyTorch otherwise. ``"torch"``, ``"onnxruntime"``.
    method
        ``"patch"``: one patch per spot (this function's pipeline); ``"dense"``:
        :func:`stmorph.im.dense_features` (the CNN run once over the tissue, each
        ``patch`` size a pooling window around each spot; cost grows with tissue
        area, not spots); ``"auto"`` (default): dense when the technology is
        ``visium_hd`` or there are more than 50,000 spots and the encoder is
        convolutional, patch otherwise (Visium, legacy ST, vision transformers).
        On the dense path ``batch_size`` counts tiles and ``num_workers`` and
        ``backend`` do not apply.
    fill
        ``"glass"`` (default): where the slide shows no scanned tissue the encoder sees the slide's
        glass colour (:attr:`~stmorph.im.Slide.background`: OpenSlide's ``background-color``, else
        white): pure-black fill (all three channels <= 16, e.g. a background masked black) and the
        area outside the image are painted with it, and transparent pixels are composited on it
        (see :mod:`stmorph.im.slide._fill`; measured on HER2ST A1, whose background is painted black,
        in BENCHMARKS.md section 1, "Slide fill read as glass"). None: pixels as read (black stays
        black, white outside the image). Part of the cache key and of the recorded parameters.
    pool
        How the encoder's last feature map becomes one vector: ``"mean"`` (default; the encoder's own
        global average over the whole patch) or ``"section"``: the average over the map cells that lie
        inside the tissue section, so the map cells lying on glass beyond the section's edge are left out
        (their neighbours inside still see the glass through their receptive fields: see
        :mod:`stmorph.im._section`; convolutional encoders only, computed by PyTorch). One
        value, or one per patch. Part of the cache key and of the recorded parameters; the dense path
        weighs the cells of its windows the same way (:func:`stmorph.im.dense_features`).
    copy
        Return a modified copy instead of writing into ``adata``.

    Returns
    -------
    The AnnData when ``copy=True``, else None.

    Notes
    -----
    A spot whose patch lies entirely outside the image has no image content:
    its row is NaN (never features of the fill colour), a warning gives the
    count, and ``params["n_outside"]`` records it. Downstream steps must drop or
    impute those rows (``tl.image_embedding`` does). Patches crossing the
    border are padded with white and computed; ``params["n_border"]`` counts them.

    With several patch sizes each key gets its own cache entry, so a later
    single-size call (e.g. SENCA-st's own) finds the features in the cache;
    sizes already cached are not recomputed.

    Sets the following fields (for each key of ``key_added``)
    -------------------------
    ``adata.obsm[key_added]``
        float32 ``(n_obs, dim)``, rows aligned to ``obs_names``.
    ``adata.uns[key_added]["params"]``
        ``encoder``, ``weights_sha256``, ``patch_size_px``, ``input_size``,
        ``preprocessing``, ``fill`` (and with ``"glass"``: ``glass_rgb``, ``black_fill_max``),
        ``device``, ``dtype``, ``backend`` (empty when read from the cache),
        ``batch_size``, ``n_outside``,
        ``n_border``, ``image``, ``library_id``, ``cache_key``, ``from_cache``, ``computed_with`` (the sizes computed in the same pass).
    """
    import torch

    if method not in ("auto", "patch", "dense"):
        raise InputError(f"method must be 'auto', 'patch' or 'dense'; got {method!r}.")
    rfill = read_fill(fill)
    patches, keys = patch_list(patch, key_added)
    pools = check_pool(pool, len(patches))
    if method != "patch":
        from ._dense import choose_method, dense_features

        if method == "dense" or choose_method(adata, encoder, weights, library_id) == "dense":
            return dense_features(adata, encoder, patch=patch, key_added=key_added, image=image, weights=weights,
                                  device=device, batch_size=batch_size if method == "dense" else None,
                                  precision=precision, backend=backend, cache=cache, cache_dir=cache_dir,
                                  progress=progress, library_id=library_id, fill=fill, pool=pools, copy=copy)
    adata = adata.copy() if copy else adata
    if adata.n_obs == 0:
        raise InputError("adata has no spots (n_obs == 0); nothing to extract features for.")
    lib = _spatial.library_id(adata, library_id) if "spatial" in adata.uns or image is None else library_id
    xy = _spatial.coordinates(adata)
    sizes = [patch_size_px(adata, p, library_id=lib) for p in patches]
    if isinstance(encoder, torch.nn.Module):
        msg = ("a torch.nn.Module needs its input size and normalisation: pass "
               "encoder=stmorph.im.encoders.get_encoder(module, input_size=..., mean=..., std=...).")
        raise InputError(msg)
    dev = _resolve_device(device)
    enc = get_encoder(encoder, weights)
    if enc.weights_sha256 is None:
        enc.weights_sha256 = "module:" + _cache.module_sha256(enc.model)
    amp = _amp_dtype(dev, precision)
    requested, backend = backend, resolve_backend(dev, backend, precision)
    dtype = "int8" if precision == "int8" else str(amp).replace("torch.", "") if amp is not None else "float32"
    batch_size = int(batch_size or (128 if dev.type == "cuda" else 32))
    num_workers = int(num_workers or (min(4, n_cores()) if dev.type == "cuda" else 1))
    if batch_size < 1 or num_workers < 1:
        raise InputError(f"batch_size and num_workers must be >= 1; got {batch_size}, {num_workers}.")

    own = not isinstance(image, Slide)
    slide = slide_for(adata, image=image, library_id=lib)
    try:
        check_patch_sizes(sizes, patches, slide)
        image_id = _cache.slide_identity(slide)
        cdir = cache_dir if cache_dir is not None else _cache.default_dir()
        units = list(zip(sizes, pools))  # what is computed and cached: a patch size and a pooling
        unique = sorted(set(units))
        fparams = fill_params(slide, fill)
        # a section-pooled size runs in PyTorch: int8 (ONNX Runtime's) does not apply to it
        torch_dtype = str(amp).replace("torch.", "") if amp is not None else "float32"
        udtype = {u: torch_dtype if u[1] == "section" else dtype for u in unique}
        ckeys = {u: _cache.make_key(image=image_id, xy=xy, patch_size_px=u[0],
                                    encoder={**enc.params(), "dtype": udtype[u], **fparams,
                                             **({"pool": "section"} if u[1] == "section" else {})})
                 for u in unique}
        found = {u: _cache.load(cdir, ckeys[u], (adata.n_obs, enc.dim)) if cache else None for u in unique}
        todo = [u for u in unique if found[u] is None]
        computed = {}
        n_fallback = 0
        if todo:
            enc.to(dev)
            threads = torch.get_num_threads()
            streams, per_stream = plan_threads(dev)
            if dev.type == "cpu":
                torch.set_num_threads(per_stream)
            try:
                runner = None
                if backend == "onnxruntime":
                    from ._onnx import OrtRunner

                    calib = _calibration(slide, xy, todo[0][0], enc, fill=rfill) if precision == "int8" else None
                    try:
                        runner = OrtRunner(enc, threads=per_stream, precision=dtype, calib=calib)
                    except Exception as e:  # a module ONNX cannot export: PyTorch runs it (auto only)
                        if requested != "auto" or precision == "int8":
                            msg = f"backend='onnxruntime' could not run encoder {enc.name!r}: {type(e).__name__}: {e}"
                            raise InputError(msg.splitlines()[0]) from e
                        backend = "torch"
                section = SectionPool(slide, xy, enc, device=dev) if any(p == "section" for _, p in todo) else None
                tsizes = [z for z, _ in todo]
                feats = extract(slide, xy, tsizes if len(todo) > 1 else tsizes[0], enc, device=dev,
                                batch_size=batch_size, num_workers=num_workers, streams=streams, progress=progress,
                                amp_dtype=amp, runner=runner, fill=rfill,
                                pool=[section if p == "section" else None for _, p in todo])
                n_fallback = section.n_fallback if section is not None else 0
            finally:
                torch.set_num_threads(threads)
            computed = dict(zip(todo, feats if len(todo) > 1 else [feats]))
            if cache:
                for u, f in computed.items():
                    _cache.save(cdir, ckeys[u], f)
        width, height = slide.width, slide.height
    finally:
        if own:
            slide.close()

    for p, z, pl, key in zip(patches, sizes, pools, keys):
        u = (z, pl)
        feats = found[u] if found[u] is not None else computed[u]
        origin = np.ceil(xy - z / 2)
        n_border = int(((origin < 0) | (origin + z > np.array([width, height]))).any(axis=1).sum())
        n_outside = int(np.isnan(feats).all(axis=1).sum())
        if n_outside:
            msg = (f"{n_outside} of {adata.n_obs} spots have patches entirely outside the {width} x {height} image "
                   f"({z} px patches); their obsm[{key!r}] rows are NaN (check obsm['spatial'] is in full-resolution "
                   "pixels).")
            warnings.warn(msg, UserWarning, stacklevel=2)
        adata.obsm[key] = feats if keys.count(key) == 1 and units.count(u) == 1 else feats.copy()
        params = enc.params()
        params.update(fparams)
        params.update(
            patch_size_px=int(z),
            patch=str(p),
            device=str(dev),
            dtype=udtype[u],
            backend=(backend if pl == "mean" else "torch") if u in todo else "",
            pool=pl,
            batch_size=batch_size,
            streams=list(plan_threads(dev)),
            n_outside=n_outside,
            n_border=n_border,
            image=image_id.split("|")[0] if image_id.startswith("file:") else "in-memory",
            library_id=str(lib) if lib is not None else "",
            cache_key=ckeys[u],
            from_cache=found[u] is not None,
            computed_with=[f"{t} px{' (section)' if q == 'section' else ''}" for t, q in todo] if u in todo else [],
        )
        if pl == "section" and u in todo:
            params["n_section_fallback"] = int(n_fallback)
        adata.uns[key] = {"params": params}
    return adata if copy else None


