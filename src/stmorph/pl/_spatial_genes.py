"""Spatial expression of chosen genes over the H&E (like Seurat's ``SpatialFeaturePlot``)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import sparse

from .. import _spatial
from ..errors import InputError
from . import _utils


def gene_values(adata, genes: Sequence[str], *, layer: str | None = None, normalize: bool | str = "auto",
                target_sum: float = 1e4) -> np.ndarray:
    """Log-normalised expression (n_obs, n_genes) of ``genes`` computed from counts; ``adata`` is unchanged."""
    from ..ev._markers import _looks_like_counts

    missing = [g for g in genes if g not in adata.var_names]
    if missing:
        msg = f"genes {missing} not in adata.var_names (e.g. {list(adata.var_names[:5])})."
        raise InputError(msg)
    X = adata.layers[layer] if layer is not None else adata.X
    idx = adata.var_names.get_indexer(list(genes))
    cols = X[:, idx]
    cols = cols.toarray() if sparse.issparse(cols) else np.asarray(cols)
    cols = cols.astype(np.float64)
    do_norm = _looks_like_counts(X) if normalize == "auto" else bool(normalize)
    if do_norm:
        totals = np.asarray(X.sum(axis=1), dtype=np.float64).ravel()
        cols = np.log1p(cols / np.maximum(totals, 1e-12)[:, None] * target_sum * (totals > 0)[:, None])
    return cols


def spatial(
    adata,
    genes: str | Sequence[str],
    *,
    library_id: str | None = None,
    image=True,
    layer: str | None = None,
    normalize: bool | str = "auto",
    cmap: str = "viridis",
    ncols: int | None = None,
    spot_size: float | None = None,
    vmax: str | float | None = "p99",
    alpha: float = 0.8,
    spot_shape: str = "auto",
    save=None,
    dpi: int = 120,
):
    """Spatial expression of genes, one panel per gene, over the H&E image.

    Values are ``log1p(counts / total * 1e4)`` computed on the fly (``normalize="auto"``: only when the matrix
    holds counts). ``vmax="p99"`` clips the colour scale at the 99th percentile. Other parameters as in
    :func:`stmorph.pl.domains`.

    Returns
    -------
    The matplotlib Figure.
    """
    genes = [genes] if isinstance(genes, str) else list(genes)
    if not genes:
        msg = "genes is empty."
        raise InputError(msg)
    vals = gene_values(adata, genes, layer=layer, normalize=normalize)
    fig = draw_values(adata, vals, genes, library_id=library_id, image=image, cmap=cmap, ncols=ncols,
                      spot_size=spot_size, vmax=vmax, alpha=alpha, spot_shape=spot_shape, label="log1p(norm.)",
                      italic=True)
    fig.tight_layout()
    _utils.save_figure(fig, save, dpi=dpi)
    return fig


def draw_values(adata, vals: np.ndarray, titles: Sequence[str], *, library_id: str | None = None, image=True,
                cmap: str = "viridis", ncols: int | None = None, spot_size: float | None = None,
                vmin: float = 0.0, vmax: str | float | None = "p99", alpha: float = 0.8, spot_shape: str = "auto",
                label: str = "", italic: bool = False, low_first: bool = True):
    """One panel per column of ``vals`` ``(n_obs, k)``: each spot coloured by its value over the H&E. ``vmax``:
    ``"p99"`` (the column's 99th percentile), a number, or None (its maximum); ``low_first=False`` draws low
    values last (on top), to show where they are."""
    import matplotlib as mpl

    xy = _spatial.coordinates(adata)
    img, scale = _utils.background(adata, library_id=library_id, image=image)
    shape, size, angle = _utils.spot_shape(adata, xy, shape=spot_shape, library_id=library_id, spot_size=spot_size)
    diameter = size * scale
    xy_img = xy * scale
    fig, axes = _utils.grid(len(titles), ncols, panel=(4.6, 4.2))
    cm = mpl.colormaps[cmap]
    for j, (ax, t) in enumerate(zip(axes, titles, strict=True)):
        v = np.asarray(vals[:, j], dtype=float)
        finite = v[np.isfinite(v)]
        top = float(finite.max()) if finite.size else 1.0
        hi = float(np.percentile(finite, 99)) if vmax == "p99" and finite.size else (
            float(vmax) if vmax not in (None, "p99") else top)
        hi = hi if hi > vmin else (top if top > vmin else vmin + 1.0)
        norm = mpl.colors.Normalize(vmin=vmin, vmax=hi)
        _utils.setup_axis(ax, img, xy_img, diameter)
        order = np.argsort(v if low_first else -v)  # the values to see drawn last
        _utils.draw_spots(ax, xy_img[order], diameter, cm(norm(v[order])), shape=shape, angle=angle,
                          alpha=alpha if img is not None else 1.0)
        ax.set_title(t, fontsize=12, style="italic" if italic else "normal")
        sm = mpl.cm.ScalarMappable(norm=norm, cmap=cm)
        fig.colorbar(sm, ax=ax, fraction=0.04, pad=0.02, label=label)
    return fig
