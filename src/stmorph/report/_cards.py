"""One card per domain: size and share, where it lies, its markers, its gene sets, what it looks like.

Small maps and H&E patch strips are drawn with Pillow (milliseconds each; matplotlib would take a
second per card) and embedded as images.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from .. import _spatial
from ..errors import InputError
from ._image import SectionImage, data_uri, encode
from ._parts import _esc


def embedding_key(adata, method: str) -> str | None:
    """The representation ``obs[method]`` was clustered on: ``uns[method]["params"]["use_rep"]``, else
    ``obsm["X_<method>"]``; ``None`` when neither is there."""
    params = adata.uns.get(method, {}).get("params", {}) if isinstance(adata.uns.get(method), Mapping) else {}
    rep = params.get("use_rep") if isinstance(params, Mapping) else None
    for key in (rep, f"X_{method}"):
        if isinstance(key, str) and key in adata.obsm:
            return key
    return None


def representative_spots(adata, key: str, label: str, n: int, *, rep: str | None) -> list[int]:
    """Row indices of the ``n`` spots of domain ``label`` nearest its centre in ``obsm[rep]`` (the mean of
    its spots there); in space when ``rep`` is ``None``. Ties are broken by spot order."""
    member = np.flatnonzero(adata.obs[key].astype(str).to_numpy() == label)
    if member.size == 0:
        return []
    X = np.asarray(adata.obsm[rep], dtype=np.float64)[member] if rep else _spatial.coordinates(adata)[member]
    finite = np.isfinite(X).all(axis=1)
    member, X = member[finite], X[finite]
    if member.size == 0:
        return []
    d = ((X - X.mean(axis=0)) ** 2).sum(axis=1)
    return member[np.argsort(d, kind="stable")[:n]].tolist()


class MapPainter:
    """Small maps of one domain over a faded H&E, all drawn on one background read once."""

    def __init__(self, adata, image: SectionImage, *, width: int = 260, library_id: str | None = None):
        from ..pl._utils import spot_shape

        xy = _spatial.coordinates(adata)
        self.shape, size, self.angle = spot_shape(adata, xy, library_id=library_id)
        pad = 1.0 * size
        x0, y0 = xy.min(axis=0) - pad
        x1, y1 = xy.max(axis=0) + pad
        self.f = width / float(x1 - x0)
        self.w, self.h = int(width), max(1, int(round((y1 - y0) * self.f)))
        self.xy = (xy - [x0, y0]) * self.f
        self.size = max(size * self.f, 1.5)
        if image:
            bg = image.region(x0, y0, x1 - x0, y1 - y0, self.w, self.h).astype(np.float32)
            self.bg = (255 - (255 - bg) * 0.45).astype(np.uint8)  # faded: the domain's colour carries the map
        else:
            self.bg = np.full((self.h, self.w, 3), 250, np.uint8)

    def draw(self, mask: np.ndarray, color: str) -> bytes:
        from PIL import Image, ImageDraw

        from ..pl._utils import tile_vertices

        im = Image.fromarray(self.bg.copy())
        dr = ImageDraw.Draw(im)
        others = self.xy[~mask]
        r = self.size / 2
        for x, y in others:  # the rest of the tissue, light grey
            dr.ellipse([x - r * 0.5, y - r * 0.5, x + r * 0.5, y + r * 0.5], fill=(200, 200, 200))
        pts = self.xy[mask]
        if self.shape in ("hex", "square"):
            for poly in tile_vertices(pts, self.shape, self.size, self.angle):
                dr.polygon([tuple(p) for p in poly], fill=color)
        else:
            for x, y in pts:
                dr.ellipse([x - r, y - r, x + r, y + r], fill=color)
        return encode(np.asarray(im), "PNG")


def patch_strip(adata, image: SectionImage, rows: list[int], color: str, *, side_um: float = 110.0,
                out: int = 112, min_source_px: int = 32, library_id: str | None = None) -> bytes | None:
    """H&E patches centred on ``rows`` side by side (``side_um`` micrometres each, at least two spot diameters),
    the spot's outline drawn in the domain's colour; ``None`` when the image holds fewer than
    ``min_source_px`` pixels across a patch."""
    if not image or not rows:
        return None
    from PIL import Image, ImageDraw

    from ..pl._utils import spot_diameter

    xy = _spatial.coordinates(adata)
    diam = spot_diameter(adata, library_id=library_id)
    try:  # side_um, and at least two spot diameters (legacy ST spots are 100 um across)
        side = max(side_um / _spatial.microns_per_pixel(adata, library_id), 2 * diam)
    except InputError:  # no physical scale: two spot diameters
        side = 2 * diam
    if side * image.scale < min_source_px:  # e.g. a 600-px lowres image: a blur, not a picture of the tissue
        return None
    gap = 4
    strip = Image.new("RGB", (len(rows) * (out + gap) - gap, out), (255, 255, 255))
    for j, i in enumerate(rows):
        x, y = xy[i]
        p = Image.fromarray(image.region(x - side / 2, y - side / 2, side, side, out, out))
        d = ImageDraw.Draw(p)
        r = diam / side * out / 2
        c = out / 2
        d.ellipse([c - r, c - r, c + r, c + r], outline=color, width=2)
        strip.paste(p, (j * (out + gap), 0))
    return encode(np.asarray(strip), "JPEG", quality=82)


def card_html(
    *,
    label: str,
    name: str,
    color: str,
    n_spots: int,
    n_total: int,
    map_png: bytes,
    markers: pd.DataFrame | None,
    gsea: pd.DataFrame | None,
    patches: bytes | None,
    composition: list[tuple[str, float]] | None,
    method: str,
    border: pd.Series | None = None,
    distinct: bool = True,
    by_image: bool = False,
) -> str:
    """The HTML of one domain card; ``border``: the domain's row of :func:`stmorph.ev.border_domains`, noted
    on the card when the domain lies along the section's border (the caution itself is given once, above the
    cards, by :func:`border_note`); ``distinct=False``: none of ``markers`` is the domain's own; ``by_image``: the
    image set the domain apart from one of the same expression."""
    parts = [f'<article class="card" id="domain-{_esc(label)}">',
             f'<h3><i class="sw" style="background:{_esc(color)}"></i>{_esc(name)}</h3>',
             f'<p class="stat"><b>{n_spots}</b> spots · <b>{100 * n_spots / max(n_total, 1):.1f}%</b> of the tissue']
    if composition:
        comp = ", ".join(f"{100 * f:.0f}% {_esc(a)}" for a, f in composition)
        parts.append(f" · annotated as {comp}")
    parts.append("</p>")
    if border is not None and bool(border["along_border"]):
        parts.append(f'<p class="warn">Along the section\'s border: {100 * border["share_in_band"]:.0f}% of its spots '
                     f'lie on the outermost row of spots, against {100 * border["section_share_in_band"]:.0f}% of the '
                     'section (<a href="#border-note">why this matters</a>).</p>')
    parts.append('<div class="cardrow">')
    parts.append(f'<img class="map" alt="where {_esc(method)} domain {_esc(label)} lies" '
                 f'src="{data_uri(map_png, "image/png")}">')
    parts.append('<div class="cardtables">')
    if markers is not None and len(markers):
        rows = "".join(
            f"<tr><td><i>{_esc(r.gene)}</i></td><td class=num>{r.logfoldchange:.2f}</td>"
            f"<td class=num>{r.score:.1f}</td>"
            f"<td class=num>{_p(r.pval_adj)}</td><td class=num>{100 * r.pct_in:.0f}</td>"
            f"<td class=num>{100 * r.pct_out:.0f}</td></tr>"
            for r in markers.itertuples())
        parts.append('<table class="mk"><tr><th>marker</th><th title="log2 fold change vs the rest">log2 FC</th>'
                     '<th title="Wilcoxon rank-sum z score">z</th><th>adj. p</th><th title="% of spots expressing, '
                     'inside the domain">% in</th><th title="% outside">% out</th></tr>' + rows + "</table>")
    else:
        parts.append('<p class="note">No up-regulated marker gene.</p>')
    if not distinct and markers is not None and len(markers):
        parts.append('<p class="note">No distinct marker gene: each gene above is up-regulated here, but more '
                     "strongly in another domain"
                     + ("; the H&amp;E, not the expression, sets this domain apart" if by_image else "") + ".</p>")
    if gsea is not None:
        if len(gsea):
            rows = "".join(f"<tr><td>{_esc(_short_term(r.term))}</td><td class=num>{r.nes:.2f}</td>"
                           f"<td class=num>{_p(r.fdr)}</td></tr>" for r in gsea.itertuples())
            parts.append('<table class="gs"><tr><th>gene set</th><th>NES</th><th>FDR</th></tr>' + rows + "</table>")
        else:
            parts.append('<p class="note">No gene set enriched.</p>')
    parts.append("</div></div>")
    if patches is not None:
        parts.append(f'<figure class="patches"><img alt="representative H&amp;E of domain {_esc(label)}" '
                     f'src="{data_uri(patches, "image/jpeg")}"></figure>')
    parts.append("</article>")
    return "".join(parts)


def border_note(n_cards: int) -> str:
    """The caution about domains along the section's border, once for the ``n_cards`` cards that carry it."""
    return (f'<p class="warn" id="border-note">{n_cards} domain(s) lie along the section\'s border (marked on '
            "their cards). A cut edge often looks and measures differently from the tissue inside; check on the "
            "H&amp;E that such a domain is a tissue structure (fat at the edge of a biopsy, a capsule, a surface "
            "layer) and not an edge artefact.</p>")


def _p(p: float) -> str:
    if p != p:
        return "-"
    return f"{p:.1e}" if p < 1e-3 else f"{p:.3f}"


def _short_term(term: str, n: int = 48) -> str:
    t = str(term)
    return t if len(t) <= n else t[: n - 1] + "…"
