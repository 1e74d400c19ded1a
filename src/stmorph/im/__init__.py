"""Images: lazy whole-slide access, spot-centred patches, pretrained encoders, image features."""

from ._patches import MultiPatchBatch, PatchBatch, crop_patches, iter_patches, iter_patches_multi, patch_size_px  # noqa: E402,E501
from .slide import Slide, open_slide, slide_for  # noqa: E402
from . import encoders  # noqa: E402
from ._features import features  # noqa: E402
from ._dense import dense_features  # noqa: E402
from ._tissue import tissue_mask  # noqa: E402
from .encoders import get_encoder, list_encoders, register_encoder  # noqa: E402

__all__ = [
    "open_slide", "Slide", "slide_for", "patch_size_px", "iter_patches", "iter_patches_multi", "PatchBatch",
    "MultiPatchBatch", "crop_patches",
    "features", "dense_features", "tissue_mask", "encoders", "get_encoder", "list_encoders", "register_encoder",
]
