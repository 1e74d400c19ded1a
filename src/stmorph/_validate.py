"""Validation of an AnnData against stmorph's data model (filled in by the readers work)."""


def validate(adata, *, require_image: bool = False) -> None:  # replaced by the full validator
    from . import _spatial

    _spatial.coordinates(adata)
    _spatial.library_id(adata)
