"""ResNet-50 without the top (stMIC's image encoder), in plain PyTorch.

He et al. (2016): a 7x7 stem, four stages of bottleneck blocks (3, 4, 6, 3)
and global average pooling -> 2048-d features. Attribute names follow
torchvision exactly (``conv1``, ``bn1``, ``layer1.0.conv1``,
``layer1.0.downsample.0`` ...), so torchvision's ImageNet state dicts load
without renaming; the ``fc`` classifier in such a file is ignored.

Weights are never downloaded. They are looked up, in order:

1. ``weights=`` passed to :func:`resnet50` / ``features(weights=...)``;
2. the environment variable ``STMORPH_RESNET50_WEIGHTS``;
3. the torch hub cache, ``$TORCH_HOME/hub/checkpoints/resnet50-*.pth``
   (``TORCH_HOME`` defaults to ``$XDG_CACHE_HOME/torch`` or ``~/.cache/torch``),
   where torchvision keeps ``resnet50-0676ba61.pth`` (IMAGENET1K_V1) and
   ``resnet50-11ad3fa6.pth`` (IMAGENET1K_V2).

A file named like torchvision's (``resnet50-<8 hex>.pth``) must have a SHA-256
starting with those 8 hex digits, as torchvision itself checks.

No pretrained ResNet-50 file ships with stmorph or its dependencies (the
development machine had none either): the tests check the architecture and
the loading of a torchvision-layout state dict made from a random
initialisation, and ``benchmarks/bench_features.py`` times it with random
weights (speed does not depend on the values). Until a weights file is
provided, ``get_encoder("resnet50")`` raises a DependencyError saying where to
put it.

Preprocessing (``preprocessing=``):

- ``"torchvision"`` (default): RGB, ImageNet mean/std, for torchvision weights;
- ``"caffe"``: BGR with the ImageNet mean subtracted and no scaling, which is
  what ``tf.keras.applications.resnet50.preprocess_input`` does and so what the
  stMIC paper used with the Keras weights (convert those to this layout first).
"""

from __future__ import annotations

import glob
import os
import re

import torch
from torch import nn

from ...errors import DependencyError, InputError
from ._layers import prepare_for_inference
from ._registry import IMAGENET_MEAN, IMAGENET_STD, Encoder, check_state_dict, file_sha256, load_state_dict

ENV_VAR = "STMORPH_RESNET50_WEIGHTS"
#: torchvision's ResNet-50 ImageNet files (name -> weights version).
TORCHVISION_FILES = {"resnet50-0676ba61.pth": "IMAGENET1K_V1", "resnet50-11ad3fa6.pth": "IMAGENET1K_V2"}
PREPROCESSING = {
    # name: (mean, std, bgr) in 0..255 units, in the channel order the model sees
    "torchvision": (IMAGENET_MEAN, IMAGENET_STD, False),
    "caffe": ((103.939, 116.779, 123.68), (1.0, 1.0, 1.0), True),
}


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (stride here, as torchvision "v1.5") -> 1x1 expand, plus the shortcut."""

    expansion = 4

    def __init__(self, c_in: int, width: int, stride: int = 1):
        super().__init__()
        c_out = width * self.expansion
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))
        self._fuse_pairs = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.bn1(self.conv1(x)))  # (B, width, H, W)
        h = self.relu(self.bn2(self.conv2(h)))  # (B, width, H/s, W/s)
        h = self.bn3(self.conv3(h))  # (B, 4 width, H/s, W/s)
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(h + shortcut)


class ResNet50(nn.Module):
    """ResNet-50; ``forward`` returns pooled features ``(B, 2048)``; ``fc`` exists only with ``include_top``."""

    def __init__(self, include_top: bool = False, n_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        c = 64
        for i, (width, n, stride) in enumerate(((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)), start=1):
            blocks = [Bottleneck(c, width, stride)] + [Bottleneck(width * 4, width) for _ in range(n - 1)]
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
            c = width * 4
        self.fc = nn.Linear(2048, n_classes) if include_top else None
        self._fuse_pairs = (("conv1", "bn1"),)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The feature map before global pooling, ``(B, 2048, S/32, S/32)`` (any input size; dense features)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (B, 64, S/4, S/4)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (B, 2048, S/32, S/32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x).mean(dim=(2, 3), dtype=torch.float32)  # (B, 2048), pooled in float32


def _torch_home() -> str:
    default = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "torch")
    return os.path.expanduser(os.environ.get("TORCH_HOME", default))


def find_weights(weights: str | os.PathLike | None = None) -> str:
    """Resolve the ResNet-50 weights file (explicit path, env var, torch hub cache) or raise DependencyError."""
    if weights is not None:
        path = os.fspath(weights)
        if not os.path.isfile(path):
            raise DependencyError(f"{path}: resnet50 weights file not found.")
        return path
    env = os.environ.get(ENV_VAR)
    if env:
        if not os.path.isfile(env):
            raise DependencyError(f"{env}: ${ENV_VAR} points to a file that does not exist.")
        return env
    ckpt = os.path.join(_torch_home(), "hub", "checkpoints")
    found = sorted(glob.glob(os.path.join(ckpt, "resnet50-*.pth")))
    # prefer torchvision's V1 weights (the classic ImageNet ResNet-50), then V2, then anything else
    order = list(TORCHVISION_FILES)
    found.sort(key=lambda p: order.index(os.path.basename(p)) if os.path.basename(p) in order else len(order))
    if found:
        return found[0]
    msg = (
        "no ResNet-50 weights found (stmorph never downloads). Provide a torchvision-layout state dict "
        f"(e.g. resnet50-0676ba61.pth from https://download.pytorch.org/models/resnet50-0676ba61.pth) by one of: "
        f"features(..., weights='/path/resnet50.pth'); export {ENV_VAR}=/path/resnet50.pth; "
        f"or copy it to {ckpt}/."
    )
    raise DependencyError(msg)


def _check_torchvision_hash(path: str, sha: str) -> None:
    m = re.fullmatch(r"resnet50-([0-9a-f]{8})\.pth", os.path.basename(path))
    if m and not sha.startswith(m.group(1)):
        msg = f"SHA-256 {sha[:8]}... does not match the prefix {m.group(1)} in the file name; the file is corrupt."
        raise DependencyError(f"{path}: {msg}")


def load_resnet50(weights: str | os.PathLike | None = None, *, fuse: bool = True) -> ResNet50:
    """Headless ResNet-50 with a torchvision-layout state dict, in eval mode (BatchNorm folded when ``fuse``)."""
    path = find_weights(weights)
    sha = file_sha256(path)
    _check_torchvision_hash(path, sha)
    sd = {k.removeprefix("module."): v for k, v in load_state_dict(path).items()}
    sd = {k: v for k, v in sd.items() if not k.startswith("fc.")}  # the classifier is not used
    model = ResNet50(include_top=False)
    check_state_dict(model, sd, path, "a torchvision-layout ResNet-50 state dict")
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        msg = (
            f"not a torchvision-layout ResNet-50 state dict: {len(missing)} missing keys {missing[:5]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:5]}."
        )
        raise DependencyError(f"{path}: {msg}")
    model.weights_sha256 = sha
    return prepare_for_inference(model, fuse=fuse)


def resnet50(
    weights: str | os.PathLike | None = None, *, preprocessing: str = "torchvision", input_size: int = 224, fuse: bool = True
) -> Encoder:
    """Registry factory: ResNet-50 without the top, global average pooling, 2048-d features.

    Parameters
    ----------
    weights
        Weights file; default: ``$STMORPH_RESNET50_WEIGHTS`` or the torch hub cache (see module docstring).
    preprocessing
        ``"torchvision"`` (RGB, ImageNet mean/std) or ``"caffe"`` (BGR, mean subtraction; Keras/stMIC).
    input_size
        Side of the square input (224, as in the paper).
    """
    if preprocessing not in PREPROCESSING:
        msg = f"resnet50 preprocessing must be one of {sorted(PREPROCESSING)}; got {preprocessing!r}."
        raise InputError(msg)
    mean, std, bgr = PREPROCESSING[preprocessing]
    model = load_resnet50(weights, fuse=fuse)
    return Encoder(
        name="resnet50",
        model=model,
        input_size=int(input_size),
        mean=tuple(mean),
        std=tuple(std),
        dim=2048,
        bgr=bgr,
        weights_sha256=model.weights_sha256,
        preprocessing=preprocessing,
    )
