"""Shared plotting helpers: background image, spot circles, figure grid, saving."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .. import _spatial
from .._outputs import atomic_write
from ..errors import InputError


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg", "pdf", "svg", "ps", "cairo") and not os.environ.get(
        "STMORPH_KEEP_BACKEND"
    ):
        matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def background(adata, *, library_id: str | None = None, image=True, max_side: int = 2000):
    """The image to draw spots over and its scale (image px per full-resolution px).

    Order: ``hires`` then ``lowres`` from ``uns["spatial"]`` (scaled by their scalefactor), else a thumbnail of
    the full-resolution slide (:func:`stmorph.im.slide_for`), else ``(None, 1.0)``. ``image=False`` gives no
    image; an array or a path uses that full-resolution image.
    """
    if image is False or image is None:
        return None, 1.0
    lib = None
    try:
        lib = _spatial.library(adata, library_id)
    except InputError:
        lib = None
    if image is True and lib is not None:
        imgs = lib.get("images", {}) or {}
        sf = lib.get("scalefactors", {}) or {}
        for name in ("hires", "lowres"):
            scale = sf.get(f"tissue_{name}_scalef")
            if name in imgs and scale:
                return _as_rgb(np.asarray(imgs[name])), float(scale)
    try:
        from ..im import slide_for

        kw = {} if image is True else {"image": image}
        with slide_for(adata, library_id=library_id, **kw) as slide:
            thumb, scale = slide.thumbnail(max_side)
        return _as_rgb(np.asarray(thumb)), float(scale)
    except (ImportError, AttributeError, InputError, OSError):
        if image is not True:
            raise
        return None, 1.0


def _as_rgb(img: np.ndarray) -> np.ndarray:
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    if img.shape[-1] == 4:
        img = img[..., :3]
    if img.dtype != np.uint8:
        x = img.astype(np.float64)
        hi = 1.0 if x.max() <= 1.0 else (255.0 if x.max() <= 255 else float(np.iinfo(img.dtype).max))
        img = np.clip(x / hi * 255.0, 0, 255).astype(np.uint8)
    return img


def spot_diameter(adata, *, library_id: str | None = None, spot_size: float | None = None) -> float:
    """Spot diameter in full-resolution pixels: ``spot_size``, else the scalefactor, else 0.8 x neighbour spacing."""
    if spot_size is not None:
        return float(spot_size)
    try:
        return _spatial.spot_diameter_fullres(adata, library_id)
    except (InputError, KeyError):
        pass
    xy = _spatial.coordinates(adata)
    if len(xy) < 2:
        return 1.0
    from scipy.spatial import cKDTree

    d, _ = cKDTree(xy).query(xy, k=2)
    return float(0.8 * np.median(d[:, 1]))


def draw_spots(ax, xy: np.ndarray, diameter: float, colors, *, zorder: float = 2, alpha: float = 1.0, **kw):
    """Filled circles of the true spot size (data units) centred on ``xy``."""
    from matplotlib.collections import EllipseCollection

    n = len(xy)
    coll = EllipseCollection(
        widths=np.full(n, diameter), heights=np.full(n, diameter), angles=np.zeros(n), units="xy",
        offsets=xy, offset_transform=ax.transData, zorder=zorder, alpha=alpha, linewidths=0, **kw,
    )
    if colors is not None:
        coll.set_facecolor(colors)
    ax.add_collection(coll)
    return coll


def setup_axis(ax, img, xy: np.ndarray, diameter: float) -> None:
    """Show ``img`` (if any), frame the spots with a margin, image orientation (y down), no ticks."""
    if img is not None:
        ax.imshow(img, zorder=0, interpolation="antialiased")
    pad = diameter * 1.5
    x0, y0 = xy.min(axis=0) - pad
    x1, y1 = xy.max(axis=0) + pad
    ax.set_xlim(x0, x1)
    ax.set_ylim(y1, y0)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    for s in ax.spines.values():
        s.set_visible(False)


def grid(n: int, ncols: int | None, *, panel: tuple[float, float] = (5.0, 5.0)):
    plt = pyplot()
    ncols = min(n, ncols or min(n, 4)) if n else 1
    nrows = int(np.ceil(max(n, 1) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(panel[0] * ncols, panel[1] * nrows), squeeze=False)
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.axis("off")
    return fig, flat[:n]


def save_figure(fig, save, *, dpi: int = 120) -> None:
    """Write ``fig`` to ``save`` atomically (temporary file in the same folder, then rename)."""
    if not save:
        return
    path = Path(save)
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = path.suffix.lstrip(".") or None  # the temporary name keeps the suffix; say it explicitly anyway
    atomic_write(path, lambda p: fig.savefig(p, dpi=dpi, bbox_inches="tight", format=fmt))


def fig_to_png_bytes(fig, *, dpi: int = 110) -> bytes:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()
