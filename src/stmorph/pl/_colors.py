"""Consistent domain colours across panels.

Cluster labels of different methods are arbitrary ("3" of one method may be
"0" of another). Each panel's labels are matched to a reference labelling
(the annotation when present, else the first panel) by a maximum-overlap
one-to-one assignment on their contingency table (Hungarian algorithm,
:func:`scipy.optimize.linear_sum_assignment`), and a matched label takes the
colour of its reference label. Unmatched labels get colours no reference label
uses, so two different regions never share a colour within a panel.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

__all__ = ["PALETTE", "MISSING_COLOR", "palette", "match_labels", "domain_colors", "label_order"]

#: Colour-blind-safe domain colours. The first seven are Okabe & Ito's palette (black left out: it hides the
#: H&E); the next nine were added one at a time from Paul Tol's schemes, each the candidate keeping the largest
#: minimum CIELAB distance to those before it (and to :data:`MISSING_COLOR`) under normal vision and simulated
#: protanopia, deuteranopia and tritanopia (Machado et al. 2009, severity 1). The first eleven stay at least
#: 15 Delta-E apart under all four (checked in ``tests/test_pl.py``); beyond 16 domains no palette stays safe.
PALETTE = [
    "#0072b2", "#e69f00", "#009e73", "#cc79a7", "#56b4e9", "#d55e00", "#f0e442",  # Okabe-Ito
    "#663333", "#332288", "#aa3377", "#99ddff", "#117733", "#999933", "#004488", "#882255", "#ee6677",  # Tol
]
#: Colour of unlabelled / ignored spots (e.g. "undetermined").
MISSING_COLOR = "#d3d3d3"


def palette(n: int) -> list[str]:
    """``n`` distinct colours: :data:`PALETTE` (colour-blind safe), then tab20/b/c, then evenly spaced hues."""
    cols = list(PALETTE)
    if n > len(cols):
        from matplotlib import colormaps
        from matplotlib.colors import to_hex

        for name in ("tab20", "tab20b", "tab20c"):
            cols += [to_hex(c) for c in colormaps[name].colors]
    cols = list(dict.fromkeys(c.lower() for c in cols))  # tab20c repeats some tab20 colours
    if n > len(cols):
        from matplotlib.colors import hsv_to_rgb, to_hex

        extra = n - len(cols)
        cols += [to_hex(hsv_to_rgb((i / extra, 0.65, 0.85))) for i in range(extra)]
    return cols[:n]


def _natural(s: str):
    try:
        return (0, float(s), "")
    except ValueError:
        return (1, 0.0, s)


def label_order(labels: pd.Series) -> list[str]:
    """Labels as strings in categorical order when categorical, else in natural order ("2" < "10")."""
    s = labels.dropna()
    if isinstance(labels.dtype, pd.CategoricalDtype):
        present = set(s.astype(str))
        return [str(c) for c in labels.cat.categories if str(c) in present]
    return sorted({str(x) for x in s}, key=_natural)


def match_labels(reference: pd.Series, labels: pd.Series) -> dict[str, str]:
    """One-to-one mapping label -> reference label maximising the number of shared spots.

    Both are Series indexed by spot name (joined by name). Labels that cannot be matched (more labels than
    reference labels, or no shared spot) are absent from the result.
    """
    from scipy.optimize import linear_sum_assignment

    ref = reference.dropna().astype(str)
    lab = labels.dropna().astype(str)
    common = ref.index.intersection(lab.index)
    if len(common) == 0:
        return {}
    ref, lab = ref.loc[common], lab.loc[common]
    table = pd.crosstab(lab, ref)  # rows: labels, cols: reference labels
    rows, cols = linear_sum_assignment(-table.to_numpy())
    return {
        str(table.index[r]): str(table.columns[c]) for r, c in zip(rows, cols, strict=True) if table.iat[r, c] > 0
    }


def domain_colors(
    adata,
    keys: Sequence[str],
    *,
    reference: str | None = "auto",
    match: bool = True,
    ignore: Sequence[str] = ("undetermined",),
) -> dict[str, dict[str, str]]:
    """Colour of every label of every ``obs`` key: ``{key: {label: "#rrggbb"}}``.

    ``reference="auto"`` uses ``obs["annotation"]`` when present, else the first key. Labels listed in
    ``ignore`` (case-insensitive) are drawn in :data:`MISSING_COLOR`.
    """
    keys = list(keys)
    ignored = {str(x).lower() for x in ignore}
    if reference == "auto":
        reference = "annotation" if "annotation" in adata.obs else (keys[0] if keys else None)
    out: dict[str, dict[str, str]] = {}

    def scored(s: pd.Series) -> pd.Series:
        s = s.dropna().astype(str)
        return s[~s.str.lower().isin(ignored)]

    ref_colors: dict[str, str] = {}
    if reference is not None:
        ref_series = adata.obs[reference]
        ref_labels = [x for x in label_order(ref_series) if x.lower() not in ignored]
        n_max = max([len(ref_labels)] + [len(label_order(adata.obs[k])) for k in keys])
        pal = palette(n_max + len(ref_labels) + 1)
        ref_colors = {lab: pal[i] for i, lab in enumerate(ref_labels)}
        out[reference] = dict(ref_colors)
        ref_s = scored(ref_series)
    for key in keys:
        if key == reference:
            out[key] = _with_missing(out[key], adata.obs[key], ignored)
            continue
        labels = label_order(adata.obs[key])
        n = len(labels)
        if not match or reference is None:
            pal = palette(n)
            out[key] = _with_missing({lab: pal[i] for i, lab in enumerate(labels)}, adata.obs[key], ignored)
            continue
        mapping = match_labels(ref_s, scored(adata.obs[key]))
        used = {ref_colors[m] for m in mapping.values()}
        spare = [c for c in palette(n + len(ref_colors) + 1) if c not in ref_colors.values() and c not in used]
        cmap: dict[str, str] = {}
        for lab in labels:
            if lab.lower() in ignored:
                continue
            if lab in mapping:
                cmap[lab] = ref_colors[mapping[lab]]
            else:
                cmap[lab] = spare.pop(0)
        out[key] = _with_missing(cmap, adata.obs[key], ignored)
    if reference is not None:
        out[reference] = _with_missing(out[reference], adata.obs[reference], ignored)
    return out


def _with_missing(cmap: dict[str, str], series: pd.Series, ignored: set[str]) -> dict[str, str]:
    for lab in label_order(series):
        if lab.lower() in ignored:
            cmap[lab] = MISSING_COLOR
    return cmap


def colors_array(series: pd.Series, cmap: dict[str, str]) -> np.ndarray:
    """RGBA array (n, 4) for a Series of labels; missing labels get :data:`MISSING_COLOR`."""
    from matplotlib.colors import to_rgba

    lut = {k: to_rgba(v) for k, v in cmap.items()}
    miss = to_rgba(MISSING_COLOR)
    return np.array([lut.get(str(x), miss) if pd.notna(x) else miss for x in series], dtype=float)
