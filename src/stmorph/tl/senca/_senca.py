"""``stmorph.tl.senca``: SENCA-st spatial domains (Liyanaarachchi et al., shared encoder
with neighbourhood cross-attention). See ``docs/senca.md`` for the mapping from
the paper to this code and every choice made where the paper is silent.
"""

from __future__ import annotations

import time
import warnings
from contextlib import contextmanager
from typing import Any

import numpy as np
import pandas as pd

from ...errors import InputError
from .._methods import has_image
from ._config import SencaConfig

__all__ = ["senca", "SencaConfig"]


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        msg = f"device={device!r} requested but CUDA is not available; use device='cpu' or 'auto'."
        raise InputError(msg)
    return str(device)


@contextmanager
def _deterministic(random_state: int, device: str):
    """Seed torch inside a forked RNG and ask for deterministic kernels; restore afterwards."""
    import torch

    prev = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    devices = [torch.device(device).index or 0] if device.startswith("cuda") else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(random_state)
        torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*deterministic.*")
                yield
        finally:
            torch.use_deterministic_algorithms(prev, warn_only=prev_warn)


def patch_side_px(spacing: float, cfg: SencaConfig) -> int:
    """Patch side in full-resolution px: twice the radius of ``patch_radius_spacings`` spacings."""
    return max(1, int(round(2.0 * cfg.patch_radius_spacings * spacing)))


def senca(
    adata,
    n_clusters: int | None = None,
    *,
    config: SencaConfig | None = None,
    preset: str = "default",
    image_key: str = "X_image_senca",
    image=None,
    compute_image_features: bool = True,
    encoder: str = "efficientnet_lite2",
    encoder_weights: str | None = None,
    finetune_image: bool = False,
    cross_attention: bool = True,
    hierarchical: bool = True,
    layer: str | None = None,
    device: str = "auto",
    random_state: int = 0,
    key_added: str = "senca",
    progress: bool = True,
    copy: bool = False,
    **overrides: Any,
):
    """SENCA-st: spatial domains from expression and H&E with a cross-attention shared encoder.

    A graph transformer turns the spatial expression graph into RNA embeddings
    R, a frozen ImageNet CNN plus a fully connected layer turns spot-centred
    patches into image embeddings H, a neighbourhood cross-attention shared
    auto-encoder turns both into the shared embedding S, trained with
    NT-Xent between pooled H and R at two scales plus lambda times the
    reconstruction MSE (paper eq 1); S is clustered agglomeratively (``clustering="mixture"``, as in the
    ``"mixture"`` preset: a tied Gaussian mixture instead, not the paper's).

    Parameters
    ----------
    adata
        Raw counts in ``X`` (or ``layers["counts"]``), ``obsm["spatial"]``.
    n_clusters
        Number of domains; ``None``: the count of stMIC's expression baseline at its default resolution
        (:func:`stmorph.tl._stmic.expression_count`, reusing ``obs["expression"]`` when made that way), the
        count SENCA-st is given when none is.
    config
        :class:`SencaConfig`; ``SencaConfig.preset(preset)`` when ``None``.
    preset
        ``"default"`` or ``"literal"`` (the first literal reading of the paper,
        whose training collapses; see ``docs/senca.md``). Ignored when
        ``config`` is given.
    image_key
        ``obsm`` key of per-spot CNN features. Used as is when present;
        otherwise computed with :func:`stmorph.im.features` on patches of radius
        ``3`` spot spacings when an image is available and
        ``compute_image_features`` is true.
    image
        Image to crop patches from (path or array); default: the image recorded
        in ``uns["spatial"]``.
    encoder, encoder_weights
        Image encoder of :mod:`stmorph.im.encoders` and its weights file (e.g. a
        torchvision ``resnet50-*.pth``); ``None`` = the encoder's default source.
    compute_image_features
        Compute missing features. When false and ``obsm[image_key]`` is
        missing, or when the section has no image at all, the RNA branch runs
        alone (no cross-attention, no contrastive terms; recorded in
        ``uns[key_added]["params"]["image"]``).
    encoder
        Image encoder name (registry of :mod:`stmorph.im.encoders`).
    finetune_image
        Train the CNN end to end instead of caching frozen features (holds
        every preprocessed patch in memory; meant for small sections or a GPU).
    cross_attention, hierarchical
        ``False`` runs the paper's Table 4 ablations.
    layer
        Counts layer (default ``layers["counts"]`` if present, else ``X``).
    device
        ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``.
    random_state
        Seeds weights, dropout and window offsets; same seed, same labels (CPU).
    key_added
        ``obs`` column and ``uns`` key; the embedding goes to ``obsm["X_" + key_added]``.
    progress
        Show a progress bar.
    copy
        Return a modified copy instead of writing into ``adata``.
    **overrides
        Any :class:`SencaConfig` field, e.g. ``epochs=20, n_top_genes=1000``.

    Returns
    -------
    ``None``, or the modified copy when ``copy=True``.

    Sets the following fields
    -------------------------
    ``adata.obsm["X_" + key_added]`` : float32 ``(n_obs, shared_dim)``
        Shared embedding S.
    ``adata.obs[key_added]`` : categorical of ``"0"``, ``"1"``, ...
        Domains (agglomerative clustering of S, or the tied mixture's with ``clustering="mixture"``).
    ``adata.uns[key_added]["params"]`` : dict
        Config, ablation switches, device, seed, image source, genes used, timings.
    ``adata.obs[key_added + "_confidence"]``, ``adata.uns[key_added]["confidence"]``
        Each spot's confidence (posterior probability of its domain under a tied Gaussian model of S) and each
        domain's stability (see :mod:`stmorph.tl._confidence`).
    ``adata.uns[key_added]["loss"]`` : dict of arrays
        Per-epoch mean of ``total``, ``mse``, ``ntxent_w``, ``ntxent_g``.
    ``adata.obsm[image_key]``, ``adata.uns[image_key]``
        When image features had to be computed.
    """
    from ._cluster import agglomerative
    from ._model import SENCA
    from ._preprocess import prepare, use_global_attention
    from ._train import Tensors, embed, step_schedule, train

    cfg = (config or SencaConfig.preset(preset)).replace(**overrides)
    cfg.validate()
    if n_clusters is None:
        from .._stmic import expression_count

        n_clusters = expression_count(adata, random_state=random_state)
    if not isinstance(n_clusters, (int, np.integer)) or n_clusters < 1 or n_clusters > adata.n_obs:
        msg = f"n_clusters must be an integer in [1, n_obs={adata.n_obs}]; got {n_clusters!r}."
        raise InputError(msg)
    adata = adata.copy() if copy else adata
    t0 = time.perf_counter()
    dev = _resolve_device(device)

    inp = prepare(adata, cfg, layer=layer)  # section 3.1
    t_pre = time.perf_counter() - t0

    # ---- image branch input (section 3.3) ----
    side = patch_side_px(inp.spacing, cfg)
    feats, cnn, image_source, t_img, n_missing = None, None, "none (RNA branch alone)", 0.0, 0
    if finetune_image:
        if not has_image(adata, image, feature_key=None):
            msg = "finetune_image=True needs an image (image= or uns['spatial'] with a source image)."
            raise InputError(msg)
        from ... import im

        t1 = time.perf_counter()
        enc = im.encoders.get_encoder(encoder, weights=encoder_weights).to(dev)
        patches = im.crop_patches(adata, patch=side, image=image, out_size=enc.input_size, fill="glass")
        feats = enc.preprocess(patches).float()  # (N, 3, S, S)
        cnn, image_source = enc.model, f"{enc.name} fine-tuned end to end on {side}px patches"
        t_img = time.perf_counter() - t1
    else:
        if image_key not in adata.obsm and compute_image_features and has_image(adata, image, feature_key=None):
            from ... import im

            t1 = time.perf_counter()
            im.features(adata, encoder=encoder, weights=encoder_weights, patch=side, image=image,
                        key_added=image_key, device=dev, progress=progress)
            t_img = time.perf_counter() - t1
        if image_key in adata.obsm:
            feats = np.array(adata.obsm[image_key], dtype=np.float32)
            if feats.ndim != 2 or feats.shape[0] != adata.n_obs:
                msg = f'obsm["{image_key}"] must have shape (n_obs, d); got {feats.shape}.'
                raise InputError(msg)
            bad = ~np.isfinite(feats).all(1)  # e.g. spots whose patch lies outside the image
            n_missing = int(bad.sum())
            if n_missing == adata.n_obs:
                msg = f'obsm["{image_key}"] has no finite row; recompute the image features.'
                raise InputError(msg)
            if n_missing:
                feats[bad] = feats[~bad].mean(0)  # mean feature: such spots carry no image signal
            if cfg.standardize_image:
                feats = (feats - feats.mean(0)) / np.maximum(feats.std(0), 1e-6)
            image_source = f'obsm["{image_key}"]'

    # ---- model, training (sections 3.2-3.5) ----
    t2 = time.perf_counter()
    with _deterministic(random_state, dev):
        image_dim = None if feats is None else (
            int(feats.shape[1]) if cnn is None else _cnn_dim(cnn, feats[:1]))
        model = SENCA(cfg, n_genes=inp.x.shape[1], image_dim=image_dim,
                      cross_attention=cross_attention, cnn=cnn).to(dev)
        tensors = Tensors.from_inputs(inp, feats, dev)
        hist = train(model, inp, tensors, cfg, hierarchical=hierarchical, random_state=random_state,
                     progress=progress)
        s = embed(model, tensors)  # (N, shared_dim)
    t_train = time.perf_counter() - t2

    if cfg.clustering == "mixture":  # not the paper's: stmorph's tied mixture (docs/senca.md)
        from .._cluster import _relabel, gaussian_mixture

        labels, _ = gaussian_mixture(s, int(n_clusters), random_state=random_state)
        labels, used_connectivity = _relabel(labels), False
    else:
        labels, used_connectivity = agglomerative(s, int(n_clusters), linkage=cfg.linkage,
                                                  connectivity_above=cfg.cluster_connectivity_above)
    cats = [str(i) for i in range(int(labels.max()) + 1)]
    adata.obsm[f"X_{key_added}"] = s.astype(np.float32)
    adata.obs[key_added] = pd.Categorical(labels.astype(str), categories=cats)
    adata.uns[key_added] = {
        "params": {
            **{k: ("none" if v is None else v) for k, v in cfg.to_dict().items()},
            "method": "SENCA-st",
            "preset": "custom config" if config is not None else preset,
            "n_clusters": int(n_clusters),
            "cross_attention": bool(cross_attention),
            "hierarchical": bool(hierarchical),
            "image": image_source,
            "image_key": image_key,
            "encoder": getattr(encoder, "name", str(encoder)) if feats is not None else "none",
            "finetune_image": bool(finetune_image),
            "n_spots_without_image_features": n_missing,
            "patch_size_px": int(side),
            "spot_spacing_px": float(inp.spacing),
            "n_genes_used": int(inp.x.shape[1]),
            "attention_resolved": "global" if use_global_attention(adata.n_obs, cfg) else "local",
            "schedule_resolved": step_schedule(cfg, adata.n_obs, feats is not None and cnn is None),
            "cluster_knn_connectivity": bool(used_connectivity),
            "device": dev,
            "random_state": int(random_state),
            "seconds_preprocess": float(t_pre),
            "seconds_image_features": float(t_img),
            "seconds_train": float(t_train),
        },
        "loss": hist.as_dict(),
    }
    from .._confidence import add_confidence

    add_confidence(adata, key_added, rep=f"X_{key_added}")
    return adata if copy else None


def _cnn_dim(cnn, x) -> int:
    import torch

    with torch.no_grad():
        y = cnn(x)
    return int(y.reshape(y.shape[0], -1).shape[1]) if y.ndim != 4 else int(y.shape[1])
