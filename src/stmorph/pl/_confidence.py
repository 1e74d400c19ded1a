"""Maps of how sure the domains are, and of where the H&E changed them."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from .. import _spatial
from ..errors import InputError
from . import _utils
from ._colors import palette
from ._spatial_genes import draw_values


def confidence(adata, keys: str | Sequence[str] = "stmorph", *, library_id: str | None = None, image=True,
               cmap: str = "viridis", ncols: int | None = None, spot_size: float | None = None, alpha: float = 0.85,
               spot_shape: str = "auto", save=None, dpi: int = 120):
    """Each spot's confidence in its domain, ``obs[f"{key}_confidence"]``, one panel per key, over the H&E.

    The scale runs from 0 to 1 and low values are drawn on top, so uncertain boundaries stand out. What the
    confidence is (co-assignment frequency or posterior probability) is in ``uns[key]["confidence"]["kind"]``
    and in each panel's title.

    Returns
    -------
    The matplotlib Figure.
    """
    keys = [keys] if isinstance(keys, str) else list(keys)
    missing = [k for k in keys if f"{k}_confidence" not in adata.obs]
    if missing:
        msg = (f"no confidence for {missing}: obs[{missing[0] + '_confidence'!r}] is written by the methods "
               "(stmorph.tl.stmorph, stmic, senca).")
        raise InputError(msg)
    vals = np.column_stack([adata.obs[f"{k}_confidence"].to_numpy(dtype=float) for k in keys])
    titles = []
    for k in keys:
        kind = adata.uns.get(k, {}).get("confidence", {}).get("kind", "") if isinstance(adata.uns.get(k), dict) else ""
        titles.append(f"{k}: confidence" + (f" ({kind})" if kind else ""))
    fig = draw_values(adata, vals, titles, library_id=library_id, image=image, cmap=cmap, ncols=ncols,
                      spot_size=spot_size, vmin=0.0, vmax=1.0, alpha=alpha, spot_shape=spot_shape,
                      label="confidence", low_first=False)
    fig.tight_layout()
    _utils.save_figure(fig, save, dpi=dpi)
    return fig


def image_changes(adata, changes: pd.DataFrame | None = None, *, with_image: str = "stmorph",
                  without: str | None = None, library_id: str | None = None, image=True, max_regions: int = 8,
                  spot_size: float | None = None, spot_shape: str = "auto", save=None, dpi: int = 120):
    """Where the H&E changed the domains: the spots of :func:`stmorph.ev.image_changes`, coloured by region
    (the largest ``max_regions``; smaller ones grey), the other spots light, over the H&E; each region
    numbered at its centre.

    Returns
    -------
    The matplotlib Figure.
    """
    if changes is None:
        from ..ev import image_changes as compute

        changes = compute(adata, with_image, without)
    xy = _spatial.coordinates(adata)
    img, scale = _utils.background(adata, library_id=library_id, image=image)
    shape, size, angle = _utils.spot_shape(adata, xy, shape=spot_shape, library_id=library_id, spot_size=spot_size)
    fig, axes = _utils.grid(1, 1, panel=(6.0, 5.6))
    ax = axes[0]
    _utils.setup_axis(ax, img, xy * scale, size * scale)
    changed = adata.obs_names.isin(changes.index)
    _utils.draw_spots(ax, xy[~changed] * scale, size * scale, np.tile([0.85, 0.85, 0.85, 0.35], ((~changed).sum(), 1)),
                      shape=shape, angle=angle, alpha=1.0)
    cols = palette(max_regions)
    region = changes["region"].reindex(adata.obs_names[changed]).to_numpy()
    colors = [cols[int(r)] if r < max_regions else "#7f7f7f" for r in region]
    _utils.draw_spots(ax, xy[changed] * scale, size * scale, colors, shape=shape, angle=angle, alpha=0.95)
    for reg in changes.attrs.get("regions", [])[:max_regions]:
        ax.annotate(str(reg["region"] + 1), (reg["x"] * scale, reg["y"] * scale), ha="center", va="center",
                    fontsize=11, fontweight="bold", color="black",
                    bbox={"boxstyle": "circle,pad=0.2", "fc": "white", "ec": cols[reg["region"]], "alpha": 0.9})
    keys = changes.attrs.get("keys", (with_image, without or f"{with_image}_expr"))
    ax.set_title(f"{len(changes)} of {adata.n_obs} spots in another domain with the H&E ({keys[0]} vs {keys[1]})",
                 fontsize=11)
    fig.tight_layout()
    _utils.save_figure(fig, save, dpi=dpi)
    return fig
