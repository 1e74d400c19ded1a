"""Small building blocks shared by the encoder architectures (imports torch)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _same_pad(size: int, k: int, s: int) -> tuple[int, int]:
    """TensorFlow "SAME" padding (before, after) for one spatial dimension."""
    total = max((math.ceil(size / s) - 1) * s + k - size, 0)
    return total // 2, total - total // 2


class Conv2dSame(nn.Conv2d):
    """``nn.Conv2d`` with TensorFlow "SAME" padding (asymmetric when TF pads asymmetrically).

    Symmetric cases go straight to the convolution's own padding; only the
    asymmetric ones (stride 2 on an even size) pay for an explicit ``F.pad``.
    """

    def __init__(self, in_ch: int, out_ch: int, k: int, stride: int = 1, groups: int = 1, bias: bool = False):
        super().__init__(in_ch, out_ch, k, stride=stride, padding=0, groups=groups, bias=bias)

    static_pad: tuple | None = None  #: fixed ((top, bottom), (left, right)) set by :func:`freeze_same_padding`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        if self.static_pad is not None:  # plain ints: an exported graph has no shape arithmetic
            ph, pw = self.static_pad
        else:
            ph, pw = _same_pad(x.shape[-2], kh, sh), _same_pad(x.shape[-1], kw, sw)
        if ph[0] == ph[1] and pw[0] == pw[1]:
            return F.conv2d(x, self.weight, self.bias, self.stride, (ph[0], pw[0]), 1, self.groups)
        x = F.pad(x, (pw[0], pw[1], ph[0], ph[1]))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, 1, self.groups)


@torch.no_grad()
def freeze_same_padding(model: nn.Module, input_size: int) -> nn.Module:
    """Fix every :class:`Conv2dSame`'s padding for square inputs of side ``input_size`` (in place).

    For export (ONNX) and quantisation tools that trace the graph: the
    paddings become constants instead of arithmetic on the input's shape.
    """
    sizes = {}
    hooks = [m.register_forward_pre_hook(lambda m, a: sizes.__setitem__(m, tuple(a[0].shape[-2:])))
             for m in model.modules() if isinstance(m, Conv2dSame)]
    try:
        p = next(iter(model.parameters()), None)
        model(torch.zeros(1, 3, input_size, input_size, device=p.device if p is not None else "cpu"))
    finally:
        for h in hooks:
            h.remove()
    for m, (h, w) in sizes.items():
        (kh, kw), (sh, sw) = m.kernel_size, m.stride
        m.static_pad = (_same_pad(h, kh, sh), _same_pad(w, kw, sw))
    return model


@torch.no_grad()
def fuse_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Fold an eval-mode BatchNorm into the preceding convolution, in place.

    ``bn(conv(x)) == conv'(x)`` with ``w' = w * g / sqrt(v + eps)`` and
    ``b' = (b - m) * g / sqrt(v + eps) + beta``.
    """
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # (C_out,)
    conv.weight.mul_(scale.view(-1, 1, 1, 1))
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    conv.bias = nn.Parameter((bias - bn.running_mean) * scale + bn.bias)


def fuse_batchnorms(model: nn.Module) -> nn.Module:
    """Fold every ``(conv, bn)`` pair a module declares in ``_fuse_pairs`` (eval mode only).

    Each architecture module lists its pairs as attribute names, e.g.
    ``_fuse_pairs = (("conv1", "bn1"),)``; the BatchNorm is replaced by
    ``nn.Identity`` so ``forward`` is unchanged. A ``nn.Sequential(conv, bn)``
    (torchvision's ``downsample``) is fused too.
    """
    if model.training:
        raise RuntimeError("fuse_batchnorms needs a model in eval mode")
    for m in list(model.modules()):
        for conv_name, bn_name in getattr(m, "_fuse_pairs", ()):
            conv, bn = getattr(m, conv_name), getattr(m, bn_name)
            if isinstance(bn, nn.BatchNorm2d) and isinstance(conv, nn.Conv2d):
                fuse_conv_bn(conv, bn)
                setattr(m, bn_name, nn.Identity())
        if isinstance(m, nn.Sequential) and len(m) == 2 and isinstance(m[0], nn.Conv2d) and isinstance(m[1], nn.BatchNorm2d):
            fuse_conv_bn(m[0], m[1])
            m[1] = nn.Identity()
    return model


def prepare_for_inference(model: nn.Module, *, fuse: bool = True, channels_last: bool = True) -> nn.Module:
    """eval mode, no gradients, BatchNorm folded into convolutions, channels_last weights."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if fuse:
        fuse_batchnorms(model)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model
