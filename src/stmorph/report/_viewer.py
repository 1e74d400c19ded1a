"""The report's zoomable view: the H&E as an embedded tile pyramid, the domains of every method as overlays.

Everything is in the one HTML file and runs offline: the image tiles are JPEG data URIs in a JSON block,
the viewer is a few hundred lines of plain JavaScript written here (a ``<canvas>``; no library, no CDN).

Size: the finest level covers the spots' bounding box at ``max(native, min_um_per_px)`` micrometres per
pixel, coarsened further until it holds at most ``max_pixels`` pixels; tiles with no spot within reach
are left out. Each coarser level halves the side until the whole section fits one tile, so the pyramid
adds about a third to the finest level. Budget with the defaults (1 um/px, 28 Mpx, JPEG quality 65):
a 2,000-spot section is shown at 1 um/px (a nucleus is 5-10 pixels across); a 5,000-spot Visium
section (about 6.5 x 6.5 mm) at about 1.4 um/px, and its whole report stays under 15 MB (measured
figures in BENCHMARKS.md).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence

import numpy as np

from .. import _spatial
from ..errors import InputError
from ._image import SectionImage, data_uri, encode

TILE = 512


def _microns_per_pixel(adata, library_id) -> float | None:
    try:
        return _spatial.microns_per_pixel(adata, library_id)
    except (InputError, KeyError, TypeError, ValueError):
        return None


def viewer_data(
    adata,
    layers: Sequence[Mapping],
    *,
    default: str | None,
    library_id: str | None = None,
    max_pixels: float = 28e6,
    min_um_per_px: float = 1.0,
    quality: int = 65,
    image: SectionImage | None = None,
) -> dict:
    """The JSON the viewer reads.

    ``layers``: one mapping per overlay, ``{"key", "labels", "names", "colors"}`` (the labels of
    ``obs[key]`` in order, their display names and colours). Coordinates are pixels of the finest
    pyramid level (the viewer's "base" pixels), origin at the top-left of the spots' bounding box.
    """
    from ..pl._utils import spot_shape

    xy = _spatial.coordinates(adata)
    shape, size, angle = spot_shape(adata, xy, library_id=library_id)
    pad = 1.5 * size
    x0, y0 = xy.min(axis=0) - pad
    x1, y1 = xy.max(axis=0) + pad
    w_full, h_full = float(x1 - x0), float(y1 - y0)
    um = _microns_per_pixel(adata, library_id)
    own = image is None
    image = SectionImage(adata, library_id=library_id) if own else image
    try:
        # base pixels per full-resolution pixel: no finer than the source image, nor than min_um_per_px
        f = image.scale if image else min(1.0, 2000 / max(w_full, h_full))
        if um is not None:
            f = min(f, um / min_um_per_px)
        f = min(f, math.sqrt(max_pixels / (w_full * h_full)))
        W, H = max(1, int(math.ceil(w_full * f))), max(1, int(math.ceil(h_full * f)))
        base_xy = (xy - [x0, y0]) * f
        levels = _pyramid(image, (x0, y0), f, W, H, base_xy, size * f, quality) if image else []
    finally:
        if own:
            image.close()
    spots = {
        "id": [str(s) for s in adata.obs_names],
        "x": np.round(base_xy[:, 0], 1).tolist(),
        "y": np.round(base_xy[:, 1], 1).tolist(),
    }
    out_layers = []
    for lay in layers:
        labels = list(lay["labels"])
        index = {lab: i for i, lab in enumerate(labels)}
        codes = [index.get(str(v), -1) if v == v and v is not None else -1 for v in adata.obs[lay["key"]]]
        out_layers.append({"key": lay["key"], "labels": labels, "names": list(lay["names"]),
                           "colors": list(lay["colors"]), "codes": codes, "title": lay.get("title", lay["key"])})
    return {
        "width": W, "height": H, "tile": TILE, "levels": levels,
        "um_per_px": (um / f) if um is not None else None,
        "shape": shape, "size": float(size * f), "angle": float(angle),
        "spots": spots, "layers": out_layers, "default": default,
        "image": image.kind if image else None,
    }


def _pyramid(image: SectionImage, origin, f: float, W: int, H: int, base_xy: np.ndarray, size: float,
             quality: int) -> list[dict]:
    """Levels finest first: ``{"scale", "w", "h", "cols", "rows", "tiles"}`` (tiles row-major; "" = left out)."""
    from PIL import Image

    x0, y0 = origin
    finest = np.empty((H, W, 3), np.uint8)
    band = TILE * 2
    for r0 in range(0, H, band):  # read in bands: a large slide is never decoded whole
        r1 = min(H, r0 + band)
        finest[r0:r1] = image.region(x0, y0 + r0 / f, W / f, (r1 - r0) / f, W, r1 - r0)
    levels = []
    arr, scale = finest, 1.0
    while True:
        h, w = arr.shape[:2]
        cols, rows = math.ceil(w / TILE), math.ceil(h / TILE)
        keep = _tiles_near_spots(base_xy * scale, size * scale + 2, cols, rows)
        tiles = []
        for r in range(rows):
            for c in range(cols):
                if keep[r, c]:
                    t = arr[r * TILE:(r + 1) * TILE, c * TILE:(c + 1) * TILE]
                    tiles.append(data_uri(encode(t, "JPEG", quality=quality), "image/jpeg"))
                else:
                    tiles.append("")
        levels.append({"scale": scale, "w": w, "h": h, "cols": cols, "rows": rows, "tiles": tiles})
        if max(w, h) <= TILE:
            break
        nw, nh = max(1, w // 2), max(1, h // 2)
        arr = np.asarray(Image.fromarray(arr).resize((nw, nh), Image.Resampling.BOX))
        scale = scale * nw / w
    return levels


def _tiles_near_spots(xy: np.ndarray, reach: float, cols: int, rows: int) -> np.ndarray:
    """Which tiles of a level hold a spot within ``reach`` pixels."""
    keep = np.zeros((rows, cols), bool)
    for dx in (-reach, 0.0, reach):
        for dy in (-reach, 0.0, reach):
            c = np.clip(((xy[:, 0] + dx) // TILE).astype(int), 0, cols - 1)
            r = np.clip(((xy[:, 1] + dy) // TILE).astype(int), 0, rows - 1)
            keep[r, c] = True
    return keep


def viewer_html(data: Mapping) -> str:
    """The viewer's markup, its data (a JSON block) and its script."""
    # every <, > and & as a JSON escape: no text of the input can close the block or open a comment in it
    payload = (json.dumps(data, separators=(",", ":"))
               .replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026"))
    return (
        '<div id="viewer" class="viewer">'
        '<div class="vbar"><span class="vlayers"></span>'
        '<label title="1: opaque, in the legend colours; lower: the H&amp;E shows through and the colours '
        'shift">opacity <input class="vopacity" type="range" min="0" max="1" step="0.05" value="1"></label>'
        '<label><input class="voutline" type="checkbox"> outlines only</label>'
        '<button class="vzin" title="zoom in">+</button><button class="vzout" title="zoom out">&minus;</button>'
        '<button class="vfit" title="whole section">fit</button></div>'
        '<div class="vstage"><canvas></canvas><div class="vtip"></div></div>'
        '<div class="vlegend"></div>'
        '<noscript><p class="note">The zoomable view needs JavaScript; the panels above show the same '
        "domains.</p></noscript></div>\n"
        f'<script type="application/json" id="stmorph-viewer-data">{payload}</script>\n'
        f"<script>{VIEWER_JS}</script>"
    )


VIEWER_CSS = """
.viewer{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px}
.vbar{display:flex;flex-wrap:wrap;gap:10px 16px;align-items:center;font-size:.9em;margin-bottom:6px}
.vbar label{cursor:pointer}.vbar button{min-width:2.2em;padding:2px 8px;cursor:pointer}
.vlayers label{margin-right:10px;white-space:nowrap}
.vstage{position:relative;height:min(72vh,760px);background:#f4f4f4;overflow:hidden;cursor:grab;touch-action:none}
.vstage canvas{display:block;width:100%;height:100%}
.vtip{position:absolute;pointer-events:none;background:rgba(255,255,255,.95);border:1px solid #999;
border-radius:4px;padding:4px 7px;font-size:.82em;display:none;white-space:nowrap;box-shadow:0 1px 4px rgba(0,0,0,.2)}
.vlegend{display:flex;flex-wrap:wrap;gap:4px 14px;font-size:.85em;margin-top:6px}
.vlegend span{cursor:pointer;white-space:nowrap}.vlegend span.off{opacity:.35}
.vlegend i{display:inline-block;width:.9em;height:.9em;margin-right:4px;vertical-align:-1px;border-radius:2px}
"""

VIEWER_JS = r"""
(function () {
  "use strict";
  var el = document.getElementById("stmorph-viewer-data");
  var root = document.getElementById("viewer");
  if (!el || !root) { return; }
  var D = JSON.parse(el.textContent);
  var stage = root.querySelector(".vstage"), cv = stage.querySelector("canvas"), ctx = cv.getContext("2d");
  var tip = root.querySelector(".vtip"), legend = root.querySelector(".vlegend");
  var n = D.spots.x.length, X = D.spots.x, Y = D.spots.y;
  var state = {zoom: 1, tx: 0, ty: 0, layer: D.default, opacity: 1, outline: false, solo: null, hover: -1};
  var cache = {}, pending = false, dpr = 1;
  var off = document.createElement("canvas"), octx = off.getContext("2d");

  // unit polygon of a spot (square bin / hexagon tile of width D.size); circles of diameter D.size need none
  var corners = [];
  if (D.shape === "hex" || D.shape === "square") {
    var k = D.shape === "hex" ? 6 : 4, R = D.size / 2 / Math.cos(Math.PI / k);
    for (var i = 0; i < k; i++) {
      var t = D.angle + Math.PI / k + 2 * Math.PI * i / k;
      corners.push([R * Math.cos(t), R * Math.sin(t)]);
    }
  }
  var layers = {};
  D.layers.forEach(function (L) {
    L.groups = L.labels.map(function () { return []; });
    L.codes.forEach(function (c, i) { if (c >= 0) { L.groups[c].push(i); } });
    layers[L.key] = L;
  });

  // spatial hash for hover
  var cell = Math.max(D.size, 1), grid = {};
  for (var s = 0; s < n; s++) {
    var key = Math.floor(X[s] / cell) + "," + Math.floor(Y[s] / cell);
    (grid[key] = grid[key] || []).push(s);
  }
  function nearest(bx, by) {
    var cx = Math.floor(bx / cell), cy = Math.floor(by / cell), best = -1, bd = Infinity;
    for (var dx = -1; dx <= 1; dx++) {
      for (var dy = -1; dy <= 1; dy++) {
        var g = grid[(cx + dx) + "," + (cy + dy)];
        if (!g) { continue; }
        for (var j = 0; j < g.length; j++) {
          var d = (X[g[j]] - bx) * (X[g[j]] - bx) + (Y[g[j]] - by) * (Y[g[j]] - by);
          if (d < bd) { bd = d; best = g[j]; }
        }
      }
    }
    return bd <= Math.pow(D.size * 0.6, 2) ? best : -1;
  }

  function tile(l, idx) {
    var k = l + "/" + idx, im = cache[k];
    if (!im) {
      var src = D.levels[l].tiles[idx];
      if (!src) { return null; }
      im = new Image();
      im.onload = schedule;
      im.src = src;
      cache[k] = im;
    }
    return im.complete && im.naturalWidth ? im : null;
  }
  function drawLevel(l, W, H) {
    var L = D.levels[l], s = L.scale, T = D.tile;
    var z = state.zoom;
    var c0 = Math.max(0, Math.floor((-state.tx / z) * s / T)), c1 = Math.min(L.cols - 1, Math.floor(((W - state.tx) / z) * s / T));
    var r0 = Math.max(0, Math.floor((-state.ty / z) * s / T)), r1 = Math.min(L.rows - 1, Math.floor(((H - state.ty) / z) * s / T));
    var done = true;
    for (var r = r0; r <= r1; r++) {
      for (var c = c0; c <= c1; c++) {
        var idx = r * L.cols + c;
        if (!L.tiles[idx]) { continue; }
        var im = tile(l, idx);
        if (!im) { done = false; continue; }
        var bx = c * T / s, by = r * T / s;
        ctx.drawImage(im, bx * z + state.tx, by * z + state.ty, im.naturalWidth / s * z + 0.5, im.naturalHeight / s * z + 0.5);
      }
    }
    return done;
  }
  function spotPath(path, i, grow) {  // grow: screen pixels added around a tile (closes anti-aliasing seams)
    var z = state.zoom, sx = X[i] * z + state.tx, sy = Y[i] * z + state.ty;
    if (corners.length) {
      var f = z * (1 + (grow || 0) / (D.size / 2 * z));
      path.moveTo(sx + corners[0][0] * f, sy + corners[0][1] * f);
      for (var c = 1; c < corners.length; c++) { path.lineTo(sx + corners[c][0] * f, sy + corners[c][1] * f); }
      path.closePath();
    } else {
      path.moveTo(sx + D.size / 2 * z, sy);
      path.arc(sx, sy, D.size / 2 * z, 0, 2 * Math.PI);
    }
  }
  function draw() {
    pending = false;
    var W = cv.clientWidth, H = cv.clientHeight;
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, W, H);
    ctx.imageSmoothingEnabled = true;
    if (D.levels.length) {
      var want = Math.max(state.zoom * dpr, 1e-9), l = D.levels.length - 1;
      while (l > 0 && D.levels[l].scale < want) { l--; }  // coarsest level still as fine as the screen
      drawLevel(D.levels.length - 1, W, H);
      if (l !== D.levels.length - 1) { drawLevel(l, W, H); }
    }
    var L = layers[state.layer], z = state.zoom, m = D.size * z;
    if (L) {
      // spots are filled opaque on a layer of their own, then laid over the H&E at the chosen opacity (1 by
      // default: the legend's colours exactly); no seams where neighbouring bins' anti-aliased edges meet
      var o = state.outline ? ctx : octx;
      if (!state.outline) {
        off.width = cv.width; off.height = cv.height;
        octx.setTransform(dpr, 0, 0, dpr, 0, 0);
      }
      o.lineWidth = Math.max(1, Math.min(3, m / 12));
      L.groups.forEach(function (idx, g) {
        if (state.solo !== null && state.solo !== g) { return; }
        var path = new Path2D(), any = false;
        for (var j = 0; j < idx.length; j++) {
          var i = idx[j], sx = X[i] * z + state.tx, sy = Y[i] * z + state.ty;
          if (sx < -m || sy < -m || sx > W + m || sy > H + m) { continue; }
          spotPath(path, i, state.outline ? 0 : 0.6); any = true;
        }
        if (!any) { return; }
        if (state.outline) { o.strokeStyle = L.colors[g]; o.stroke(path); } else { o.fillStyle = L.colors[g]; o.fill(path); }
      });
      if (!state.outline) {
        ctx.save(); ctx.setTransform(1, 0, 0, 1, 0, 0); ctx.globalAlpha = state.opacity;
        ctx.drawImage(off, 0, 0); ctx.restore();
      }
    }
    if (state.hover >= 0) {
      var p = new Path2D(); spotPath(p, state.hover);
      ctx.lineWidth = 2; ctx.strokeStyle = "#000"; ctx.stroke(p);
    }
    scaleBar(W, H);
  }
  function scaleBar(W, H) {
    if (!D.um_per_px) { return; }
    var umPerScreen = D.um_per_px / state.zoom, target = 120 * umPerScreen, steps = [10, 20, 50, 100, 200, 500, 1000, 2000, 5000];
    var um = steps[0];
    for (var i = 0; i < steps.length; i++) { if (steps[i] <= target) { um = steps[i]; } }
    var px = um / umPerScreen, x = 14, y = H - 16;
    ctx.fillStyle = "rgba(255,255,255,.8)"; ctx.fillRect(x - 6, y - 20, px + 12, 28);
    ctx.fillStyle = "#000"; ctx.fillRect(x, y, px, 4);
    ctx.font = "12px sans-serif"; ctx.fillText(um >= 1000 ? (um / 1000) + " mm" : um + " \u00b5m", x, y - 6);
  }
  function schedule() { if (!pending) { pending = true; window.requestAnimationFrame(draw); } }
  function resize() {
    dpr = window.devicePixelRatio || 1;
    cv.width = Math.max(1, Math.round(cv.clientWidth * dpr));
    cv.height = Math.max(1, Math.round(cv.clientHeight * dpr));
    schedule();
  }
  function fit() {
    var W = cv.clientWidth, H = cv.clientHeight;
    state.zoom = Math.min(W / D.width, H / D.height) * 0.98;
    state.tx = (W - D.width * state.zoom) / 2;
    state.ty = (H - D.height * state.zoom) / 2;
    schedule();
  }
  function zoomAt(f, sx, sy) {
    var fitZoom = Math.min(cv.clientWidth / D.width, cv.clientHeight / D.height);
    var z = Math.min(Math.max(state.zoom * f, fitZoom * 0.5), 8);
    state.tx = sx - (sx - state.tx) * z / state.zoom;
    state.ty = sy - (sy - state.ty) * z / state.zoom;
    state.zoom = z;
    schedule();
  }
  function esc(s) { return String(s).replace(/[&<>"]/g, function (c) { return {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}[c]; }); }
  function showTip(i, sx, sy) {
    if (i < 0) { tip.style.display = "none"; return; }
    var rows = ["<b>" + esc(D.spots.id[i]) + "</b>"];
    D.layers.forEach(function (L) {
      var c = L.codes[i], txt = c >= 0 ? L.names[c] : "\u2013";
      var line = esc(L.title) + ": " + esc(txt);
      rows.push(L.key === state.layer ? "<b>" + line + "</b>" : line);
    });
    tip.innerHTML = rows.join("<br>");
    tip.style.display = "block";
    var W = stage.clientWidth, tw = tip.offsetWidth;
    tip.style.left = (sx + 14 + tw > W ? sx - tw - 10 : sx + 14) + "px";
    tip.style.top = (sy + 12) + "px";
  }
  function buildLegend() {
    var L = layers[state.layer];
    legend.innerHTML = "";
    if (!L) { return; }
    L.labels.forEach(function (lab, g) {
      var s = document.createElement("span");
      s.innerHTML = '<i style="background:' + L.colors[g] + '"></i>' + esc(L.names[g]) + " (" + L.groups[g].length + ")";
      s.title = "click: show only this domain";
      if (state.solo !== null && state.solo !== g) { s.className = "off"; }
      s.onclick = function () { state.solo = state.solo === g ? null : g; buildLegend(); schedule(); };
      legend.appendChild(s);
    });
  }
  var bar = root.querySelector(".vlayers");
  [{key: "", title: "none"}].concat(D.layers).forEach(function (L) {
    var lab = document.createElement("label"), inp = document.createElement("input");
    inp.type = "radio"; inp.name = "vlayer"; inp.value = L.key; inp.checked = (L.key || null) === (state.layer || null);
    inp.onchange = function () { state.layer = L.key; state.solo = null; buildLegend(); schedule(); };
    lab.appendChild(inp); lab.appendChild(document.createTextNode(" " + L.title));
    bar.appendChild(lab);
  });
  root.querySelector(".vopacity").oninput = function (e) { state.opacity = +e.target.value; schedule(); };
  root.querySelector(".voutline").onchange = function (e) { state.outline = e.target.checked; schedule(); };
  root.querySelector(".vzin").onclick = function () { zoomAt(2, cv.clientWidth / 2, cv.clientHeight / 2); };
  root.querySelector(".vzout").onclick = function () { zoomAt(0.5, cv.clientWidth / 2, cv.clientHeight / 2); };
  root.querySelector(".vfit").onclick = fit;
  stage.addEventListener("wheel", function (e) {
    e.preventDefault();
    var r = cv.getBoundingClientRect();
    zoomAt(Math.exp(-e.deltaY * (e.deltaMode === 1 ? 0.05 : 0.0015)), e.clientX - r.left, e.clientY - r.top);
  }, {passive: false});
  var drag = null;
  stage.addEventListener("pointerdown", function (e) { drag = [e.clientX, e.clientY, state.tx, state.ty]; stage.setPointerCapture(e.pointerId); stage.style.cursor = "grabbing"; });
  stage.addEventListener("pointerup", function () { drag = null; stage.style.cursor = ""; });
  stage.addEventListener("pointermove", function (e) {
    var r = cv.getBoundingClientRect(), sx = e.clientX - r.left, sy = e.clientY - r.top;
    if (drag) { state.tx = drag[2] + e.clientX - drag[0]; state.ty = drag[3] + e.clientY - drag[1]; tip.style.display = "none"; schedule(); return; }
    var i = nearest((sx - state.tx) / state.zoom, (sy - state.ty) / state.zoom);
    if (i !== state.hover) { state.hover = i; schedule(); }
    showTip(i, sx, sy);
  });
  stage.addEventListener("pointerleave", function () { state.hover = -1; tip.style.display = "none"; schedule(); });
  stage.addEventListener("dblclick", function (e) { var r = cv.getBoundingClientRect(); zoomAt(2, e.clientX - r.left, e.clientY - r.top); });
  window.addEventListener("resize", function () { resize(); });
  buildLegend();
  resize();
  fit();
  window.stmorphViewer = {state: state, data: D, fit: fit, zoomAt: zoomAt, nearest: nearest, draw: draw};
})();
"""
