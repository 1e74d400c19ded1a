"""Domains over the H&E, one panel per ``obs`` key, side by side, with matched colours."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from .. import _spatial
from ..errors import InputError
from . import _utils
from ._colors import MISSING_COLOR, colors_array, domain_colors, label_order


def domains(
    adata,
    keys: str | Sequence[str],
    *,
    library_id: str | None = None,
    image=True,
    match_colors: bool = True,
    ncols: int | None = None,
    spot_size: float | None = None,
    title: str | Sequence[str] | None = None,
    save=None,
    annotation: str | None = "annotation",
    show_scores: bool = True,
    ignore: Sequence[str] = ("undetermined",),
    alpha: float | None = None,
    spot_shape: str = "auto",
    labels: str | Mapping[str, Mapping[str, str]] | None = None,
    markers: Mapping[str, pd.DataFrame] | None = None,
    dpi: int = 120,
):
    """Spatial domains of one or more ``obs`` keys side by side over the H&E image.

    Parameters
    ----------
    adata
        Spots in ``obsm["spatial"]`` (full-resolution pixels); image and scalefactors in ``uns["spatial"]``.
    keys
        One ``obs`` column or several (e.g. ``["annotation", "stmic", "expression", "image", "senca"]``).
    library_id
        Which library of ``uns["spatial"]`` (needed only when there are several).
    image
        ``True``: hires, else lowres, else a thumbnail of the full-resolution slide, else none;
        ``False``: no image; a path or array: that full-resolution image.
    match_colors
        Match labels between panels (Hungarian assignment on the contingency table with ``obs[annotation]``
        when present, else with the first key) so the same region has the same colour.
    ncols
        Panels per row (default: one row up to 4 panels, then 3 per row up to 6, then 4).
    spot_size
        Spot size in full-resolution pixels (default: ``spot_diameter_fullres``, the spot's true diameter or
        the bin's side).
    title
        Figure title (str) or one title per panel (list).
    save
        Path to write the figure to (PNG/PDF/SVG by extension), written atomically.
    annotation
        Ground-truth column used for colour matching and, with ``show_scores``, ARI in panel titles.
    ignore
        Labels drawn grey and left out of matching and scoring.
    alpha
        Opacity of the spots over the H&E (0 = H&E only, 1 = opaque spots). Default: opaque circles, which keep
        the legend's colours and leave the H&E visible between spots; 0.6 for square bins, which cover the
        tissue. Spots without an image are opaque.
    spot_shape
        ``"auto"``: each spot at its true footprint, circles of ``spot_diameter_fullres`` (Visium: 55 um at a
        100 um pitch; legacy ST: 100 um at a 200 um pitch), squares of the bin size for Visium HD bins; more
        than 50,000 bins are drawn as one image, a pixel per bin, placed over the bins' extent. ``"circle"``:
        circles of the true diameter; ``"hex"``/``"square"``: tiles as wide as the grid spacing, touching.
    labels
        ``"markers"``: name each domain in the legend by its top two marker genes (``"3: KRT19, EPCAM"``;
        Wilcoxon test, see :func:`stmorph.pl.domain_names`); a mapping ``{key: {label: name}}``: those names
        (keys and labels left out keep their label); ``None``: the bare labels.
    markers
        Precomputed marker tables ``{key: stmorph.ev.markers(adata, key)}`` used by ``labels="markers"``.

    Returns
    -------
    The matplotlib Figure.
    """
    plt = _utils.pyplot()
    keys = [keys] if isinstance(keys, str) else list(keys)
    if not keys:
        msg = "keys is empty: pass at least one obs column with domains."
        raise InputError(msg)
    missing = [k for k in keys if k not in adata.obs]
    if missing:
        msg = f"obs keys {missing} not found (obs columns: {list(adata.obs.columns)})."
        raise InputError(msg)
    if not (labels is None or labels == "markers" or isinstance(labels, Mapping)):
        msg = f"labels must be None, 'markers' or a mapping {{key: {{label: name}}}}; got {labels!r}."
        raise InputError(msg)
    xy = _spatial.coordinates(adata)
    img, scale = _utils.background(adata, library_id=library_id, image=image)
    bins = _utils.bin_grid(adata, xy, library_id=library_id) if spot_shape in ("auto", "square") else None
    if bins is not None:  # many Visium HD bins: one image pixel per bin instead of a polygon each
        shape, size, angle = "square", spot_size or bins[4], 0.0
    else:
        shape, size, angle = _utils.spot_shape(adata, xy, shape=spot_shape, library_id=library_id,
                                               spot_size=spot_size)
    diameter = size * scale
    if alpha is None:
        alpha = 1.0 if shape == "circle" else 0.6
    xy_img = xy * scale
    has_ann = annotation is not None and annotation in adata.obs
    ref = annotation if has_ann else keys[0]
    cmaps = domain_colors(adata, keys, reference=ref if match_colors else None, match=match_colors, ignore=ignore)
    names: dict[str, dict[str, str]] = {}
    if isinstance(labels, Mapping):
        names = {str(k): {str(a): str(b) for a, b in v.items()} for k, v in labels.items()}
    elif labels == "markers":
        from ._names import domain_names

        markers = markers or {}
        for k in keys:
            if k != annotation:
                names[k] = domain_names(adata, k, markers=markers.get(k))

    n_lab_max = max(len(label_order(adata.obs[k])) for k in keys)
    ext = xy_img.max(axis=0) - xy_img.min(axis=0)
    aspect = float(ext[1] / ext[0]) if ext[0] > 0 else 1.0
    panel_w = 4.6
    longest = max((len(names.get(k, {}).get(lab, lab)) for k in keys for lab in label_order(adata.obs[k])),
                  default=1)
    legend_w = (0.55 + 0.075 * max(longest, 3)) * (1 if n_lab_max <= 16 else 2)
    n = len(keys)
    fig_ncols = min(n, ncols or (n if n <= 4 else 3 if n <= 6 else 4))
    nrows = int(np.ceil(len(keys) / fig_ncols))
    fig, axes = plt.subplots(
        nrows, fig_ncols, figsize=((panel_w + legend_w) * fig_ncols, max(panel_w * aspect, 3.0) * nrows + 0.6),
        squeeze=False,
    )
    flat = list(axes.ravel())
    for ax in flat[len(keys):]:
        ax.axis("off")
    titles = list(title) if title is not None and not isinstance(title, str) else [None] * len(keys)
    if len(titles) != len(keys):
        msg = f"title has {len(titles)} entries for {len(keys)} panels."
        raise InputError(msg)
    from matplotlib.lines import Line2D

    mark = {"hex": "h", "square": "s"}.get(shape, "o")

    for ax, key, t in zip(flat, keys, titles, strict=False):
        series = adata.obs[key]
        _utils.setup_axis(ax, img, xy_img, diameter)
        cols = colors_array(series, cmaps[key])
        if bins is not None:
            _utils.draw_bins_image(ax, bins, cols, scale=scale, alpha=alpha if img is not None else 1.0)
        else:
            _utils.draw_spots(ax, xy_img, diameter, cols, shape=shape, angle=angle,
                              alpha=alpha if img is not None else 1.0)
        if t is None:
            t = key
            if show_scores and has_ann and key != annotation:
                try:
                    from ..ev import ari

                    t = f"{key} (ARI {ari(adata, key, annotation=annotation, ignore=ignore):.2f})"
                except InputError:
                    pass
        ax.set_title(t, fontsize=12)
        handles = [
            Line2D([], [], marker=mark, linestyle="", markersize=8, markerfacecolor=cmaps[key].get(lab, MISSING_COLOR),
                   markeredgewidth=0, label=names.get(key, {}).get(lab, lab))
            for lab in label_order(series)
        ]
        if series.isna().any() and key == annotation:
            handles.append(Line2D([], [], marker=mark, linestyle="", markersize=8, markerfacecolor=MISSING_COLOR,
                                  markeredgewidth=0, label="unlabelled"))
        ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False, fontsize=9,
                  ncol=1 if len(handles) <= 16 else 2, handletextpad=0.2, borderaxespad=0.0)
    if isinstance(title, str):
        fig.suptitle(title, fontsize=13)
    fig.tight_layout()
    _utils.save_figure(fig, save, dpi=dpi)
    return fig

