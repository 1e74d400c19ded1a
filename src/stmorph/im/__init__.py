"""Images: lazy whole-slide access, spot-centred patches, pretrained encoders, image features."""
