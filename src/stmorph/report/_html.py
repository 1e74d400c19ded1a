"""``report.html``: one self-contained page per run (figures embedded, no server, no network).

It reads ``OUT/result.h5ad`` and ``OUT/run.json`` written by ``stmorph run`` and
shows the run parameters, the domains over the H&E, the agreement with the
annotation (when ``obs["annotation"]`` exists), the top marker genes per domain
and, when gene sets are given, pre-ranked GSEA per domain.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as _dt
import html
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from .._outputs import atomic_write, record_entries, stmorph_entries
from ..errors import InputError, OutputExistsError, StmorphError

__all__ = ["write_report", "build_report"]

METHOD_PREFERENCE = ("stmic", "senca", "expression", "image")
KNOWN_METHODS = ("stmic", "expression", "image", "senca")

CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0;color:#222;background:#fafafa}
main{max-width:1300px;margin:0 auto;padding:18px 28px 60px}
h1{font-size:1.6em;margin:.3em 0 .1em}h2{font-size:1.25em;border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:1.8em}
h3{font-size:1.05em;margin:1.2em 0 .4em}
.sub{color:#666;margin:0 0 1em}
table{border-collapse:collapse;margin:.4em 0 1em;font-size:.9em;background:#fff}
th,td{border:1px solid #ddd;padding:4px 9px;text-align:left;vertical-align:top}
th{background:#f0f0f0}td.num{text-align:right;font-variant-numeric:tabular-nums}
figure{margin:.6em 0 1.4em;background:#fff;border:1px solid #e3e3e3;padding:8px;display:inline-block;max-width:100%}
figure img{max-width:100%;height:auto;display:block}figcaption{color:#555;font-size:.85em;margin-top:6px}
code{background:#eee;padding:1px 4px;border-radius:3px;font-size:.9em;word-break:break-all}
.note{color:#555;font-size:.9em}.warn{color:#a33}
details{margin:.4em 0}summary{cursor:pointer;color:#246}
.grid{display:flex;flex-wrap:wrap;gap:18px;align-items:flex-start}
nav a{margin-right:14px;color:#246;text-decoration:none}
"""


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


def _table(rows: Sequence[Sequence], header: Sequence[str], *, numeric: set[int] | None = None) -> str:
    numeric = numeric or set()
    out = ["<table>", "<tr>" + "".join(f"<th>{_esc(h)}</th>" for h in header) + "</tr>"]
    for r in rows:
        cells = []
        for i, v in enumerate(r):
            cls = ' class="num"' if i in numeric else ""
            cells.append(f"<td{cls}>{_esc(_fmt(v))}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _kv_table(d: Mapping) -> str:
    return _table([(k, v) for k, v in d.items()], ["parameter", "value"])


def _figure(fig, caption: str, *, dpi: int = 110) -> str:
    from ..pl._utils import fig_to_png_bytes, pyplot

    data = base64.b64encode(fig_to_png_bytes(fig, dpi=dpi)).decode("ascii")
    pyplot().close(fig)
    return (f'<figure><img alt="{_esc(caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{_esc(caption)}</figcaption></figure>")


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


def _methods(adata, info: Mapping) -> list[str]:
    ms = [m for m in info.get("methods", []) if m in adata.obs]
    if not ms:
        ms = [m for m in KNOWN_METHODS if m in adata.obs]
    return ms


def build_report(
    adata,
    info: Mapping | None = None,
    *,
    gene_sets=None,
    method: str | None = None,
    n_markers: int = 5,
    fdr: float = 0.05,
    permutation_num: int = 1000,
    random_state: int = 0,
    log=None,
) -> str:
    """The HTML text of the report for a run (``adata`` = result.h5ad, ``info`` = run.json)."""
    from .. import ev, pl

    log = log or (lambda m: None)
    info = dict(info or {})
    methods = _methods(adata, info)
    if not methods:
        msg = (f"no domain column found in result.h5ad (looked for {list(KNOWN_METHODS)} and run.json's methods); "
               "was it written by `stmorph run`?")
        raise InputError(msg)
    if method is None:
        method = next((m for m in METHOD_PREFERENCE if m in methods), methods[0])
    elif method not in adata.obs:
        msg = f"method {method!r} has no domains in result.h5ad (have {methods})."
        raise InputError(msg)
    has_ann = "annotation" in adata.obs and adata.obs["annotation"].notna().any()
    title_input = Path(str(info.get("input", ""))).name or "section"
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts: list[str] = []
    nav = ["run", "domains"] + (["agreement"] if has_ann else []) + ["markers"] + (["gsea"] if gene_sets else [])
    parts.append(f"<h1>stmorph report: {_esc(title_input)}</h1>")
    parts.append(f'<p class="sub">{adata.n_obs} spots × {adata.n_vars} genes · methods: {_esc(", ".join(methods))}'
                 f" · generated {_esc(now)}</p>")
    parts.append("<nav>" + "".join(f'<a href="#{n}">{n}</a>' for n in nav) + "</nav>")

    # ---------------------------------------------------------------- run
    parts.append('<h2 id="run">Run</h2>')
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
    if info.get("n_domains"):
        parts.append("<h3>Domains per method</h3>" + _table(list(info["n_domains"].items()), ["method", "domains"],
                                                             numeric={1}))
    if info.get("warnings"):
        parts.append("<h3>Warnings</h3><ul>" + "".join(f'<li class="warn">{_esc(w)}</li>' for w in info["warnings"])
                     + "</ul>")
    if info.get("packages"):
        parts.append("<details><summary>Package versions</summary>" + _kv_table(info["packages"]) + "</details>")

    # ---------------------------------------------------------------- domains
    log("report: domain panels")
    parts.append('<h2 id="domains">Spatial domains</h2>')
    keys = (["annotation"] if has_ann else []) + methods
    fig = pl.domains(adata, keys, ncols=2 if len(keys) == 4 else min(len(keys), 3))
    cap = "Domains over the H&E; colours matched between panels (Hungarian assignment on the contingency table"
    cap += " with the annotation)." if has_ann else " with the first panel)."
    parts.append(_figure(fig, cap))

    # ---------------------------------------------------------------- agreement
    if has_ann:
        parts.append('<h2 id="agreement">Agreement with the annotation</h2>')
        scored = ev.scored_labels(adata)
        rows = []
        for m in methods:
            try:
                rows.append((m, ev.ari(adata, m), ev.nmi(adata, m), int(adata.obs[m].nunique())))
            except StmorphError as exc:
                rows.append((m, float("nan"), float("nan"), str(exc)))
        parts.append(_table(rows, ["method", "ARI", "NMI", "domains"], numeric={1, 2, 3}))
        parts.append(f'<p class="note">Scored on {len(scored)} of {adata.n_obs} spots with a label other than '
                     f"&quot;undetermined&quot;; {scored.nunique()} distinct labels.</p>")

    # ---------------------------------------------------------------- markers
    log(f"report: marker genes of {method}")
    parts.append(f'<h2 id="markers">Marker genes ({_esc(method)} domains)</h2>')
    try:
        mk = ev.markers(adata, method, key_added=f"markers_{method}")
    except StmorphError as exc:
        mk = None
        parts.append(f'<p class="warn">Marker genes could not be computed: {_esc(exc)}</p>')
    if mk is not None:
        parts.append('<p class="note">Wilcoxon rank-sum test of each domain against all other spots on '
                     "log-normalised expression (scanpy rank_genes_groups, as Seurat FindAllMarkers); "
                     "p adjusted by Benjamini-Hochberg; genes expressed in at least 10% of the spots inside or outside the "
                     "domain (Seurat's min.pct).</p>")
        mk = mk[np.maximum(mk["pct_in"], mk["pct_out"]) >= 0.1]  # Seurat's min.pct
        top = mk[mk["logfoldchange"] > 0].groupby("domain", sort=False, group_keys=False).head(n_markers)
        rows = [(r.domain, r.gene, r.logfoldchange, r.score, r.pval_adj, r.pct_in, r.pct_out)
                for r in top.itertuples()]
        parts.append(_table(rows, ["domain", "gene", "log2 FC", "score", "adj. p", "frac. in", "frac. out"],
                            numeric={2, 3, 4, 5, 6}))
        figs = []
        fig = pl.dotplot(adata, method, top, n_genes=min(3, n_markers))
        figs.append(_figure(fig, f"Top markers per {method} domain: dot size = fraction of spots expressing, "
                                 "colour = mean expression scaled per gene."))
        first = top.groupby("domain", sort=False).head(1)["gene"].tolist()[:8]
        if first:
            fig = pl.spatial(adata, first, ncols=4)
            figs.append(_figure(fig, "Spatial expression (log-normalised) of the top marker of each domain."))
        parts.append('<div class="grid">' + "".join(figs) + "</div>")

    # ---------------------------------------------------------------- GSEA
    if gene_sets is not None:
        log("report: GSEA")
        parts.append(f'<h2 id="gsea">Gene set enrichment ({_esc(method)} domains)</h2>')
        src = os.fspath(gene_sets) if isinstance(gene_sets, str | os.PathLike) else f"{len(gene_sets)} gene sets (dict)"
        parts.append(f'<p class="note">Pre-ranked GSEA (gseapy) of each domain against the rest, genes ranked by '
                     f"the Wilcoxon score; gene sets: <code>{_esc(src)}</code>; {permutation_num} permutations, "
                     f"seed {random_state}; significant: FDR &lt; {fdr:g}.</p>")
        try:
            res = ev.gsea(adata, method, None, gene_sets, fdr=fdr, markers_key=f"markers_{method}",
                          permutation_num=permutation_num, random_state=random_state)
        except StmorphError as exc:
            res = None
            parts.append(f'<p class="warn">GSEA could not be run: {_esc(exc)}</p>')
        if res is not None:
            sig = res[res["significant"]]
            if len(sig):
                rows = [(r.domain, r.term, r.nes, r.pval, r.fdr, r.size, _short(r.lead_genes)) for r in sig.itertuples()]
                parts.append(f"<h3>Significant gene sets ({len(sig)})</h3>")
                parts.append(_table(rows, ["domain", "gene set", "NES", "p", "FDR", "size", "leading edge"],
                                    numeric={2, 3, 4, 5}))
            else:
                parts.append(f'<p class="note">No gene set reached FDR &lt; {fdr:g}; the strongest per domain:</p>')
                best = res.reindex(res["nes"].abs().sort_values(ascending=False).index)
                best = best.groupby("domain", sort=False).head(3)
                rows = [(r.domain, r.term, r.nes, r.pval, r.fdr, r.size, _short(r.lead_genes))
                        for r in best.itertuples()]
                parts.append(_table(rows, ["domain", "gene set", "NES", "p", "FDR", "size", "leading edge"],
                                    numeric={2, 3, 4, 5}))
            fig = pl.gsea_bars(res, top=8, fdr=fdr)
            parts.append(_figure(fig, "NES of the gene sets with the largest |NES| per domain (grey: not significant)."))

    body = "\n".join(parts)
    footer = (f'<p class="note" style="margin-top:3em">stmorph {_esc(info.get("stmorph_version", ""))} · '
              f"Python {_esc(sys.version.split()[0])} · this file is self-contained (no server, no network).</p>")
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>stmorph report: {_esc(title_input)}</title>\n<style>{CSS}</style>\n</head>\n"
            f"<body>\n<main>\n{body}\n{footer}\n</main>\n</body>\n</html>\n")


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
    fdr: float = 0.05,
    permutation_num: int = 1000,
    random_state: int = 0,
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
        Domains used for markers and GSEA (default: stmic, else senca, expression, image).
    n_markers
        Marker genes listed per domain.
    fdr, permutation_num, random_state
        GSEA threshold, permutations and seed.

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
        msg = "report.html already exists; pass force=True (--force) to replace it."
        raise OutputExistsError(f"{target}: {msg}")
    if target.exists() and "report.html" not in (stmorph_entries(out_dir) or ()):
        msg = "report.html was not written by stmorph (not in the folder's .stmorph marker); --force does not replace it."
        raise OutputExistsError(f"{target}: {msg}")
    if gene_sets is not None:
        from ..ev import load_gene_sets

        load_gene_sets(gene_sets)  # fail fast on a bad GMT before any work
    adata, info = _read(out_dir)
    text = build_report(adata, info, gene_sets=gene_sets, method=method, n_markers=n_markers, fdr=fdr,
                        permutation_num=permutation_num, random_state=random_state, log=log)
    atomic_write(target, lambda p: Path(p).write_text(text, encoding="utf-8"))
    with contextlib.suppress(OSError):  # a later --force recognises it as stmorph's
        record_entries(out_dir, ["report.html"])
    return target

