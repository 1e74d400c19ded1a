"""H&E-like rendering of a region map (numpy/scipy only, tiled, vectorised).

The image is made of stain densities, converted to RGB by the Beer-Lambert
law (``rgb = 255 * exp(-OD)``) with typical haematoxylin, eosin and red-cell
optical-density vectors:

- eosin ``E``: a per-region level modulated by a smooth stain-variation field,
  plus *periodic texture banks* computed once and looked up by global pixel
  position (so tiles join seamlessly): oriented collagen fibres (8 angles,
  blended by a smooth orientation field), adipocyte membranes (periodic
  Voronoi), fine granularity;
- haematoxylin ``H``: a per-region background plus nuclei stamped from
  per-kind sprite banks (vesicular tumour nuclei with nucleoli, small dark
  lymphocytes, spindle fibroblasts aligned with the fibres, karyorrhectic
  fragments, pale ghosts, flat endothelial nuclei, epithelial nuclei) with one
  ``np.bincount`` per tile;
- red cells ``R``: red-blood-cell discs inside vessel lumens;
- lumens (vessels and glands): white holes with a wall ring, drawn per object.

All sizes are in micrometres and converted with ``mpp`` so the texture looks the
same at any resolution. Work is done in tiles of 1024 px; memory is the output
array plus a few tile-sized float buffers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ._fields import _smooth_field

__all__ = ["render", "downsample", "texture_params", "TEXTURES"]

TILE = 1024
N_ORIENT = 8
# optical density vectors (R, G, B), normalised (Macenko-like H&E; red cells deep red)
OD_H = np.array([0.5626, 0.7201, 0.4062], np.float32)
OD_E = np.array([0.2159, 0.8012, 0.5581], np.float32)
OD_R = np.array([0.12, 0.74, 0.66], np.float32)
OD_H /= np.linalg.norm(OD_H)
OD_E /= np.linalg.norm(OD_E)
OD_R /= np.linalg.norm(OD_R)


@dataclass(frozen=True)
class NucleusKind:
    radius: float  # mean semi-major axis (um)
    radius_sd: float
    aspect: tuple[float, float]  # minor/major range
    darkness: float  # haematoxylin density at the centre
    chromatin: float = 0.2  # relative amplitude of chromatin texture
    rim: float = 0.0  # vesicular nuclei: extra density at the membrane
    nucleolus: float = 0.0  # probability of a visible nucleolus
    oriented: bool = False  # follows the local fibre orientation / vessel tangent
    fragments: int = 0  # karyorrhexis: this many small dots instead of one nucleus
    channel: int = 0  # 0 = haematoxylin, 1 = red cells
    pale_centre: float = 0.0  # red cells: biconcave look


KINDS: dict[str, NucleusKind] = {
    "tumour": NucleusKind(5.6, 1.3, (0.6, 0.95), 1.25, chromatin=0.35, rim=0.45, nucleolus=0.5),
    "spindle": NucleusKind(6.0, 1.0, (0.22, 0.38), 1.5, chromatin=0.15, oriented=True),
    "lymph": NucleusKind(3.1, 0.35, (0.85, 1.0), 2.1, chromatin=0.15),
    "fragment": NucleusKind(1.1, 0.3, (0.7, 1.0), 1.9, fragments=4),
    "ghost": NucleusKind(4.8, 0.8, (0.6, 0.95), 0.35, chromatin=0.3),
    "flat": NucleusKind(5.5, 0.8, (0.25, 0.4), 1.5, chromatin=0.1, oriented=True),
    "epi": NucleusKind(3.8, 0.5, (0.6, 0.9), 1.6, chromatin=0.25, rim=0.2),
    "rbc": NucleusKind(3.6, 0.25, (0.85, 1.0), 1.2, chromatin=0.0, channel=1, pale_centre=0.45),
}


@dataclass(frozen=True)
class LumenKind:
    radius: tuple[float, float]  # semi-major axis range (um)
    aspect: tuple[float, float]
    wall: float  # wall thickness (um)
    wall_e: float  # eosin in the wall
    wall_h: float  # haematoxylin (cytoplasm) in the wall
    rbc: tuple[float, float]  # fraction of the lumen filled with red cells
    ring: str  # nucleus kind lining the lumen
    ring_spacing: float  # um between lining nuclei
    ring_depth: float  # where the lining nuclei sit, as a fraction of the wall thickness


LUMENS: dict[str, LumenKind] = {
    "vessel": LumenKind((8.0, 24.0), (0.45, 1.0), 2.5, 0.95, 0.08, (0.2, 0.9), "flat", 22.0, 0.5),
    "gland": LumenKind((18.0, 45.0), (0.55, 1.0), 13.0, 0.42, 0.28, (0.0, 0.0), "epi", 7.5, 0.45),
}

#: Texture of each region type. Densities are per mm^2.
TEXTURES: dict[str, dict] = {
    "glass": dict(eosin=0.025, h_bg=0.008, grain=0.01, fibre=0.0, adipose=0.0, nuclei={}, lumens={}),
    "tumour": dict(eosin=0.42, h_bg=0.13, grain=0.10, fibre=0.0, adipose=0.0,
                   nuclei={"tumour": 5200.0, "lymph": 150.0}, lumens={}),
    "stroma": dict(eosin=0.12, h_bg=0.015, grain=0.04, fibre=0.85, adipose=0.0,
                   nuclei={"spindle": 900.0, "lymph": 80.0}, lumens={"vessel": 6.0}),
    "vessel": dict(eosin=0.12, h_bg=0.015, grain=0.04, fibre=0.85, adipose=0.0,
                   nuclei={"spindle": 900.0, "lymph": 80.0}, lumens={"vessel": 350.0}),
    "immune": dict(eosin=0.22, h_bg=0.06, grain=0.06, fibre=0.15, adipose=0.0,
                   nuclei={"lymph": 9000.0, "spindle": 200.0}, lumens={}),
    "necrosis": dict(eosin=0.70, h_bg=0.07, grain=0.22, fibre=0.0, adipose=0.0,
                     nuclei={"fragment": 3500.0, "ghost": 900.0}, lumens={}),
    "adipose": dict(eosin=0.015, h_bg=0.0, grain=0.01, fibre=0.0, adipose=0.9,
                    nuclei={"flat": 120.0}, lumens={"vessel": 4.0}),
    "gland": dict(eosin=0.14, h_bg=0.02, grain=0.04, fibre=0.55, adipose=0.0,
                  nuclei={"spindle": 600.0}, lumens={"gland": 110.0}),
}


def texture_params(texture: str, *, image_strength: float = 1.0) -> dict:
    """The texture parameters of a region type (as stored in ``uns["synthetic"]["texture_params"]``)."""
    t = TEXTURES[texture]
    out = {k: float(v) for k, v in t.items() if not isinstance(v, dict)}
    out["nuclei_per_mm2"] = {k: float(v) for k, v in t["nuclei"].items()}
    lum = {k: float(v) for k, v in t["lumens"].items()}
    if texture == "vessel":
        lum = {k: float(v) * image_strength for k, v in lum.items()}
    out["lumens_per_mm2"] = lum
    return out


# ----------------------------------------------------------------------------------------------
# sprite banks and periodic textures
# ----------------------------------------------------------------------------------------------
def _sprite_bank(kind: NucleusKind, mpp: float, rng: np.random.Generator, n_var: int = 32):
    """(n_var, S, S) float32 sprites of one nucleus kind; sprite v has angle bin v % N_ORIENT if oriented."""
    rmax = kind.radius + 2.5 * kind.radius_sd
    if kind.fragments:
        rmax = 4.5 + rmax
    S = int(math.ceil(2 * rmax / mpp)) + 3
    S += 1 - S % 2
    c = S // 2
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32) - c
    bank = np.zeros((n_var, S, S), np.float32)
    for v in range(n_var):
        if kind.oriented:
            theta = (v % N_ORIENT) * math.pi / N_ORIENT + rng.uniform(-0.5, 0.5) * math.pi / N_ORIENT
        else:
            theta = rng.uniform(0, math.pi)
        if kind.fragments:
            n_frag = rng.integers(2, kind.fragments + 2)
            centres = rng.normal(0, 1.8, (n_frag, 2)) / mpp
            img = np.zeros((S, S), np.float32)
            for cy, cx in centres:
                r = max(kind.radius + rng.normal(0, kind.radius_sd), 0.5) / mpp
                d = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2) / max(r, 0.6)
                img = np.maximum(img, np.clip((1.0 - d) * r + 0.5, 0, 1))
            bank[v] = kind.darkness * img
            continue
        a = max(kind.radius + rng.normal(0, kind.radius_sd), 0.8 * kind.radius - kind.radius_sd) / mpp
        b = a * rng.uniform(*kind.aspect)
        ct, st = math.cos(theta), math.sin(theta)
        u = xx * ct + yy * st
        w = -xx * st + yy * ct
        # irregular outline (pleomorphism): radius modulated by angle
        ang = np.arctan2(w, u)
        wobble = 1.0 + 0.08 * np.sin(3 * ang + rng.uniform(0, 6.3)) + 0.05 * np.sin(5 * ang + rng.uniform(0, 6.3))
        r = np.sqrt((u / a) ** 2 + (w / b) ** 2) / wobble
        edge = np.clip((1.0 - r) * b + 0.5, 0, 1)  # ~1 px soft edge
        dens = np.ones((S, S), np.float32)
        if kind.chromatin:
            noise = rng.standard_normal((S, S)).astype(np.float32)
            from scipy import ndimage

            noise = ndimage.gaussian_filter(noise, max(0.6 / mpp, 0.7))
            noise /= noise.std() + 1e-6
            dens += kind.chromatin * noise
        if kind.rim:
            dens += kind.rim * np.exp(-((r - 0.85) / 0.12) ** 2) - 0.35 * kind.rim
        if kind.pale_centre:
            dens -= kind.pale_centre * np.exp(-(r / 0.45) ** 2)
        if kind.nucleolus and rng.random() < kind.nucleolus:
            oy, ox = rng.normal(0, 0.25 * b, 2)
            rn = max(0.9 / mpp, 0.8)
            dens += 1.2 * np.exp(-(((yy - oy) ** 2 + (xx - ox) ** 2) / (rn**2)))
        bank[v] = kind.darkness * edge * np.clip(dens, 0.05, None)
    return bank


def _periodic_noise(rng, P: int, sigma_par: float, sigma_perp: float | None = None, theta: float = 0.0):
    """Periodic (P x P) Gaussian random field, anisotropic Gaussian spectrum, mean 0 sd 1."""
    sigma_perp = sigma_par if sigma_perp is None else sigma_perp
    noise = rng.standard_normal((P, P))
    fy = np.fft.fftfreq(P)[:, None]
    fx = np.fft.fftfreq(P)[None, :]
    kpar = fx * math.cos(theta) + fy * math.sin(theta)
    kperp = -fx * math.sin(theta) + fy * math.cos(theta)
    kern = np.exp(-2 * math.pi**2 * ((sigma_par * kpar) ** 2 + (sigma_perp * kperp) ** 2))
    f = np.real(np.fft.ifft2(np.fft.fft2(noise) * kern))
    f -= f.mean()
    return (f / (f.std() + 1e-12)).astype(np.float32)


def _fibre_bank(rng, P: int, mpp: float) -> np.ndarray:
    """(N_ORIENT, P, P) collagen texture in [0, 1]: thin wavy streaks along angle k*pi/N_ORIENT."""
    bank = np.empty((N_ORIENT, P, P), np.float32)
    for k in range(N_ORIENT):
        theta = k * math.pi / N_ORIENT
        f = _periodic_noise(rng, P, 14.0 / mpp, 1.1 / mpp, theta)
        bank[k] = 1.0 / (1.0 + np.exp(-3.5 * (f - 0.35)))
    return bank


def _adipose_texture(rng, P: int, mpp: float) -> np.ndarray:
    """Periodic membranes of adipocytes (Voronoi cell borders), ~75 um cells, values in [0, 1]."""
    from scipy.spatial import cKDTree

    cell = 75.0 / mpp
    n = max(int(round(P / cell)), 2)
    g = (np.stack(np.meshgrid(np.arange(n), np.arange(n), indexing="ij"), -1).reshape(-1, 2) + 0.5) * (P / n)
    pts = (g + rng.uniform(-0.35, 0.35, g.shape) * (P / n)) % P
    tree = cKDTree(pts, boxsize=P)
    yy, xx = np.mgrid[0:P, 0:P]
    d, _ = tree.query(np.column_stack([yy.ravel() + 0.5, xx.ravel() + 0.5]) % P, k=2)
    gap = (d[:, 1] - d[:, 0]).reshape(P, P)
    w = max(1.0 / mpp, 1.0)
    return np.exp(-((gap / (2 * w)) ** 2)).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# object placement (global, so tiles agree)
# ----------------------------------------------------------------------------------------------
def _sample_in_label(rng, flat_cells: np.ndarray, n: int, W: int, cell_um: float) -> np.ndarray:
    """n uniform points (y, x in um) inside the given label cells."""
    pick = flat_cells[rng.integers(0, flat_cells.size, n)]
    yx = np.column_stack([pick // W, pick % W]).astype(np.float64)
    return (yx + rng.random((n, 2))) * cell_um


def _lumen_bank(kind: LumenKind, mpp: float, rng: np.random.Generator, n_var: int = 48):
    """Sprites of lumens of one kind: (lumen, wall) each (n_var, S, S) and their (a, b, theta) in um."""
    S = int(math.ceil(2 * (kind.radius[1] + kind.wall + 2.0) / mpp)) + 1
    S += 1 - S % 2
    c = S // 2
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32) - c
    lum = np.zeros((n_var, S, S), np.float32)
    wall = np.zeros((n_var, S, S), np.float32)
    params = np.zeros((n_var, 3))
    t_px = kind.wall / mpp
    for v in range(n_var):
        a = rng.uniform(*kind.radius)
        b = a * rng.uniform(*kind.aspect)
        th = rng.uniform(0, math.pi)
        params[v] = a, b, th
        ap, bp = a / mpp, b / mpp
        u = xx * math.cos(th) + yy * math.sin(th)
        w = -xx * math.sin(th) + yy * math.cos(th)
        d = (np.sqrt((u / ap) ** 2 + (w / bp) ** 2) - 1.0) * math.sqrt(ap * bp)  # ~signed distance (px)
        lum[v] = np.clip(0.5 - d, 0, 1)
        wall[v] = np.clip(0.5 + np.minimum(d, t_px - d), 0, 1)
    return lum, wall, params


def _bilinear(field: np.ndarray, y0: int, x0: int, h: int, w: int, mpp: float, cell_um: float,
              step: int = 4) -> np.ndarray:
    """Bilinear upsample of smooth coarse fields (C, Hc, Wc) (cell centres every cell_um) to the pixel
    tile [y0:y0+h, x0:x0+w], evaluated every ``step`` px and repeated (the fields vary over >= 40 um)."""
    def weights(n, start, n_in):
        u = (start + np.arange(0, n, step) + step / 2) * mpp / cell_um - 0.5
        u = np.clip(u, 0, n_in - 1)
        i0 = np.minimum(np.floor(u).astype(np.int64), max(n_in - 2, 0))
        f = (u - i0).astype(np.float32)
        return i0, np.minimum(i0 + 1, n_in - 1), f

    a0, a1, fa = weights(h, y0, field.shape[-2])
    b0, b1, fb = weights(w, x0, field.shape[-1])
    rows = field[:, a0, :] * (1 - fa)[:, None] + field[:, a1, :] * fa[:, None]
    small = rows[:, :, b0] * (1 - fb) + rows[:, :, b1] * fb
    return np.repeat(np.repeat(small, step, axis=1), step, axis=2)[:, :h, :w]


def _nearest_crop(labels: np.ndarray, y0: int, x0: int, h: int, w: int, mpp: float, cell_um: float) -> np.ndarray:
    """Nearest-neighbour upsampling of the label map to a pixel tile (monotone index: np.repeat)."""
    def runs(n, start, n_in):
        idx = np.clip(((start + np.arange(n) + 0.5) * mpp / cell_um).astype(np.int64), 0, n_in - 1)
        u, cnt = np.unique(idx, return_counts=True)
        return u, cnt

    uy, cy = runs(h, y0, labels.shape[0])
    ux, cx = runs(w, x0, labels.shape[1])
    crop = labels[uy[0]:uy[-1] + 1, ux[0]:ux[-1] + 1]
    return np.repeat(np.repeat(crop, cy, axis=0), cx, axis=1)


def render(labels: np.ndarray, textures: list[str], *, width_px: int, height_px: int, mpp: float,
           label_cell_um: float, random_state=0, image_strength: float = 1.0, noise: float = 1.0,
           progress: bool = False) -> np.ndarray:
    """Render the H&E-like image of a region map.

    Parameters
    ----------
    labels
        (Hc, Wc) uint8 region map, one cell per ``label_cell_um``; 0 = glass, i = ``textures[i - 1]``.
    textures
        Texture name (key of :data:`TEXTURES`) of each region label.
    width_px, height_px, mpp
        Output size and pixel size (micrometres).
    random_state
        Seed (int).
    image_strength
        Multiplies the vessel density of the "vessel" texture.
    noise
        Scales stain variation and pixel noise.

    Returns
    -------
    uint8 array (height_px, width_px, 3).
    """
    seed = 0 if random_state is None else int(random_state)
    rng = np.random.default_rng(seed)
    tex_names = ["glass"] + list(textures)
    tex = [TEXTURES[t] for t in tex_names]
    nl = len(tex)
    lut = {k: np.array([t[k] for t in tex], np.float32) for k in ("eosin", "h_bg", "grain", "fibre", "adipose")}
    Hc, Wc = labels.shape
    cell_area_mm2 = (label_cell_um * 1e-3) ** 2
    flat_labels = labels.ravel()
    order_l = np.argsort(flat_labels, kind="stable")
    bounds = np.searchsorted(flat_labels[order_l], np.arange(nl + 1))
    cells_of = [order_l[bounds[k]:bounds[k + 1]] for k in range(nl)]

    # smooth fields at 40 um: stain variation (E, H) and fibre orientation (cos 2t, sin 2t)
    fcell = 40.0
    fh, fw = int(math.ceil(Hc * label_cell_um / fcell)) + 1, int(math.ceil(Wc * label_cell_um / fcell)) + 1
    stain = np.stack([_smooth_field(rng, (fh, fw), 6.0), _smooth_field(rng, (fh, fw), 6.0)])
    stain = (1.0 + 0.10 * noise * stain).astype(np.float32)
    o1, o2 = _smooth_field(rng, (fh, fw), 1.6), _smooth_field(rng, (fh, fw), 1.6)
    norm = np.sqrt(o1**2 + o2**2) + 1e-9
    orient = np.stack([o1 / norm, o2 / norm]).astype(np.float32)  # (cos 2t, sin 2t)

    # periodic texture banks (looked up by global pixel position modulo P: tiles join seamlessly)
    P = int(2 ** math.ceil(math.log2(max(512.0, 300.0 / mpp))))
    P = min(P, 4096)
    need_fibre = bool((lut["fibre"] > 0).any())
    need_adipose = bool((lut["adipose"] > 0).any())
    fibres = _fibre_bank(rng, P, mpp).ravel() if need_fibre else None
    ext = lambda t: np.tile(t, (int(math.ceil((P + TILE) / P)),) * 2)[: P + TILE, : P + TILE].copy()  # noqa: E731
    adipose = ext(_adipose_texture(rng, P, mpp)) if need_adipose else None
    grain = ext(_periodic_noise(rng, P, 1.2 / mpp))

    # stamp kinds: nuclei / red cells (one channel) and lumens (lumen + wall channels)
    # channels: 0 haematoxylin, 1 red cells, 2 lumen, 3 wall eosin, 4 wall haematoxylin
    kind_names = list(KINDS)
    stamp_banks: list[list[tuple[int, np.ndarray]]] = []
    for k in kind_names:
        b = _sprite_bank(KINDS[k], mpp, rng)
        stamp_banks.append([(KINDS[k].channel, b.reshape(b.shape[0], -1))])
    sizes = [_sprite_bank_size(b) for b in stamp_banks]
    lumen_kinds = list(LUMENS)
    lumen_params = []
    for lk in lumen_kinds:
        kind = LUMENS[lk]
        lum, wall, params = _lumen_bank(kind, mpp, rng)
        n = lum.shape[0]
        stamp_banks.append([(2, lum.reshape(n, -1)), (3, (wall * kind.wall_e).reshape(n, -1)),
                            (4, (wall * kind.wall_h).reshape(n, -1))])
        sizes.append(lum.shape[1])
        lumen_params.append(params)

    objs = []  # rows: y_um, x_um, stamp kind, variant

    # lumens, their linings and red cells
    for lab in range(1, nl):
        for lk, dens in tex[lab]["lumens"].items():
            if tex_names[lab] == "vessel":
                dens = dens * image_strength
            n = rng.poisson(dens * cells_of[lab].size * cell_area_mm2)
            if n == 0:
                continue
            li = lumen_kinds.index(lk)
            kind = LUMENS[lk]
            cyx = _sample_in_label(rng, cells_of[lab], n, Wc, label_cell_um)
            var = rng.integers(0, lumen_params[li].shape[0], n)
            objs.append(np.column_stack([cyx, np.full(n, len(kind_names) + li), var]))
            kidx = kind_names.index(kind.ring)
            nv = stamp_banks[kidx][0][1].shape[0]
            fills = rng.uniform(*kind.rbc, n)
            for (cy, cx), v, fill in zip(cyx, var, fills):
                a, b, th = lumen_params[li][v]
                perim = math.pi * (3 * (a + b) - math.sqrt((3 * a + b) * (a + 3 * b)))
                m = max(int(perim / kind.ring_spacing), 2)
                phi = rng.uniform(0, 2 * math.pi, m) if kind.ring == "flat" else (
                    np.linspace(0, 2 * math.pi, m, endpoint=False) + rng.normal(0, 0.05, m))
                depth = kind.wall * kind.ring_depth
                u, w = (a + depth) * np.cos(phi), (b + depth) * np.sin(phi)
                ct, st = math.cos(th), math.sin(th)
                ys, xs = cy + u * st + w * ct, cx + u * ct - w * st
                if KINDS[kind.ring].oriented:  # along the tangent of the wall
                    tx = -a * np.sin(phi) * ct - b * np.cos(phi) * st
                    ty = -a * np.sin(phi) * st + b * np.cos(phi) * ct
                    t = np.arctan2(ty, tx)
                    vv = rng.integers(0, nv // N_ORIENT, m) * N_ORIENT + (np.round(t / (math.pi / N_ORIENT)).astype(int) % N_ORIENT)
                else:
                    vv = rng.integers(0, nv, m)
                objs.append(np.column_stack([ys, xs, np.full(m, kidx), vv]))
                n_rbc = int(fill * a * b / (KINDS["rbc"].radius ** 2) * 0.8)
                if n_rbc:
                    rr = np.sqrt(rng.random(n_rbc)) * 0.8
                    ph = rng.uniform(0, 2 * math.pi, n_rbc)
                    u, w = a * rr * np.cos(ph), b * rr * np.sin(ph)
                    objs.append(np.column_stack([cy + u * st + w * ct, cx + u * ct - w * st,
                                                 np.full(n_rbc, kind_names.index("rbc")), rng.integers(0, 32, n_rbc)]))
    # nuclei of each region
    for lab in range(1, nl):
        for kname, dens in tex[lab]["nuclei"].items():
            n = rng.poisson(dens * cells_of[lab].size * cell_area_mm2)
            if n == 0:
                continue
            kidx = kind_names.index(kname)
            yx = _sample_in_label(rng, cells_of[lab], n, Wc, label_cell_um)
            nv = stamp_banks[kidx][0][1].shape[0]
            var = rng.integers(0, nv, n)
            if KINDS[kname].oriented:  # follow the local fibre orientation
                fy = np.clip((yx[:, 0] / fcell).astype(int), 0, fh - 1)
                fx = np.clip((yx[:, 1] / fcell).astype(int), 0, fw - 1)
                t = 0.5 * np.arctan2(orient[1, fy, fx], orient[0, fy, fx]) + rng.normal(0, 0.15, n)
                var = (var // N_ORIENT) * N_ORIENT + (np.round(t / (math.pi / N_ORIENT)).astype(int) % N_ORIENT)
            objs.append(np.column_stack([yx, np.full(n, kidx), var]))
    objs = np.concatenate(objs) if objs else np.zeros((0, 4))
    obj_px = np.round(objs[:, :2] / mpp).astype(np.int64)
    obj_kind = objs[:, 2].astype(np.int64)
    obj_var = objs[:, 3].astype(np.int64)
    pad = max(sizes)

    # bucket objects by tile
    nty, ntx = int(math.ceil(height_px / TILE)), int(math.ceil(width_px / TILE))
    ty_o = np.clip(obj_px[:, 0] // TILE, 0, nty - 1)
    tx_o = np.clip(obj_px[:, 1] // TILE, 0, ntx - 1)
    tid = ty_o * ntx + tx_o
    obj_order = np.argsort(tid, kind="stable")
    obj_starts = np.searchsorted(tid[obj_order], np.arange(nty * ntx + 1))
    offsets = []
    for S in sizes:
        oy, ox = np.mgrid[0:S, 0:S]
        offsets.append((oy.ravel(), ox.ravel(), S))

    out = np.empty((height_px, width_px, 3), np.uint8)
    glass_rgb = np.array([241, 239, 243], np.float32)
    noise_bank = rng.standard_normal(TILE * TILE + 65537, dtype=np.float32) * np.float32(2.5 * noise)
    n_tiles = nty * ntx
    for ti in range(n_tiles):
        ty, tx = divmod(ti, ntx)
        y0, x0 = ty * TILE, tx * TILE
        h, w = min(TILE, height_px - y0), min(TILE, width_px - x0)
        trng = np.random.default_rng([seed, ty, tx])
        lab = _nearest_crop(labels, y0, x0, h, w, mpp, label_cell_um)
        present = np.unique(lab)
        oy_, ox_ = y0 % P, x0 % P
        st = _bilinear(stain, y0, x0, h, w, mpp, fcell)  # (2, h, w)
        g = grain[oy_:oy_ + h, ox_:ox_ + w]
        E = np.take(lut["eosin"], lab)
        E *= st[0]
        E += np.take(lut["grain"], lab) * g
        H = np.take(lut["h_bg"], lab)
        H *= st[1]
        H *= 1.0 + 0.5 * g
        if need_fibre and (lut["fibre"][present] > 0).any():
            oc = _bilinear(orient, y0, x0, h, w, mpp, fcell)
            q = np.arctan2(oc[1], oc[0])
            q *= N_ORIENT / (2 * math.pi)  # orientation t = atan2 / 2, bin = t / (pi / N_ORIENT)
            q %= N_ORIENT
            q0 = q.astype(np.int64)
            f = q - q0
            q0 %= N_ORIENT  # float32 rounding can give q == N_ORIENT
            base = (((y0 + np.arange(h)) % P) * P)[:, None] + ((x0 + np.arange(w)) % P)[None, :]
            i0 = q0 * (P * P) + base
            q0 += 1
            q0 %= N_ORIENT
            i1 = q0 * (P * P) + base
            F = np.take(fibres, i0)
            F *= 1 - f
            F += np.take(fibres, i1) * f
            F *= np.take(lut["fibre"], lab)
            F *= st[0]
            E += F
        if need_adipose and (lut["adipose"][present] > 0).any():
            E += np.take(lut["adipose"], lab) * adipose[oy_:oy_ + h, ox_:ox_ + w]
        # stamps: nuclei, red cells, lumens, one bincount per channel
        hb, wb = h + 2 * pad, w + 2 * pad
        sel = [obj_order[obj_starts[j * ntx + i]:obj_starts[j * ntx + i + 1]]
               for j in range(max(ty - 1, 0), min(ty + 2, nty)) for i in range(max(tx - 1, 0), min(tx + 2, ntx))]
        sel = np.concatenate(sel)
        py, px = obj_px[sel, 0], obj_px[sel, 1]
        half = pad // 2
        sel = sel[(py >= y0 - half) & (py < y0 + h + half) & (px >= x0 - half) & (px < x0 + w + half)]
        idx_ch: dict[int, list] = {}
        for k in np.unique(obj_kind[sel]):
            s_k = sel[obj_kind[sel] == k]
            oy, ox, S = offsets[k]
            top = obj_px[s_k, 0] - S // 2 - (y0 - pad)
            left = obj_px[s_k, 1] - S // 2 - (x0 - pad)
            flat = ((top * wb + left)[:, None] + (oy * wb + ox)[None, :]).ravel()
            for ch, bank in stamp_banks[k]:
                idx_ch.setdefault(ch, []).append((flat, bank[obj_var[s_k] % bank.shape[0]].ravel()))
        acc = {}
        for ch, parts in idx_ch.items():
            fl = np.concatenate([p[0] for p in parts])
            wt = np.concatenate([p[1] for p in parts])
            acc[ch] = np.bincount(fl, wt, minlength=hb * wb).reshape(hb, wb)[pad:pad + h, pad:pad + w].astype(np.float32)
        if 0 in acc:
            H += np.minimum(acc[0], 3.0) * st[1]
        R = acc.get(1)
        if 2 in acc:  # lumens: white holes with a wall; nuclei inside a lumen are removed
            keep = 1.0 - np.minimum(acc[2], 1.0)
            E *= keep
            H *= keep
            if 3 in acc:
                we = np.minimum(acc[3], 1.0) * keep
                E *= 1.0 - we
                E += we * st[0]
                H += np.minimum(acc[4], 1.0) * keep
            E += (1.0 - keep) * 0.02
        # Beer-Lambert to RGB, then pixel noise (from a precomputed bank at a random offset)
        np.maximum(E, 0, out=E)
        dst = out[y0:y0 + h, x0:x0 + w]
        for c in range(3):
            od = H * OD_H[c]
            od += E * OD_E[c]
            if R is not None:
                od += R * OD_R[c]
            np.negative(od, out=od)
            np.exp(od, out=od)
            od *= glass_rgb[c]
            if noise > 0:
                start = int(trng.integers(0, noise_bank.size - h * w))
                od += noise_bank[start:start + h * w].reshape(h, w)
            np.clip(od, 0, 255, out=od)
            dst[..., c] = od
        if progress and (ti % max(n_tiles // 10, 1) == 0 or ti == n_tiles - 1):
            print(f"rendered tile {ti + 1}/{n_tiles}", flush=True)
    return out


def _sprite_bank_size(bank_list) -> int:
    n = bank_list[0][1].shape[1]
    return int(round(math.sqrt(n)))


def downsample(img: np.ndarray, scale: float) -> np.ndarray:
    """Antialiased downsampling (Pillow) to ``scale`` x the size (as Space Ranger's hires/lowres images)."""
    from PIL import Image

    h, w = img.shape[:2]
    size = (max(int(round(w * scale)), 1), max(int(round(h * scale)), 1))
    if size == (w, h):
        return img.copy()
    pil = Image.fromarray(img)
    return np.asarray(pil.resize(size, Image.Resampling.LANCZOS, reducing_gap=2.0))
