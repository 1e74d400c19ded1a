"""``report.html``: the page a pathologist reads, self-contained (no server, no network, opens from disk).

Results come first: what was run on which section and, when the spots are annotated, how well each
method agrees with the annotation; then the domains over the H&E, a zoomable view of the full H&E with
every method's domains as a toggleable overlay, and one card per domain of the chosen method (size,
where it lies, top marker genes with their Wilcoxon statistics, GSEA terms, representative H&E
patches). Run parameters, timings, versions and hashes close the page, collapsed.

Figures are drawn by :mod:`stmorph.pl` (matplotlib) and Pillow; every image is a data URI and the viewer
is inline JavaScript written here, so the one file works offline.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from .._outputs import DISK_FULL, atomic_write, check_can_write_in, disk_full_error, record_entries, stmorph_entries
from ..errors import InputError, OutputError, OutputExistsError, StmorphError
from ..tl._methods import available_methods, primary_method
from . import _cards, _trust, _viewer
from ._parts import _esc, _figure, _kv_table, _table
from ._image import SectionImage

__all__ = ["write_report", "build_report", "chosen_method", "report_methods"]


CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0;color:#222;background:#fafafa}
main{max-width:1320px;margin:0 auto;padding:14px 28px 60px}
h1{font-size:1.55em;margin:.2em 0 .1em}h2{font-size:1.22em;border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:1.6em}
h3{font-size:1.02em;margin:.2em 0 .4em}
.sub{color:#555;margin:0 0 .6em}
table{border-collapse:collapse;margin:.4em 0 1em;font-size:.9em;background:#fff}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f0f0f0}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.chosen td{font-weight:600;background:#f3f8ff}
figure{margin:.6em 0 1.2em;background:#fff;border:1px solid #e3e3e3;padding:8px;display:inline-block;max-width:100%}
figure img{max-width:100%;height:auto;display:block}figcaption{color:#555;font-size:.85em;margin-top:6px}
code{background:#eee;padding:1px 4px;border-radius:3px;font-size:.9em;word-break:break-all}
.note{color:#555;font-size:.9em}.warn{color:#a33}
details{margin:.4em 0}summary{cursor:pointer;color:#246;font-weight:600}
.grid{display:flex;flex-wrap:wrap;gap:18px;align-items:flex-start}
nav{position:sticky;top:0;background:#fafafa;padding:6px 0;border-bottom:1px solid #e5e5e5;z-index:5}
nav a{margin-right:16px;color:#246;text-decoration:none}
.facts{display:flex;flex-wrap:wrap;gap:10px;margin:.6em 0}
.fact{background:#fff;border:1px solid #e0e0e0;border-radius:6px;padding:6px 12px}
.fact b{display:block;font-size:1.25em}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(600px,1fr));gap:16px}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:10px 12px}
.card .stat{margin:.1em 0 .5em;font-size:.92em}
.cardrow{display:flex;gap:12px;align-items:flex-start}
.cardrow img.map{width:220px;height:auto;border:1px solid #eee;flex:none}
.cardtables table{margin:0 0 .5em;font-size:.82em}
.card figure.patches{margin:.5em 0 0;padding:0;border:0}
i.sw{display:inline-block;width:.95em;height:.95em;border-radius:2px;margin-right:6px;vertical-align:-2px}
"""

def _read(out_dir: Path):
    import anndata as ad

    res = out_dir / "result.h5ad"
    if not res.is_file():
        msg = "result.h5ad not found: run `stmorph run INPUT --out DIR` first, then `stmorph report DIR`."
        raise InputError(msg, out_dir)
    try:
        adata = ad.read_h5ad(res)
    except Exception as exc:  # noqa: BLE001 - any read failure is a bad input file
        msg = f"cannot read result.h5ad ({type(exc).__name__}: {exc})."
        raise InputError(msg, res) from exc
    info: dict = {}
    rj = out_dir / "run.json"
    if rj.is_file():
        try:
            info = json.loads(rj.read_text())
        except ValueError as exc:
            msg = f"run.json is not valid JSON ({exc})."
            raise InputError(msg, rj) from exc
    return adata, info


def report_methods(adata, info: Mapping | None = None) -> list[str]:
    """The domain columns to show, never from a fixed list: run.json's ``methods`` present in ``obs``; without
    run.json, every ``obs`` column a clustering tool wrote (``uns[column]["params"]["use_rep"]``) or named as
    a known method."""
    ms = [m for m in (info or {}).get("methods", []) if m in adata.obs and m != "annotation"]
    if ms:
        return list(dict.fromkeys(ms))
    found = []
    for c in adata.obs.columns:
        u = adata.uns.get(c)
        params = u.get("params") if isinstance(u, Mapping) else None
        if c != "annotation" and (c in available_methods() or (isinstance(params, Mapping) and "use_rep" in params)):
            found.append(str(c))
    return found


def chosen_method(adata, methods: Sequence[str]) -> str:
    """The run's primary method (``uns["stmorph_run"]["primary"]`` or ``uns["stmorph"]["primary"]``) when it
    names a shown method, else the first shown method that is not a baseline (registered methods in run order
    first), else the first method."""
    for key in ("stmorph_run", "stmorph"):
        st = adata.uns.get(key)
        primary = st.get("primary") if isinstance(st, Mapping) else None
        if isinstance(primary, str) and primary in methods:
            return primary
    known = [m for m in available_methods() if m in methods]
    return primary_method([*known, *(m for m in methods if m not in known)])


def build_report(
    adata,
    info: Mapping | None = None,
    *,
    gene_sets=None,
    method: str | None = None,
    n_markers: int = 5,
    n_patches: int = 6,
    fdr: float = 0.05,
    permutation_num: int = 1000,
    random_state: int = 0,
    viewer: bool = True,
    viewer_max_pixels: float = 28e6,
    viewer_um_per_px: float = 1.0,
    library_id: str | None = None,
    log=None,
) -> str:
    """The HTML text of the report of a run (``adata`` = result.h5ad, ``info`` = run.json).

    ``adata`` is left as it was (marker tables computed here are removed again). See :func:`write_report`
    for the parameters; ``viewer_max_pixels`` and ``viewer_um_per_px`` bound the zoomable view's finest
    image level (pixels, micrometres per pixel).
    """
    from .. import ev, pl
    from ..pl._colors import MISSING_COLOR, label_order
    from ..pl._names import NO_DISTINCT

    log = log or (lambda m: None)
    t_start = time.perf_counter()
    info = dict(info or {})
    methods = report_methods(adata, info)
    if not methods:
        msg = ("no domain column found in result.h5ad (run.json's methods, or obs columns written by a clustering "
               "tool); was it written by `stmorph run`?")
        raise InputError(msg)
    if method is None:
        method = chosen_method(adata, methods)
    elif method not in adata.obs:
        msg = f"method {method!r} has no domains in result.h5ad (have {methods})."
        raise InputError(msg)
    elif method not in methods:
        methods = [method, *methods]
    has_ann = "annotation" in adata.obs and adata.obs["annotation"].notna().any()
    ordered = [method, *[m for m in methods if m != method]]
    keys = (["annotation"] if has_ann else []) + ordered
    colors = pl.domain_colors(adata, keys, reference="annotation" if has_ann else method)
    # the section's library id (its sample name: "151673", "A1"), else the input's name ("outs" names its parent)
    given = Path(str(info.get("input", "")))
    section = _library_name(adata) or (given.parent.name if given.name == "outs" else given.name) or "section"
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    labels = label_order(adata.obs[method])
    base = method[:-len("_expr")] if method.endswith("_expr") else method  # a method and its expression-only run
    changes = (base, f"{base}_expr") if {base, f"{base}_expr"} <= set(adata.obs.columns) else None

    # ------------------------------------------------------------ analyses of the chosen method
    log(f"report: marker genes of {method}")
    mk_key = "_stmorph_report_markers"
    mk, mk_error, gsea_res, gsea_error = None, None, None, None
    try:
        try:
            mk = ev.markers(adata, method, key_added=mk_key)
        except StmorphError as exc:
            mk_error = str(exc)
        if gene_sets is not None and mk is not None:
            log("report: GSEA")
            try:
                gsea_res = ev.gsea(adata, method, None, gene_sets, fdr=fdr, markers_key=mk_key,
                                   permutation_num=permutation_num, random_state=random_state)
            except StmorphError as exc:
                gsea_error = str(exc)
    finally:
        adata.uns.pop(mk_key, None)
    sym, gene_note = gene_symbols(adata)
    symbols_of = (lambda t: t.assign(gene=t["gene"].astype(str).map(lambda g: sym.get(g, g)))) if sym else (lambda t: t)
    names = pl.domain_names(adata, method, markers=symbols_of(mk)) if mk is not None else {lab: lab for lab in labels}
    if changes is not None and changes[0] == method:
        names = _image_made(adata, method, changes[1], names)
    top = top_shown = None
    if mk is not None:
        mk = mk[np.maximum(mk["pct_in"], mk["pct_out"]) >= 0.1]  # Seurat's min.pct
        top = mk[mk["logfoldchange"] > 0].groupby("domain", sort=False, group_keys=False).head(n_markers)
        top_shown = symbols_of(top)

    parts: list[str] = []
    nav = ["summary", "domains"] + (["confidence"] if f"{method}_confidence" in adata.obs else [])
    nav += (["viewer"] if viewer else []) + (["changes"] if changes is not None else []) + ["cards", "markers"]
    nav += (["gsea"] if gene_sets is not None else []) + ["run"]
    titles = {"summary": "results", "domains": "domain maps", "confidence": "confidence", "viewer": "zoomable H&E",
              "changes": "what the H&E changed", "cards": "domain cards",
              "markers": "markers", "gsea": "gene sets", "run": "run details"}
    parts.append("<nav>" + "".join(f'<a href="#{n}">{titles[n]}</a>' for n in nav) + "</nav>")

    # ------------------------------------------------------------ results first
    parts.append('<section id="summary">')
    parts.append(f"<h1>Spatial domains: {_esc(section)}</h1>")
    parts.append(f'<p class="sub">{adata.n_obs:,} spots × {adata.n_vars:,} genes · methods: '
                 f"{_esc(', '.join(ordered))} · cards and markers for <b>{_esc(method)}</b> · "
                 f"generated {_esc(now)}</p>")
    facts = [(f"{adata.n_obs:,}", "spots"), (str(len(labels)), f"{method} domains")]
    if has_ann:
        facts.append((str(ev.scored_labels(adata).nunique()), "annotated regions"))
    for m in ordered[1:]:
        facts.append((str(len(label_order(adata.obs[m]))), f"{m} domains"))
    parts.append('<div class="facts">' + "".join(f'<div class="fact"><b>{_esc(a)}</b>{_esc(b)}</div>'
                                                 for a, b in facts) + "</div>")
    if has_ann:
        scored = ev.scored_labels(adata)
        rows = []
        for m in ordered:
            try:
                rows.append((m, ev.ari(adata, m), ev.nmi(adata, m), int(adata.obs[m].nunique())))
            except StmorphError as exc:
                rows.append((m, float("nan"), float("nan"), str(exc)))
        parts.append('<h2 id="agreement">Agreement with the annotation</h2>')
        parts.append(_table(rows, ["method", "ARI", "NMI", "domains"], numeric={1, 2, 3}, highlight=0))
        parts.append(f'<p class="note">Adjusted Rand index and normalised mutual information against '
                     f"<code>obs[\"annotation\"]</code>, on the {len(scored):,} of {adata.n_obs:,} spots with a label "
                     f"other than &quot;undetermined&quot; ({scored.nunique()} labels); 1 = identical partitions, "
                     "0 = chance.</p>")
    if info.get("warnings"):
        parts.append(f'<p class="warn">{len(info["warnings"])} warning(s) during the run: see '
                     '<a href="#run">run details</a>.</p>')
    parts.append("</section>")

    # ------------------------------------------------------------ domain maps
    log("report: domain maps")
    parts.append('<section id="domains"><h2>Domains over the H&amp;E</h2>')
    fig = pl.domains(adata, keys, ncols=2 if len(keys) == 4 else min(len(keys), 3), labels={method: names})
    cap = ("Colours matched between panels (Hungarian assignment on the contingency table with "
           + ("the annotation" if has_ann else f"the {method} domains") + f"); {method} domains named by their "
           "top two marker genes.")
    parts.append(_figure(fig, cap, dpi=90, photo=True))
    parts.append("</section>")
    parts.append(_trust.confidence_section(adata, method, ordered, names, log))

    image = SectionImage(adata, library_id=library_id)
    try:
        # -------------------------------------------------------- zoomable view
        if viewer:
            log("report: zoomable view")
            layers = []
            for k in keys:
                labs = label_order(adata.obs[k])
                layers.append({"key": k, "labels": labs, "colors": [colors[k].get(x, MISSING_COLOR) for x in labs],
                               "names": [names.get(x, x) if k == method else x for x in labs],
                               "title": k + (" (cards)" if k == method else "")})
            data = _viewer.viewer_data(adata, layers, default=method, library_id=library_id,
                                       max_pixels=viewer_max_pixels, min_um_per_px=viewer_um_per_px, image=image)
            parts.append('<section id="viewer"><h2>Zoomable H&amp;E</h2>')
            res = f"{data['um_per_px']:.2g} µm per pixel at full zoom" if data["um_per_px"] else "bounded resolution"
            kind = data["image"]
            img = ("no image (spots only)" if kind is None else
                   f"the {'full-resolution H&amp;E' if kind == 'full-resolution' else _esc(kind) + ' image'} ({res})")
            parts.append('<p class="note">Scroll to zoom, drag to pan, hover a spot for its id and domains; '
                         "click a legend entry to show that domain alone. Spots are drawn at their true size "
                         f"({_shape_words(data['shape'])}), opaque in the legend's colours; lower the opacity to see "
                         f"the H&amp;E through them (their colours then mix with it). Image: {img}.</p>")
            parts.append(_viewer.viewer_html(data))
            parts.append("</section>")

        if changes is not None:
            parts.append(_trust.image_changes_section(adata, image, with_image=changes[0], without=changes[1],
                                                      library_id=library_id, n_patches=n_patches, log=log,
                                                      names=names if changes[0] == method else None))

        # -------------------------------------------------------- cards
        log("report: domain cards")
        parts.append(f'<section id="cards"><h2>The {_esc(method)} domains, one by one</h2>')
        rep = _cards.embedding_key(adata, method)
        note = (f"the {n_patches} spots nearest the domain's centre in <code>obsm[\"{_esc(rep)}\"]</code> "
                f"(the representation {_esc(method)} clustered)" if rep else
                f"the {n_patches} spots nearest the domain's centre on the slide")
        parts.append(f'<p class="note">Markers: Wilcoxon rank-sum test of the domain against all other spots on '
                     "log-normalised expression (scanpy rank_genes_groups, as Seurat FindAllMarkers); log2 FC = "
                     "log2(mean + 1) inside minus outside, on the normalised scale (Seurat's); z = rank-sum "
                     "z score, p adjusted by Benjamini-Hochberg; genes expressed in at least 10% of the spots inside "
                     f"or outside the domain. H&amp;E strip: {note}, each patch centred on the spot (outlined)."
                     + (f" {gene_note}" if gene_note else "") + "</p>")
        painter = _cards.MapPainter(adata, image, library_id=library_id)
        lab_arr = adata.obs[method].astype(str).to_numpy()
        valid = adata.obs[method].notna().to_numpy()
        ann = ev.scored_labels(adata) if has_ann else None
        try:
            border = ev.border_domains(adata, method)
        except InputError as exc:  # too few spots, or positions that draw no outline
            border = None
            log(f"report: no border check ({exc})")
        cards, any_patches = [], False
        for lab in labels:
            mask = (lab_arr == lab) & valid
            color = colors[method].get(lab, MISSING_COLOR)
            comp = None
            if ann is not None:
                sub = ann.reindex(adata.obs_names[mask]).dropna()
                if len(sub):
                    vc = sub.value_counts(normalize=True)
                    comp = [(str(a), float(f)) for a, f in vc.head(2).items()]
            g = None
            if gsea_res is not None:
                gd = gsea_res[gsea_res["domain"].astype(str) == lab]
                g = gd[gd["significant"]].head(3) if gd["significant"].any() else gd.head(0)
            patches = None
            if image:
                rows = _cards.representative_spots(adata, method, lab, n_patches, rep=rep)
                patches = _cards.patch_strip(adata, image, rows, color, library_id=library_id)
                any_patches = any_patches or patches is not None
            cards.append(_cards.card_html(
                label=lab, name=f"Domain {names.get(lab, lab)}", color=color, n_spots=int(mask.sum()),
                n_total=int(valid.sum()), map_png=painter.draw(mask, color),
                markers=top_shown[top_shown["domain"].astype(str) == lab] if top is not None else None,
                gsea=g, patches=patches, composition=comp, method=method,
                border=border.loc[lab] if border is not None and lab in border.index else None,
                distinct=NO_DISTINCT not in names.get(lab, ""), by_image=names.get(lab, "").endswith(BY_IMAGE)))
        if not any_patches:
            why = (f"the {_esc(image.kind)} image is too coarse (fewer than 32 pixels across a patch)" if image
                   else "the result has no image")
            parts.append(f'<p class="note">No H&amp;E strips: {why}; give the full-resolution H&amp;E '
                         "(<code>stmorph run --image</code>).</p>")
        n_border = int(border.loc[[lab for lab in labels if lab in border.index], "along_border"].sum()) \
            if border is not None else 0
        if n_border:
            parts.append(_cards.border_note(n_border))
        parts.append('<div class="cards">' + "".join(cards) + "</div>")
        if mk_error:
            parts.append(f'<p class="warn">Marker genes could not be computed: {_esc(mk_error)}</p>')
        parts.append("</section>")
    finally:
        image.close()

    # ------------------------------------------------------------ markers overview
    log("report: marker overview")
    parts.append(f'<section id="markers"><h2>Marker genes across the {_esc(method)} domains</h2>')
    if top is not None and len(top):
        if gene_note:
            parts.append(f'<p class="note">{gene_note}</p>')
        figs = [_figure(_relabel(pl.dotplot(adata, method, top, n_genes=min(3, n_markers)), sym),
                        f"Top markers per {method} domain: dot size = fraction of spots expressing, "
                        "colour = mean expression scaled per gene.", dpi=90)]
        first = top.groupby("domain", sort=False).head(1)["gene"].tolist()[:8]
        if first:
            figs.append(_figure(_relabel(pl.spatial(adata, list(dict.fromkeys(first)), ncols=4), sym),
                                "Spatial expression (log-normalised) of the top marker of each domain.", dpi=80,
                                photo=True))
        parts.append('<div class="grid">' + "".join(figs) + "</div>")
        rows = [(r.domain, r.gene, r.logfoldchange, r.score, r.pval_adj, r.pct_in, r.pct_out)
                for r in top_shown.itertuples()]
        parts.append("<details><summary>All listed markers as a table</summary>"
                     + _table(rows, ["domain", "gene", "log2 FC", "z", "adj. p", "frac. in", "frac. out"],
                              numeric={2, 3, 4, 5, 6}) + "</details>")
    else:
        parts.append(f'<p class="warn">No marker gene to show{": " + _esc(mk_error) if mk_error else ""}.</p>')
    parts.append("</section>")

    # ------------------------------------------------------------ GSEA
    if gene_sets is not None:
        parts.append(f'<section id="gsea"><h2>Gene set enrichment ({_esc(method)} domains)</h2>')
        src = os.fspath(gene_sets) if isinstance(gene_sets, str | os.PathLike) else f"{len(gene_sets)} gene sets (dict)"
        parts.append(f'<p class="note">Pre-ranked GSEA (gseapy) of each domain against the rest, genes ranked by '
                     f"the Wilcoxon score; gene sets: <code>{_esc(src)}</code>; {permutation_num} permutations, "
                     f"seed {random_state}; significant: FDR &lt; {fdr:g}.</p>")
        if gsea_error or gsea_res is None:
            parts.append(f'<p class="warn">GSEA could not be run: {_esc(gsea_error or mk_error)}</p>')
        else:
            sig = gsea_res[gsea_res["significant"]]
            shown = sig if len(sig) else gsea_res.reindex(gsea_res["nes"].abs().sort_values(ascending=False).index
                                                         ).groupby("domain", sort=False).head(3)
            parts.append(f"<h3>Significant gene sets ({len(sig)})</h3>" if len(sig) else
                         f'<p class="note">No gene set reached FDR &lt; {fdr:g}; the strongest per domain:</p>')
            rows = [(r.domain, r.term, r.nes, r.pval, r.fdr, r.size, _short(r.lead_genes)) for r in shown.itertuples()]
            parts.append(_table(rows, ["domain", "gene set", "NES", "p", "FDR", "size", "leading edge"],
                                numeric={2, 3, 4, 5}))
            parts.append(_figure(pl.gsea_bars(gsea_res, top=8, fdr=fdr),
                                 "NES of the gene sets with the largest |NES| per domain (grey: not significant).",
                                 dpi=90))
        parts.append("</section>")

    # ------------------------------------------------------------ run details, last and collapsed
    parts.append('<section id="run"><h2>Run details</h2><details><summary>Parameters, timings, image encoder, '
                 "versions</summary>")
    run_rows = [("stmorph version", info.get("stmorph_version", "-")), ("command", info.get("command", "-")),
                ("input", info.get("input", "-")), ("methods", ", ".join(methods))]
    if not info:
        run_rows.append(("note", "run.json not found: parameters unknown"))
    parts.append(_table(run_rows, ["", ""]))
    if info.get("parameters"):
        parts.append("<h3>Parameters</h3>" + _kv_table(info["parameters"]))
    timings = dict(info.get("timings_s", {}))
    if info.get("methods_s"):
        timings.update({f"method {k}": v for k, v in info["methods_s"].items()})
    if timings:
        parts.append("<h3>Timings (seconds)</h3>" + _table([(k, float(v)) for k, v in timings.items()],
                                                            ["step", "seconds"], numeric={1}))
    if info.get("encoder"):
        parts.append("<h3>Image encoder</h3>" + _kv_table(info["encoder"]))
    if info.get("warnings"):
        parts.append("<h3>Warnings</h3><ul>" + "".join(f'<li class="warn">{_esc(w)}</li>' for w in info["warnings"])
                     + "</ul>")
    if info.get("packages"):
        parts.append("<h3>Package versions</h3>" + _kv_table(info["packages"]))
    parts.append(f'<p class="note">Report built in {time.perf_counter() - t_start:.1f} s.</p>')
    parts.append("</details></section>")

    body = "\n".join(parts)
    footer = (f'<p class="note" style="margin-top:3em">stmorph {_esc(info.get("stmorph_version", ""))} · '
              f"Python {_esc(sys.version.split()[0])} · this file is self-contained (no server, no network).</p>")
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>stmorph report: {_esc(section)}</title>\n<style>{CSS}{_viewer.VIEWER_CSS}</style>\n</head>\n"
            f"<body>\n<main>\n{body}\n{footer}\n</main>\n</body>\n</html>\n")


#: ``var`` columns that hold gene symbols, in the order they are looked for (scanpy, CELLxGENE, Seurat).
SYMBOL_COLUMNS = ("gene_symbols", "gene_symbol", "symbol", "SYMBOL", "feature_name", "gene_name", "gene_names")
_ENSEMBL = r"ENS[A-Z]*G\d{6,}(\.\d+)?"


def gene_symbols(adata) -> tuple[dict[str, str], str | None]:
    """How genes are shown: ``({var_name: symbol}, note)``. When most ``var_names`` are Ensembl ids, the
    symbols of the first of :data:`SYMBOL_COLUMNS` in ``var`` are shown (ids without a symbol stay) and the
    note says so; without such a column the note says that the names are Ensembl ids. Else ``({}, None)``."""
    import pandas as pd

    names = pd.Index(adata.var_names).astype(str)
    if not len(names) or names.str.fullmatch(_ENSEMBL).mean() <= 0.5:
        return {}, None
    col = next((c for c in SYMBOL_COLUMNS if c in adata.var), None)
    if col is None:
        return {}, ("Genes are named by their Ensembl ids (<code>var_names</code>; <code>var</code> has no "
                    "gene-symbol column such as <code>gene_symbols</code> or <code>feature_name</code>).")
    sym = adata.var[col].astype(str).to_numpy()
    ok = (sym != "") & (sym != "nan") & (sym != "None")
    return ({n: s for n, s, k in zip(names, sym, ok, strict=True) if k},
            f"Gene symbols from <code>var[\"{_esc(col)}\"]</code>; <code>var_names</code> are Ensembl ids.")


#: Appended to the name of a domain without distinct markers that the image set apart.
BY_IMAGE = "defined by the image"


def _image_made(adata, method: str, expr_key: str, names: Mapping[str, str]) -> dict[str, str]:
    """``names`` with ``"; defined by the image"`` added to each domain without distinct markers whose spots,
    in the expression-only run ``obs[expr_key]``, lie mostly in one domain that is mostly another domain
    of ``method``: the image set it apart from a domain of the same expression."""
    from ..pl._names import NO_DISTINCT

    meth, expr = adata.obs[method], adata.obs[expr_key]
    both = (meth.notna() & expr.notna()).to_numpy()
    meth, expr = meth.astype(str).to_numpy()[both], expr.astype(str).to_numpy()[both]
    out = dict(names)
    for lab, name in names.items():
        if not name.endswith(NO_DISTINCT) or not (meth == lab).any():
            continue
        e_vals, e_n = np.unique(expr[meth == lab], return_counts=True)
        m_vals, m_n = np.unique(meth[expr == e_vals[np.argmax(e_n)]], return_counts=True)
        if m_vals[np.argmax(m_n)] != lab:
            out[lab] = f"{name}; {BY_IMAGE}"
    return out


def _relabel(fig, sym: Mapping[str, str]):
    """Show ``sym``'s symbols for gene ids in a figure's tick labels and titles."""
    if not sym:
        return fig
    for ax in fig.axes:
        for get, put in ((ax.get_xticklabels, ax.set_xticklabels), (ax.get_yticklabels, ax.set_yticklabels)):
            labels = get()
            if labels and any(t.get_text() in sym for t in labels):
                put([sym.get(t.get_text(), t.get_text()) for t in labels])
        if ax.get_title() in sym:
            ax.set_title(sym[ax.get_title()])
    return fig


def _shape_words(shape: str) -> str:
    return {"circle": "circles of the recorded spot diameter", "square": "squares of the bin size"}.get(
        shape, f"{shape} tiles")


def _library_name(adata) -> str | None:
    sp = adata.uns.get("spatial")
    return str(next(iter(sp))) if isinstance(sp, Mapping) and len(sp) == 1 else None


def _short(genes: str, n: int = 12) -> str:
    g = [x for x in str(genes).split(";") if x]
    return ", ".join(g[:n]) + (f" (+{len(g) - n})" if len(g) > n else "")


def write_report(
    out_dir: str | os.PathLike,
    *,
    gene_sets=None,
    force: bool = False,
    method: str | None = None,
    n_markers: int = 5,
    n_patches: int = 6,
    fdr: float = 0.05,
    permutation_num: int = 1000,
    random_state: int = 0,
    viewer: bool = True,
    log=None,
) -> Path:
    """Write ``out_dir/report.html`` for a ``stmorph run`` output folder.

    Parameters
    ----------
    out_dir
        Folder holding ``result.h5ad`` and ``run.json``.
    gene_sets
        Local GMT file or dict ``{name: [genes]}`` for pre-ranked GSEA per domain (no network; see
        :func:`stmorph.ev.gsea`); ``None`` skips GSEA.
    force
        Replace an existing ``report.html``.
    method
        Domains that get the cards, markers and GSEA (default: ``uns["stmorph"]["primary"]``, else the first of
        stmorph, senca, stmic, expression, image present). Every method in run.json is shown in the maps.
    n_markers
        Marker genes listed per domain.
    n_patches
        Representative H&E patches per domain card.
    fdr, permutation_num, random_state
        GSEA threshold, permutations and seed.
    viewer
        Include the zoomable view (the largest part of the file).

    Returns
    -------
    Path of ``report.html`` (written atomically: temporary file in the same folder, then renamed).
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        msg = "output folder not found (give the --out folder of `stmorph run`)."
        raise InputError(msg, out_dir)
    target = out_dir / "report.html"
    if target.exists() and not force:
        msg = f"{target}: report.html already exists; pass"
        raise OutputExistsError(f"{msg} force=True to replace it.", cli=f"{msg} --force to replace it.")
    if target.exists() and "report.html" not in (stmorph_entries(out_dir) or ()):
        msg = "report.html was not written by stmorph (not in the folder's .stmorph marker); --force does not replace it."
        raise OutputExistsError(f"{target}: {msg}")
    check_can_write_in(out_dir)  # a read-only folder fails before the report is built
    if gene_sets is not None:
        from ..ev import load_gene_sets

        load_gene_sets(gene_sets)  # fail fast on a bad GMT before any work
    adata, info = _read(out_dir)
    text = build_report(adata, info, gene_sets=gene_sets, method=method, n_markers=n_markers, n_patches=n_patches,
                        fdr=fdr, permutation_num=permutation_num, random_state=random_state, viewer=viewer, log=log)
    try:
        atomic_write(target, lambda p: Path(p).write_text(text, encoding="utf-8"))
    except OSError as exc:
        if exc.errno in DISK_FULL:
            raise disk_full_error(out_dir, len(text.encode("utf-8")), "report.html") from None
        raise OutputError(f"{target}: cannot write the report ({exc.strerror or exc}).") from None
    with contextlib.suppress(OSError):  # a later --force recognises it as stmorph's
        record_entries(out_dir, ["report.html"])
    return target

