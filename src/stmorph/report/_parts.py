"""HTML building blocks of the report: escaping, number formatting, tables, embedded figures."""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Mapping, Sequence


def _esc(x) -> str:
    return html.escape("" if x is None else str(x), quote=True)


def _fmt(v) -> str:
    if isinstance(v, float):
        if v != v:  # NaN
            return "-"
        return f"{v:.3g}" if (abs(v) < 1e-3 and v != 0) or abs(v) >= 1e5 else f"{v:.3f}".rstrip("0").rstrip(".")
    if isinstance(v, Mapping | list | tuple):
        return json.dumps(v, default=str)
    return str(v)


def _table(rows: Sequence[Sequence], header: Sequence[str], *, numeric: set[int] | None = None,
           highlight: int | None = None) -> str:
    numeric = numeric or set()
    out = ["<table>", "<tr>" + "".join(f"<th>{_esc(h)}</th>" for h in header) + "</tr>"]
    for j, r in enumerate(rows):
        cells = []
        for i, v in enumerate(r):
            cls = ' class="num"' if i in numeric else ""
            cells.append(f"<td{cls}>{_esc(_fmt(v))}</td>")
        tr = '<tr class="chosen">' if j == highlight else "<tr>"
        out.append(tr + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _kv_table(d: Mapping) -> str:
    return _table([(k, v) for k, v in d.items()], ["parameter", "value"])


def _figure(fig, caption: str, *, dpi: int = 110, photo: bool = False) -> str:
    """A matplotlib figure as an embedded image: PNG, or JPEG (quality 88, no chroma subsampling, so
    legend text stays sharp) for figures over the H&E, where PNG would be 4-5x larger."""
    import io

    from ..pl._utils import fig_to_png_bytes, pyplot

    png = fig_to_png_bytes(fig, dpi=dpi)
    pyplot().close(fig)
    mime = "image/png"
    if photo:
        from PIL import Image

        buf = io.BytesIO()
        Image.open(io.BytesIO(png)).convert("RGB").save(buf, "JPEG", quality=88, subsampling=0, optimize=True)
        png, mime = buf.getvalue(), "image/jpeg"
    data = base64.b64encode(png).decode("ascii")
    return (f'<figure><img alt="{_esc(caption)}" src="data:{mime};base64,{data}">'
            f"<figcaption>{_esc(caption)}</figcaption></figure>")
