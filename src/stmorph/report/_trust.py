"""The report's sections on trust: how sure each domain is and which boundaries are uncertain; what the H&E
changed, region by region (H&E patches and markers of each)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import pandas as pd

from .. import _spatial
from ..errors import StmorphError
from ._image import data_uri
from ._parts import _esc, _figure, _table

#: A spot below this confidence is uncertain.
UNCERTAIN = 0.5
#: Regions of the image changes shown one by one (the largest), and the fewest spots a region needs.
MAX_REGIONS, MIN_REGION_SPOTS = 6, 3


def uncertain_boundaries(adata, key: str, *, threshold: float = UNCERTAIN, top: int = 6) -> list[tuple]:
    """``(domain, neighbouring domain, uncertain spots)`` for the boundaries with the most spots below
    ``threshold`` confidence that touch the other domain (first ring of neighbours), most first."""
    from scipy.spatial import cKDTree

    conf = adata.obs[f"{key}_confidence"].to_numpy(dtype=float)
    lab = adata.obs[key].astype(str).to_numpy()
    low = np.flatnonzero(conf < threshold)
    if not low.size:
        return []
    xy = _spatial.coordinates(adata)
    tree = cKDTree(xy)
    counts: dict[tuple[str, str], int] = {}
    for i, nb in zip(low, tree.query_ball_point(xy[low], 1.5 * _spatial.spot_spacing(xy))):
        for other in {lab[j] for j in nb} - {lab[i]}:
            pair = tuple(sorted((lab[i], other)))
            counts[pair] = counts.get(pair, 0) + 1
    return [(a, b, n) for (a, b), n in sorted(counts.items(), key=lambda kv: -kv[1])[:top]]


def confidence_section(adata, method: str, methods, names: Mapping[str, str], log: Callable[[str], None]) -> str:
    """Where the domains are sure and where not: the confidence maps (the chosen method's and up to two
    others'), each domain's stability, and the boundaries with the most uncertain spots; "" without a
    confidence."""
    from .. import pl

    if f"{method}_confidence" not in adata.obs:
        return ""
    keys = [method] + [k for k in methods if k != method and f"{k}_confidence" in adata.obs]
    log("report: confidence")
    info = adata.uns.get(method, {}).get("confidence", {}) if isinstance(adata.uns.get(method), Mapping) else {}
    kind = info.get("kind", "")
    what = {"co-assignment": "how often the spot fell in its domain across the consensus's restarts",
            "posterior": "the posterior probability of its domain given the embedding that was clustered"}.get(
        kind, "recorded by the method")
    parts = ['<section id="confidence"><h2>How sure the domains are</h2>',
             f'<p class="note">Confidence of each spot in its {_esc(method)} domain: {_esc(what)} (0 to 1; '
             f"<code>obs[\"{_esc(method)}_confidence\"]</code>). Low values are drawn on top.</p>"]
    parts.append(_figure(pl.confidence(adata, keys[:3]), "Confidence of each spot in its domain.", dpi=90, photo=True))
    conf = adata.obs[f"{method}_confidence"].to_numpy(dtype=float)
    lab = adata.obs[method].astype(str)
    rows = []
    for d, g in pd.Series(conf).groupby(lab.to_numpy()):
        rows.append((names.get(d, d), int(g.size), float(g.mean()), float((g < UNCERTAIN).mean())))
    rows.sort(key=lambda r: r[2])
    parts.append(_table(rows, ["domain", "spots", "stability (mean confidence)", f"share below {UNCERTAIN:g}"],
                        numeric={1, 2, 3}))
    bounds = uncertain_boundaries(adata, method)
    if bounds:
        items = "".join(f"<li>between <b>{_esc(names.get(a, a))}</b> and <b>{_esc(names.get(b, b))}</b>: {n} "
                        "uncertain spots</li>" for a, b, n in bounds)
        parts.append(f"<p>The least certain boundaries (spots below {UNCERTAIN:g} confidence touching the other "
                     f"domain):</p><ul>{items}</ul>")
    else:
        parts.append(f'<p class="note">No spot is below {UNCERTAIN:g} confidence: every boundary is clear.</p>')
    parts.append("</section>")
    return "\n".join(parts)


def image_changes_section(adata, image, *, with_image: str, without: str, library_id: str | None,
                          n_patches: int, log: Callable[[str], None], names: Mapping[str, str] | None = None) -> str:
    """What the H&E changed: the map of the changed spots by region, a table of the regions, and for each of
    the largest its H&E patches and the genes that set it apart."""
    from .. import ev, pl
    from . import _cards

    log("report: what the H&E changed")
    changes = ev.image_changes(adata, with_image, without)
    parts = ['<section id="changes"><h2>What the H&amp;E changed</h2>',
             f'<p class="note">Spots whose <b>{_esc(with_image)}</b> domain (with the image) differs from '
             f"<b>{_esc(without)}</b> (the same method on expression alone), after matching the two runs' domains "
             "one to one; changed spots that touch form a region.</p>"]
    if not len(changes):
        parts.append('<p class="note">The image changed no spot\'s domain.</p></section>')
        return "\n".join(parts)
    share = len(changes) / adata.n_obs
    parts.append(f"<p><b>{len(changes):,}</b> of {adata.n_obs:,} spots ({100 * share:.1f}%) are in another domain "
                 f"with the image, in {len(changes.attrs['regions'])} region(s).</p>")
    parts.append(_figure(pl.image_changes(adata, changes, library_id=library_id, max_regions=MAX_REGIONS),
                         "Changed spots by region (numbered), over the H&E; the other spots grey.", dpi=90, photo=True))
    names = names or {}

    def named(change: str) -> str:  # "0 -> 1" with the image run's domain names
        a, b = change.split(" -> ")
        return f"{names.get(a, a)} → {names.get(b, b)}"

    for r in changes.attrs["regions"]:
        r["change"] = named(r["change"])
    regions = [r for r in changes.attrs["regions"] if r["n_spots"] >= MIN_REGION_SPOTS][:MAX_REGIONS]
    rows = [(r["region"] + 1, r["n_spots"], r["change"], r["share"], r["confidence_from"], r["confidence_to"])
            for r in changes.attrs["regions"][:12]]
    parts.append(_table(rows, ["region", "spots", "most common change (without -> with the image)", "share",
                               "confidence without", "confidence with"], numeric={1, 3, 4, 5}))
    cards = []
    key = "_stmorph_report_region"
    for r in regions:
        members = changes.index[changes["region"] == r["region"]]
        inside = adata.obs_names.isin(members)
        genes = ""
        adata.obs[key] = pd.Categorical(np.where(inside, "region", "rest"))
        try:
            mk = ev.markers(adata, key, groups=["region"], n_genes=5, min_pct=0.1, key_added=key)
            up = mk[mk["logfoldchange"] > 0].head(5)
            genes = ", ".join(f"<i>{_esc(g)}</i>" for g in up["gene"]) or "no gene up in the region"
        except StmorphError as exc:
            genes = f"markers not computed: {_esc(exc)}"
        finally:
            adata.obs.drop(columns=[key], inplace=True)
            adata.uns.pop(key, None)
        strip = ""
        if image:
            centre = np.array([r["x"], r["y"]])
            rows_i = np.flatnonzero(inside)
            d = ((_spatial.coordinates(adata)[rows_i] - centre) ** 2).sum(axis=1)
            png = _cards.patch_strip(adata, image, list(rows_i[np.argsort(d)[:n_patches]]), "#000000",
                                     library_id=library_id)
            if png is not None:
                strip = (f'<figure class="patches"><img alt="H&amp;E of region {r["region"] + 1}" '
                         f'src="{data_uri(png, "image/jpeg")}"></figure>')
        cards.append(f'<article class="card" id="change-{r["region"] + 1}"><h3>Region {r["region"] + 1}: '
                     f'{_esc(r["change"])}</h3><p class="stat"><b>{r["n_spots"]}</b> spots · genes up in the region '
                     f"against the rest of the section: {genes}</p>{strip}</article>")
    if cards:
        parts.append('<div class="cards">' + "".join(cards) + "</div>")
    parts.append("</section>")
    return "\n".join(parts)
