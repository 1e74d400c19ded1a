"""The encoder registry and the :class:`Encoder` wrapper every architecture returns.

This module imports no torch at import time: factories import their
architecture module (which imports torch) only when called.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ...errors import DependencyError, InputError

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["Encoder", "register_encoder", "get_encoder", "list_encoders", "file_sha256"]

#: ImageNet channel statistics in 0..255 units (RGB), as torchvision uses them.
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


@dataclass
class Encoder:
    """A pretrained image model plus everything needed to feed it.

    Parameters
    ----------
    name
        Registry name (or a user label for a custom module).
    model
        ``torch.nn.Module`` mapping a float tensor ``(B, 3, S, S)`` (already
        normalised) to features ``(B, dim)``; a ``(B, C, H, W)`` output is
        global-average pooled.
    input_size
        Side ``S`` of the square input in pixels.
    mean, std
        Per-channel normalisation in 0..255 units, in the order of the channels
        the model sees (after the optional RGB->BGR flip).
    bgr
        Feed channels as BGR (Keras "caffe" preprocessing) instead of RGB.
    dim
        Output dimension.
    weights_sha256
        SHA-256 of the weights file (``None`` for a custom in-memory module).
    preprocessing
        Short human-readable name of the preprocessing, stored in ``uns``.
    """

    name: str
    model: Any
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    dim: int
    bgr: bool = False
    weights_sha256: str | None = None
    preprocessing: str = "custom"
    device: str = "cpu"
    _norm: tuple | None = field(default=None, repr=False)

    # -- preparation -------------------------------------------------------
    def to(self, device) -> Encoder:
        """Move the model to ``device`` (in place) and return self."""
        import torch

        self.model.to(torch.device(device))
        self.device = str(device)
        self._norm = None
        return self

    def _scale_shift(self):
        import torch

        if self._norm is None:
            mean = torch.tensor(self.mean, dtype=torch.float32)
            std = torch.tensor(self.std, dtype=torch.float32)
            # (x - mean) / std == x * scale + shift ; shape (1, 3, 1, 1)
            scale = (1.0 / std).view(1, 3, 1, 1).to(self.device)
            shift = (-mean / std).view(1, 3, 1, 1).to(self.device)
            self._norm = (scale, shift)
        return self._norm

    def preprocess(self, patches) -> torch.Tensor:
        """uint8 patches ``(B, S, S, 3)`` RGB -> normalised float32 ``(B, 3, S, S)``.

        The result is channels_last in memory (the NHWC array is only
        permuted, never copied to NCHW), which is the fast layout for
        oneDNN/cuDNN convolutions.
        """
        import torch

        x = torch.as_tensor(patches)
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
            msg = f"patches must be uint8 (B, S, S, 3); got {tuple(x.shape)} {x.dtype}."
            raise InputError(msg)
        if self.bgr:
            x = x.flip(-1)
        if self.device.startswith("cuda"):  # pinned host memory: the copy overlaps with GPU work
            x = x.pin_memory()
        x = x.to(self.device, non_blocking=True).permute(0, 3, 1, 2)  # (B, 3, S, S), channels_last
        scale, shift = self._scale_shift()
        return x.to(torch.float32).mul_(scale).add_(shift)

    def __call__(self, x) -> torch.Tensor:
        """Features ``(B, dim)`` of a preprocessed batch."""
        import torch

        y = self.model(x)
        if y.ndim == 4:
            y = y.mean(dim=(2, 3), dtype=torch.float32)
        return y.reshape(y.shape[0], -1)

    def params(self) -> dict[str, Any]:
        """What identifies the encoder, for ``uns`` and the features cache."""
        return {
            "encoder": self.name,
            "weights_sha256": self.weights_sha256 or "",
            "input_size": int(self.input_size),
            "preprocessing": self.preprocessing,
            "mean": [float(m) for m in self.mean],
            "std": [float(s) for s in self.std],
            "bgr": bool(self.bgr),
            "dim": int(self.dim),
        }


_REGISTRY: dict[str, Callable[..., Encoder]] = {}


def register_encoder(name: str, factory: Callable[..., Encoder], *, overwrite: bool = False) -> None:
    """Make ``factory`` available as ``get_encoder(name)`` and ``features(encoder=name)``.

    ``factory(weights=None, **kwargs)`` must return an :class:`Encoder`
    (its model in eval mode). See the :mod:`stmorph.im.encoders` docstring.
    """
    if not isinstance(name, str) or not name:
        msg = f"encoder name must be a non-empty string; got {name!r}."
        raise InputError(msg)
    if name in _REGISTRY and not overwrite:
        msg = f"an encoder named {name!r} is already registered; pass overwrite=True to replace it."
        raise InputError(msg)
    _REGISTRY[name] = factory


def list_encoders() -> list[str]:
    """Names accepted by :func:`get_encoder`."""
    return sorted(_REGISTRY)


def get_encoder(
    encoder: str | Encoder | Any = "efficientnet_lite2",
    weights: str | os.PathLike | None = None,
    *,
    input_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    bgr: bool = False,
    name: str | None = None,
    **kwargs,
) -> Encoder:
    """An :class:`Encoder` by registry name, or wrap a user ``torch.nn.Module``.

    Parameters
    ----------
    encoder
        A name from :func:`list_encoders`, an :class:`Encoder` (returned as
        is), or a ``torch.nn.Module`` taking ``(B, 3, S, S)`` normalised input.
    weights
        Weights file for a registered encoder (see each encoder for where it
        looks by default).
    input_size, mean, std, bgr, name
        Only for a plain ``nn.Module``: input side in pixels (required), channel
        mean/std in 0..255 units (default ImageNet), BGR channel order, label.
    **kwargs
        Passed to the registered factory (e.g. ``preprocessing="caffe"`` for resnet50).
    """
    if isinstance(encoder, Encoder):
        return encoder
    if isinstance(encoder, str):
        if encoder not in _REGISTRY:
            msg = f"unknown encoder {encoder!r}; available: {list_encoders()} (or pass a torch.nn.Module)."
            raise InputError(msg)
        return _REGISTRY[encoder](weights=weights, **kwargs)
    try:
        import torch
    except ImportError as e:  # pragma: no cover
        raise DependencyError("torch is required for image encoders: pip install torch") from e
    if not isinstance(encoder, torch.nn.Module):
        msg = f"encoder must be a registered name, an Encoder or a torch.nn.Module; got {type(encoder).__name__}."
        raise InputError(msg)
    if input_size is None:
        msg = "a custom torch.nn.Module encoder needs input_size= (the square input side in pixels)."
        raise InputError(msg)
    mean = tuple(float(m) for m in (mean if mean is not None else IMAGENET_MEAN))
    std = tuple(float(s) for s in (std if std is not None else IMAGENET_STD))
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        msg = f"mean and std need 3 values each, std > 0 (0..255 units); got mean={mean}, std={std}."
        raise InputError(msg)
    encoder.eval()
    device = str(next(iter(encoder.parameters()), torch.empty(0)).device)
    enc = Encoder(
        name=name or type(encoder).__name__,
        model=encoder,
        input_size=int(input_size),
        mean=mean,
        std=std,
        dim=0,
        bgr=bool(bgr),
        weights_sha256=None,
        preprocessing=f"custom mean={[round(m, 3) for m in mean]} std={[round(s, 3) for s in std]}"
        + (" BGR" if bgr else " RGB"),
        device=device,
    )
    with torch.inference_mode():
        x = enc.preprocess(np.zeros((1, enc.input_size, enc.input_size, 3), np.uint8))
        enc.dim = int(enc(x).shape[1])
    return enc


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file (memoised on path, size and mtime)."""
    path = os.path.abspath(os.fspath(path))
    st = os.stat(path)
    key = (path, st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


def load_state_dict(path: str | os.PathLike) -> dict:
    """Load a PyTorch state dict on CPU, safely (tensors only)."""
    import torch

    try:
        sd = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    except Exception as e:
        # torch's refusal runs to many lines and suggests weights_only=False: never pass that on
        if "Unsupported global" in str(e):
            m = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
            what = f" ({m.group(1)})" if m else ""
            msg = (f"refused: the file holds Python objects besides tensors{what}, which could run code when "
                   "loaded; stmorph loads tensors only: save the model's state_dict() or convert it to .safetensors.")
            raise DependencyError(f"{path}: {msg}") from None
        text = str(e)
        if "WeightsUnpickler error:" in text:
            text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation")[0]
        first = " ".join(text.split())
        first = "" if "weights_only" in first else first
        msg = f"cannot read weights file ({type(e).__name__}: {first[:200]})."
        raise DependencyError(f"{path}: {msg}") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise DependencyError(f"{path}: expected a state dict (mapping of tensors); got {type(sd).__name__}.")
    return sd


def check_state_dict(model, sd: dict, path: str | os.PathLike, what: str) -> None:
    """DependencyError (one line naming ``path``) unless every entry of ``sd`` that ``model`` has is a tensor of
    the model's shape: a file with the right keys but other tensor shapes (another variant of the network) would
    otherwise fail in ``load_state_dict`` with a multi-line RuntimeError."""
    import torch

    expected = model.state_dict()
    wrong = []
    for key, value in sd.items():
        if key not in expected:
            continue
        if not isinstance(value, torch.Tensor):
            wrong.append(f"{key} is a {type(value).__name__}, not a tensor")
        elif tuple(value.shape) != tuple(expected[key].shape):
            wrong.append(f"{key} has shape {tuple(value.shape)}, expected {tuple(expected[key].shape)}")
        elif not (value.is_floating_point() or expected[key].dtype == value.dtype):
            wrong.append(f"{key} holds {value.dtype}, expected {expected[key].dtype}")
    if wrong:
        msg = f"not {what}: {len(wrong)} tensor(s) do not fit the network, e.g. {'; '.join(wrong[:2])}."
        raise DependencyError(f"{path}: {msg}")
