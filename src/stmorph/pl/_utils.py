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


def spot_lattice(xy: np.ndarray) -> tuple[str, float, float]:
    """The grid the spots sit on: ``(kind, spacing, angle)``.

    ``kind`` is ``"hex"`` (Visium: six neighbours at one distance), ``"square"`` (legacy ST, Visium HD bins:
    four) or ``"irregular"``; ``spacing`` is the median centre-to-centre distance of nearest neighbours
    (full-resolution pixels, or the units of ``xy``) and ``angle`` the direction of the grid's rows (radians).
    """
    xy = np.asarray(xy, dtype=np.float64)
    if len(xy) < 8:
        return "irregular", 0.0, 0.0
    from scipy.spatial import cKDTree

    d, idx = cKDTree(xy).query(xy, k=7)
    spacing = float(np.median(d[:, 1]))
    if not spacing > 0:
        return "irregular", 0.0, 0.0
    near = (d[:, 1:] < 1.15 * spacing) & (d[:, 1:] > 0.85 * spacing)
    n_near = np.median(near.sum(axis=1))
    kind = "hex" if n_near >= 5 else "square" if n_near >= 3 else "irregular"
    if kind == "irregular":
        return kind, spacing, 0.0
    vec = xy[idx[:, 1:]] - xy[:, None, :]
    ang = np.arctan2(vec[..., 1], vec[..., 0])[near]
    fold = 6 if kind == "hex" else 4  # rows repeat every 60 (hex) or 90 (square) degrees
    angle = float(np.angle(np.exp(1j * fold * ang).mean()) / fold)
    return kind, spacing, angle


def _is_bin_grid(adata, library_id: str | None, kind: str, spacing: float) -> bool:
    """Whether the spots are square bins that tile their grid (Visium HD): ``technology == "visium_hd"``, or a
    square grid whose recorded spot diameter is (nearly) the grid spacing."""
    if kind != "square":
        return False
    try:
        lib = _spatial.library(adata, library_id)
    except (InputError, KeyError, AttributeError):
        return False
    if (lib.get("metadata") or {}).get("technology") == "visium_hd":
        return True
    d = (lib.get("scalefactors") or {}).get("spot_diameter_fullres")
    return bool(d) and spacing > 0 and float(d) >= 0.9 * spacing


def spot_shape(adata, xy: np.ndarray | None = None, *, shape: str = "auto", library_id: str | None = None,
               spot_size: float | None = None) -> tuple[str, float, float]:
    """The shape to draw spots with: ``(shape, size, angle)`` in full-resolution pixels.

    ``shape="auto"``: each spot at its true footprint. Visium HD bins are squares of the bin size (they tile
    their grid); every other spot is a circle of its recorded diameter (``spot_diameter_fullres``): on Visium
    55 um circles at a 100 um pitch, on legacy ST 100 um circles at a 200 um pitch, with the H&E between them.
    ``"circle"`` forces circles of the true diameter; ``"hex"``/``"square"`` force tiles as wide as the grid
    spacing, so that neighbours touch (larger than the spots, unless they are bins). ``spot_size``
    (full-resolution pixels) overrides the size.
    """
    allowed = ("auto", "circle", "hex", "square")
    if shape not in allowed:
        msg = f"spot_shape must be one of {allowed}; got {shape!r}."
        raise InputError(msg)
    def true_diameter() -> float:
        return spot_diameter(adata, library_id=library_id, spot_size=spot_size)

    if shape == "circle":
        return "circle", true_diameter(), 0.0
    xy = _spatial.coordinates(adata) if xy is None else xy
    kind, spacing, angle = spot_lattice(xy)
    if shape == "auto":
        if _is_bin_grid(adata, library_id, kind, spacing):
            return "square", spot_size or _recorded_or(adata, library_id, spacing), angle
        return "circle", true_diameter(), 0.0
    return shape, spot_size or (spacing if spacing > 0 else true_diameter()), angle if kind == shape else 0.0


def _recorded_or(adata, library_id: str | None, default: float) -> float:
    try:
        return _spatial.spot_diameter_fullres(adata, library_id)
    except (InputError, KeyError):
        return default


def tile_vertices(xy: np.ndarray, shape: str, size: float, angle: float = 0.0) -> np.ndarray:
    """Polygon corners ``(n, k, 2)`` of hexagon or square tiles of width ``size`` (flat side to flat side)
    centred on ``xy``, their flat sides facing the grid's neighbours along ``angle``."""
    k = 6 if shape == "hex" else 4
    radius = size / 2 / np.cos(np.pi / k)  # centre-to-corner for an inscribed width of size / 2
    theta = angle + np.pi / k + 2 * np.pi * np.arange(k) / k
    corners = radius * np.c_[np.cos(theta), np.sin(theta)]  # (k, 2)
    return np.asarray(xy, dtype=np.float64)[:, None, :] + corners[None]


def draw_spots(ax, xy: np.ndarray, diameter: float, colors, *, shape: str = "circle", angle: float = 0.0,
               zorder: float = 2, alpha: float = 1.0, **kw):
    """Spots in data units centred on ``xy``: filled circles of diameter ``diameter``, or hexagon/square tiles
    of that width (``shape="hex"``/``"square"``, rotated by ``angle``)."""
    n = len(xy)
    if shape in ("hex", "square"):
        from matplotlib.collections import PolyCollection

        coll = PolyCollection(tile_vertices(xy, shape, diameter, angle), zorder=zorder, alpha=alpha,
                              linewidths=0, antialiaseds=False, **kw)
    else:
        from matplotlib.collections import EllipseCollection

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


#: Above this many Visium HD bins, panels draw the bins as an image (one pixel per bin) instead of polygons.
BINS_AS_IMAGE_MIN = 50_000


def bin_grid(adata, xy: np.ndarray, *, library_id: str | None = None, min_bins: int = BINS_AS_IMAGE_MIN):
    """How to draw many Visium HD square bins as one image: ``(rows, cols, (n_rows, n_cols), extent, pitch)``.

    ``rows``/``cols`` index each bin's pixel in an ``n_rows x n_cols`` image of the array grid, ``extent`` is
    ``(left, right, bottom, top)`` in full-resolution pixels for ``imshow`` and ``pitch`` the bin side in pixels.
    None unless the section is ``technology == "visium_hd"`` with more than ``min_bins`` bins on a grid aligned
    with the image axes (rotated by less than half a bin across the section).
    """
    try:
        meta = _spatial.library(adata, library_id).get("metadata") or {}
    except (InputError, KeyError, AttributeError):
        return None
    if meta.get("technology") != "visium_hd" or adata.n_obs <= min_bins:
        return None
    if "array_row" not in adata.obs or "array_col" not in adata.obs:
        return None
    rows = np.asarray(adata.obs["array_row"], dtype=np.int64)
    cols = np.asarray(adata.obs["array_col"], dtype=np.int64)
    A = np.column_stack([cols, rows, np.ones(len(rows))]).astype(np.float64)
    coef, *_ = np.linalg.lstsq(A, np.asarray(xy, dtype=np.float64), rcond=None)  # rows: d/dcol, d/drow, offset
    (xc, yc), (xr, yr) = coef[0], coef[1]
    r0, r1, c0, c1 = rows.min(), rows.max(), cols.min(), cols.max()
    if not (abs(xc) > 0 and abs(yr) > 0) or abs(xr) * (r1 - r0 + 1) > 0.5 * abs(xc) \
            or abs(yc) * (c1 - c0 + 1) > 0.5 * abs(yr):
        return None
    x = lambda c: xc * c + xr * (r0 + r1) / 2 + coef[2, 0]
    y = lambda r: yr * r + yc * (c0 + c1) / 2 + coef[2, 1]
    extent = (x(c0 - 0.5), x(c1 + 0.5), y(r1 + 0.5), y(r0 - 0.5))
    return rows - r0, cols - c0, (int(r1 - r0 + 1), int(c1 - c0 + 1)), extent, float((abs(xc) + abs(yr)) / 2)


def draw_bins_image(ax, grid, colors: np.ndarray, *, scale: float = 1.0, alpha: float = 1.0, zorder: float = 2):
    """Draw square bins as one RGBA image (one pixel per bin, transparent where there is no bin), placed by
    ``imshow``'s extent over the full-resolution coordinates times ``scale``; ``grid`` from :func:`bin_grid`."""
    rr, cc, (nr, nc), extent, _ = grid
    img = np.zeros((nr, nc, 4), dtype=np.float32)
    colors = np.asarray(colors, dtype=np.float32)
    img[rr, cc, :3] = colors[:, :3]
    img[rr, cc, 3] = colors[:, 3] * alpha
    return ax.imshow(img, extent=[e * scale for e in extent], origin="upper", interpolation="nearest",
                     zorder=zorder)
