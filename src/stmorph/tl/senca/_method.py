"""SENCA-st as a method of :func:`stmorph.tl.run_methods` (``obs["senca"]``)."""

from __future__ import annotations

from .._methods import register_method


def _run_senca(adata, run) -> None:
    from ._senca import senca

    k = run.expression_count()  # SENCA-st needs a count: given, or the expression baseline's
    opts = {"random_state": run.random_state, "device": run.device, "progress": run.progress,
            "encoder": run.encoder, "encoder_weights": run.encoder_weights}
    if run.image is not None:
        opts["image"] = run.image
    if not {"config", "patch_radius_spacings", "image_key"} & set(run.senca_options):
        # SENCA-st's patches (radius 3 spacings) are the run's shared context patches
        opts["image_key"] = run.patch_key("context")[0]
    opts.update(run.senca_options)
    run.step("senca", senca, adata, k, **opts)


register_method("senca", _run_senca, image="optional", patches=("context",),
                summary="SENCA-st (Liyanaarachchi et al.): graph transformer + CNN, neighbourhood cross-attention, "
                        "agglomerative clustering")
