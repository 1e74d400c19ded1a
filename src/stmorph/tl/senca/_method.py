"""SENCA-st as a registered method (``obs["senca"]``): its two options and the adapter to :func:`senca`."""

from __future__ import annotations

from .. import _steps
from .._methods import register_method
from .._options import Option, between
from ._config import PRESETS


def run_senca(adata, *, n_clusters: int | None = None, senca_epochs: int | None = None,
              senca_preset: str = "default", encoder: str = "efficientnet_lite2", encoder_weights: str | None = None,
              device: str = "auto", image=None, random_state: int = 0, progress: bool = True) -> None:
    """:func:`stmorph.tl.senca` with the preset and epochs given, reading the run's shared context patch (radius
    3 spacings, ``obsm["X_image_context"]``)."""
    from ._senca import senca

    with _steps.step("senca"):
        senca(adata, n_clusters, preset=senca_preset, image_key=_steps.feature_spec("context")[0], image=image,
              encoder=encoder, encoder_weights=encoder_weights, device=device, random_state=random_state,
              progress=progress, **({"epochs": senca_epochs} if senca_epochs is not None else {}))


OPTIONS = (
    Option("senca_epochs", "SENCA-st training epochs (without it: the preset's; the paper's 10)",
           between(1, 100_000, kind=int), metavar="N", group="SENCA-st"),
    Option("senca_preset", "SENCA-st configuration: default; literal (the first reading of the paper); mixture (30 "
           "epochs and a tied Gaussian mixture on S instead of the paper's agglomerative clustering)",
           choices=tuple(PRESETS), group="SENCA-st"),
)

register_method("senca", run_senca, image="optional", patches=("context",), declare=OPTIONS,
                options=("n_clusters", "senca_epochs", "senca_preset", "encoder", "encoder_weights", "device"),
                summary="SENCA-st (Liyanaarachchi et al.): graph transformer + CNN, neighbourhood cross-attention, "
                        "agglomerative clustering")
