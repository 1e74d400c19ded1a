"""An encoder's last feature map: the trunk that returns it and where its cells lie in the input.

Used by the dense path (:mod:`._dense`: one map per tile, cells pooled into spots or bins) and by the
section pooling (:mod:`._section`: the context patch's map averaged over cells inside the section).
"""

from __future__ import annotations

from ..errors import InputError

__all__ = ["cell_geometry"]


def _trunk(enc):
    """A function ``x (B, 3, H, W) -> map (B, C, h, w)`` from an encoder, or an InputError."""
    return getattr(enc.model, "forward_features", None) or enc.model  # ViTs' forward_features: tokens, refused later


def cell_geometry(enc, device="cpu") -> tuple[int, int, int]:
    """``(stride, lost, channels)`` of an encoder's feature map, measured with two probe inputs.

    A map of an input ``n`` pixels wide has ``(n - lost) / stride + 1`` cells; cell ``j``'s
    centre is taken at input pixel ``(lost - 1) / 2 + stride * j`` (the cells centred in the
    input: for "SAME"-padded networks such as EfficientNet-Lite2 and ResNet-50, ``lost = stride``
    and the centre is the middle of the cell's ``stride`` x ``stride`` block).
    """
    import torch

    fn = _trunk(enc)
    side = 256
    shapes = []
    with torch.inference_mode():
        for w in (side, 2 * side):
            x = torch.zeros(1, 3, side, w, device=device).contiguous(memory_format=torch.channels_last)
            y = fn(x)
            if not isinstance(y, torch.Tensor) or y.ndim != 4:
                shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
                msg = (f"encoder {enc.name!r} returns {shape}, not a feature map (B, C, h, w): the dense path needs a "
                       "convolutional encoder (efficientnet_lite2, resnet50 or a module returning a map); "
                       "use method='patch'.")
                raise InputError(msg)
            shapes.append(tuple(y.shape))
    (_, c, _, w1), (_, _, _, w2) = shapes
    stride = side / max(w2 - w1, 1e-9)
    if w2 <= w1 or abs(stride - round(stride)) > 1e-6:
        msg = (f"encoder {enc.name!r} maps widths {side} and {2 * side} to {w1} and {w2} cells: not a fully "
               "convolutional map with an integer stride; use method='patch'.")
        raise InputError(msg)
    stride = int(round(stride))
    lost = side - stride * (w1 - 1)
    return stride, int(lost), int(c)
