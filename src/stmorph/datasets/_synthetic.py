"""Synthetic Visium-like tissue: hexagonal spot grid, spatial regions, counts and an H&E-like image.

The tissue is built in physical units (micrometres) and only then mapped to
pixels, so the same seed gives the same section at any image resolution.

Steps (each a small function below):

1. ``_spot_grid``: a Visium hexagonal grid (100 um pitch, 55 um spots; array
   columns step by 2 and odd rows are offset by one column) and a rounded,
   slightly irregular tissue outline holding exactly ``n_spots`` spots.
2. ``_region_map``: a region label for every 5 um cell of the section, from
   smoothed random fields (one per base region, argmax with biases tuned to
   the target areas). Tumour is then carved by distance to its border into a
   necrotic core, a hypoxic rim around it and viable tumour outside.
3. ``_counts``: negative-binomial (gamma-Poisson) counts. Each expression
   *program* up-regulates its own planted genes over a shared background;
   spots mix a little with their neighbours, vary in library size and in
   program activity, and carry spatially smooth nuisance programs.
4. ``stmorph.datasets._image.render``: the H&E-like image, texture chosen per
   region.

Two regions are built to need both modalities: the *image-only* region
("vessel-rich") expresses exactly the stroma program but looks different
(lumens, red blood cells, endothelium), and the *expression-only* region
("hypoxic-tumour") has exactly the tumour texture but its own program (``expression_only_strength``
blends it with the tumour program: 1 = its own, 0 = the tumour's).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ._fields import _smooth_field

__all__ = ["synthetic", "REGIONS"]

PITCH_UM = 100.0
SPOT_DIAMETER_UM = 55.0
ROW_STEP_UM = PITCH_UM * math.sqrt(3.0) / 2.0  # vertical distance between array rows
LABEL_CELL_UM = 5.0  # resolution of the region map
FIELD_CELL_UM = 40.0  # resolution of smooth random fields
MARGIN_UM = 150.0  # glass around the spot grid
LIBRARY_ID = "synthetic"


@dataclass(frozen=True)
class Region:
    name: str
    texture: str  # key into _image.TEXTURES
    program: str  # expression program name
    area: float  # target share of the tissue area (renormalised over the regions used)
    markers: tuple[str, ...] = ()  # named marker genes of its program


#: Region catalogue, in the order regions are added as ``n_regions`` grows (4..8).
REGIONS: tuple[Region, ...] = (
    Region("tumour", "tumour", "tumour", 0.17, ("ERBB2", "KRT19", "EPCAM", "MKI67")),
    Region("stroma", "stroma", "stroma", 0.18, ("COL1A1", "COL3A1", "DCN", "LUM")),
    Region("vessel-rich", "vessel", "stroma", 0.14),  # image-only: stroma program, own texture
    Region("hypoxic-tumour", "tumour", "hypoxic", 0.12, ("VEGFA", "CA9", "SLC2A1", "NDRG1")),  # expression-only
    Region("immune", "immune", "immune", 0.10, ("PTPRC", "CD3E", "MS4A1", "CD74")),
    Region("necrosis", "necrosis", "necrosis", 0.10, ("HSPA1A", "DDIT3", "MT2A")),
    Region("adipose", "adipose", "adipose", 0.10, ("ADIPOQ", "PLIN1", "FABP4")),
    Region("gland", "gland", "gland", 0.09, ("KRT5", "KRT14", "ACTA2", "MUC1")),
)
IMAGE_ONLY = ("vessel-rich", "stroma")  # (region, parent it shares the expression program with)
EXPRESSION_ONLY = ("hypoxic-tumour", "tumour")  # (region, parent it shares the texture with)
#: Program of the expression-only region -> program of its parent (``expression_only_strength`` blends them).
PROGRAM_PARENT = {"hypoxic": "tumour"}
#: Library size factor per program (necrotic tissue yields fewer reads).
LIBRARY_FACTOR = {"necrosis": 0.45, "immune": 1.15, "adipose": 0.6}


def _region(name: str) -> Region:
    return next(r for r in REGIONS if r.name == name)


def _rng(random_state) -> np.random.Generator:
    if isinstance(random_state, np.random.Generator):
        return random_state
    return np.random.default_rng(random_state)


def _zoom_to(field: np.ndarray, shape: tuple[int, int], cell_ratio: float) -> np.ndarray:
    """Bilinear resampling of a coarse field (cell centres) onto a finer grid of ``shape``."""
    def weights(n_out, n_in):
        u = (np.arange(n_out) + 0.5) / cell_ratio - 0.5
        u = np.clip(u, 0, n_in - 1)
        i0 = np.minimum(np.floor(u).astype(int), max(n_in - 2, 0))
        f = u - i0
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, f

    y0, y1, fy = weights(shape[0], field.shape[0])
    x0, x1, fx = weights(shape[1], field.shape[1])
    rows = field[y0] * (1 - fy)[:, None] + field[y1] * fy[:, None]
    return rows[:, x0] * (1 - fx)[None, :] + rows[:, x1] * fx[None, :]


def _barcodes(n: int, offset: int = 0) -> np.ndarray:
    """Deterministic Visium-like barcodes ``ACGT...-1`` (16 bases)."""
    idx = np.arange(offset, offset + n, dtype=np.int64)
    # spread consecutive indices over the 4^16 space with an odd multiplier (a bijection mod 2^32)
    code = (idx * 2654435761 + 12345) % (1 << 32)
    bases = np.array(list("ACGT"))
    digits = (code[:, None] >> (2 * np.arange(16)[::-1])) & 3
    return np.array(["".join(b) + "-1" for b in bases[digits]])


# ----------------------------------------------------------------------------------------------
# 1. spot grid and tissue outline
# ----------------------------------------------------------------------------------------------
def _spot_grid(n_spots: int, rng: np.random.Generator, tissue_fraction: float = 0.68):
    """Visium hex grid covering ~n_spots/tissue_fraction positions; pick the n_spots inside a blob."""
    n_grid = n_spots / tissue_fraction
    # square physical extent: rows * ROW_STEP = cols * PITCH
    n_cols = max(int(math.ceil(math.sqrt(n_grid * ROW_STEP_UM / PITCH_UM))), 3)
    n_rows = max(int(math.ceil(n_grid / n_cols)), 3)
    rows, cols = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
    array_row = rows.ravel()
    array_col = (2 * cols + (rows % 2)).ravel()
    x_um = MARGIN_UM + array_col * (PITCH_UM / 2.0)
    y_um = MARGIN_UM + array_row * ROW_STEP_UM
    width_um = 2 * MARGIN_UM + (2 * n_cols - 1) * PITCH_UM / 2.0
    height_um = 2 * MARGIN_UM + (n_rows - 1) * ROW_STEP_UM
    # tissue outline: a superellipse warped by a smooth field; exactly n_spots spots inside
    cx, cy = width_um / 2, height_um / 2
    ax, ay = (width_um / 2 - MARGIN_UM), (height_um / 2 - MARGIN_UM)
    fshape = (int(math.ceil(height_um / FIELD_CELL_UM)), int(math.ceil(width_um / FIELD_CELL_UM)))
    warp = _smooth_field(rng, fshape, sigma=max(fshape) / 6)

    def shape_value(xu, yu):
        u = np.abs((xu - cx) / ax)
        v = np.abs((yu - cy) / ay)
        r = (u**2.4 + v**2.4) ** (1 / 2.4)
        fi = np.clip((yu / FIELD_CELL_UM).astype(int), 0, fshape[0] - 1)
        fj = np.clip((xu / FIELD_CELL_UM).astype(int), 0, fshape[1] - 1)
        box = np.maximum(u, v)  # keep the tissue inside the spot grid (steep rise near its border)
        return r + 0.09 * warp[fi, fj] + 20.0 * np.maximum(box - 0.96, 0.0)

    s = shape_value(x_um, y_um)
    order = np.argsort(s, kind="stable")
    if n_spots > s.size:
        n_spots = s.size
    inside = np.zeros(s.size, bool)
    inside[order[:n_spots]] = True
    thr = s[order[n_spots - 1]] if n_spots == s.size else 0.5 * (s[order[n_spots - 1]] + s[order[n_spots]])
    return dict(
        array_row=array_row, array_col=array_col, x_um=x_um, y_um=y_um, inside=inside,
        width_um=width_um, height_um=height_um, shape_value=shape_value, threshold=thr,
    )


# ----------------------------------------------------------------------------------------------
# 2. region map
# ----------------------------------------------------------------------------------------------
def _region_map(regions, grid, rng: np.random.Generator, scale_um: float):
    """Label every LABEL_CELL_UM cell: 0 = glass, i + 1 = regions[i]."""
    H = int(math.ceil(grid["height_um"] / LABEL_CELL_UM))
    W = int(math.ceil(grid["width_um"] / LABEL_CELL_UM))
    yc = (np.arange(H) + 0.5) * LABEL_CELL_UM
    xc = (np.arange(W) + 0.5) * LABEL_CELL_UM
    tissue = grid["shape_value"](xc[None, :], yc[:, None]) <= grid["threshold"]

    names = [r.name for r in regions]
    carved = [n for n in ("necrosis", "hypoxic-tumour") if n in names]
    base = [r for r in regions if r.name not in carved]
    area = {r.name: r.area for r in regions}
    tumour_total = area["tumour"] + sum(area[n] for n in carved)
    target = np.array([tumour_total if r.name == "tumour" else area[r.name] for r in base])
    target = target / target.sum()

    fshape = (int(math.ceil(grid["height_um"] / FIELD_CELL_UM)), int(math.ceil(grid["width_um"] / FIELD_CELL_UM)))
    ratio = FIELD_CELL_UM / LABEL_CELL_UM
    sigma = scale_um / FIELD_CELL_UM
    fields = np.stack([_zoom_to(_smooth_field(rng, fshape, sigma), (H, W), ratio) for _ in base])
    rough = _zoom_to(_smooth_field(rng, (H // 4 + 1, W // 4 + 1), 2.0), (H, W), 4.0)
    fields += 0.15 * rough[None]  # irregular borders
    def assign(fields):
        """argmax of the fields plus per-region biases tuned so areas match the targets."""
        bias = np.zeros(len(base))
        t = fields[:, tissue]
        sub = t[:, :: max(t.shape[1] // 40000, 1)]  # tune the biases on a subsample of tissue cells
        for it in range(60):
            lab = np.argmax(sub + bias[:, None], axis=0)
            frac = np.bincount(lab, minlength=len(base)) / lab.size
            bias += (0.6 if it < 30 else 0.2) * (target - frac) / target.max()
        return np.argmax(t + bias[:, None], axis=0)

    lab_t = assign(fields)
    base_names = [r.name for r in base]
    if "immune" in base_names:  # immune infiltrate gathers along the tumour margin
        from scipy import ndimage

        tum = np.zeros((H, W), bool)
        tum[tissue] = lab_t == base_names.index("tumour")
        if tum.any() and not tum[tissue].all():
            d = (ndimage.distance_transform_edt(~tum) + ndimage.distance_transform_edt(tum)) * LABEL_CELL_UM
            fields[base_names.index("immune")] += 1.2 * np.exp(-((d / 150.0) ** 2))
            lab_t = assign(fields)

    index = {n: i + 1 for i, n in enumerate(names)}
    labels = np.zeros((H, W), np.uint8)
    labels[tissue] = np.array([index[r.name] for r in base], np.uint8)[lab_t]
    if carved:
        from scipy import ndimage

        tum = labels == index["tumour"]
        if tum.any():
            depth = ndimage.distance_transform_edt(tum)
            d = depth[tum]
            order = np.argsort(-d, kind="stable")
            sizes = [area[n] / tumour_total for n in carved]
            assign = labels[tum]
            start = 0
            for n, share in zip(carved, sizes):  # necrosis innermost, hypoxic rim next
                stop = start + int(round(share * d.size))
                assign[order[start:stop]] = index[n]
                start = stop
            labels[tum] = assign
    return labels


# ----------------------------------------------------------------------------------------------
# 3. counts
# ----------------------------------------------------------------------------------------------
def _gene_programs(regions, rng, *, n_genes, n_program_genes, fold_change, expression_strength, n_nuisance,
                   program_strength=None):
    """Genes and expression programs: (var names, program -> gene indices, nuisance gene sets, programs,
    background log-abundance per gene, log fold changes (n_programs, n_genes))."""
    programs = []
    for r in regions:
        if r.program not in programs:
            programs.append(r.program)
    markers = {}
    for r in regions:
        markers.setdefault(r.program, list(r.markers))
    named = [g for p in programs for g in markers[p]]
    n_needed = len(programs) * n_program_genes + n_nuisance * n_program_genes // 2
    if n_genes < max(n_needed + 20, len(named) + 20):
        from ..errors import InputError

        msg = (f"n_genes={n_genes} is too small for {len(programs)} programs of {n_program_genes} genes; "
               f"use n_genes >= {max(n_needed + 20, len(named) + 20)} or fewer program genes.")
        raise InputError(msg)
    var_names = [f"GENE{i:04d}" for i in range(1, n_genes + 1)]
    perm = rng.permutation(n_genes)
    prog_genes: dict[str, np.ndarray] = {}
    pos = 0
    for p in programs:
        idx = perm[pos:pos + n_program_genes]
        pos += n_program_genes
        prog_genes[p] = idx
        for j, g in enumerate(markers[p][:n_program_genes]):
            var_names[idx[j]] = g
    nuis_genes = [perm[pos + k * (n_program_genes // 2): pos + (k + 1) * (n_program_genes // 2)] for k in range(n_nuisance)]

    # background: log-normal relative abundance, planted genes made moderately expressed
    log_p = rng.normal(0.0, 1.1, n_genes)
    for p in programs:
        log_p[prog_genes[p]] = rng.normal(-0.3, 0.6, n_program_genes)
    lfc = np.zeros((len(programs), n_genes))
    for k, p in enumerate(programs):
        lo, hi = np.log(fold_change[0]), np.log(fold_change[1])
        lfc[k, prog_genes[p]] = rng.uniform(lo, hi, n_program_genes)
        # a few genes of other programs go down a little (mutual exclusivity, as in real tissue)
        others = np.concatenate([prog_genes[q] for q in programs if q != p])
        down = rng.choice(others, size=min(len(others), n_program_genes // 3), replace=False)
        lfc[k, down] -= rng.uniform(0.2, 0.7, down.size)
    lfc *= expression_strength
    for p, s in (program_strength or {}).items():  # s = 1: own program; s = 0: its parent's program
        b = PROGRAM_PARENT.get(p)
        if p in programs and b in programs:
            lfc[programs.index(p)] = s * lfc[programs.index(p)] + (1.0 - s) * lfc[programs.index(b)]
    return var_names, prog_genes, nuis_genes, programs, log_p, lfc


def _counts(regions, region_of_spot, xy_um, rng, *, n_genes, n_program_genes, fold_change,
            expression_strength, mixing, library_size, dispersion, nuisance_strength, n_nuisance,
            program_strength=None):
    """Negative-binomial counts; returns (X dense int32, var names, program -> gene indices, programs)."""
    var_names, prog_genes, nuis_genes, programs, log_p, lfc = _gene_programs(
        regions, rng, n_genes=n_genes, n_program_genes=n_program_genes, fold_change=fold_change,
        expression_strength=expression_strength, n_nuisance=n_nuisance, program_strength=program_strength)
    n = region_of_spot.size
    prog_index = np.array([programs.index(regions[i].program) for i in region_of_spot])
    onehot = np.zeros((n, len(programs)))
    onehot[np.arange(n), prog_index] = 1.0
    # neighbour mixing: a spot captures some transcripts of the tissue around it
    from scipy.spatial import cKDTree

    tree = cKDTree(xy_um)
    pairs = tree.query_pairs(PITCH_UM * 1.05, output_type="ndarray")
    nb = onehot.copy()
    np.add.at(nb, pairs[:, 0], onehot[pairs[:, 1]])
    np.add.at(nb, pairs[:, 1], onehot[pairs[:, 0]])
    nb /= nb.sum(1, keepdims=True)
    w = (1 - mixing) * onehot + mixing * nb
    activity = np.exp(rng.normal(0.0, 0.25, n))[:, None]  # program activity per spot
    logits = log_p[None, :] + activity * (w @ lfc)
    # nuisance programs: spatially smooth, unrelated to the regions
    if n_nuisance and nuisance_strength > 0:
        ext = xy_um.max(0) + 1
        for k in range(n_nuisance):
            shp = (int(ext[1] // 200) + 2, int(ext[0] // 200) + 2)
            f = _smooth_field(rng, shp, sigma=3.0)
            val = f[(xy_um[:, 1] // 200).astype(int), (xy_um[:, 0] // 200).astype(int)]
            logits[:, nuis_genes[k]] += nuisance_strength * val[:, None] * rng.uniform(0.5, 1.0, nuis_genes[k].size)[None, :]
    logits -= logits.max(1, keepdims=True)
    prob = np.exp(logits)
    prob /= prob.sum(1, keepdims=True)
    lib_factor = np.array([LIBRARY_FACTOR.get(regions[i].program, 1.0) for i in region_of_spot])
    lib = library_size * lib_factor * np.exp(rng.normal(0.0, 0.35, n))
    mu = prob * lib[:, None]
    theta = dispersion * np.exp(rng.normal(0.0, 0.3, n_genes))[None, :]
    lam = rng.gamma(shape=theta, scale=mu / theta)
    X = rng.poisson(lam).astype(np.float32)
    return X, var_names, prog_genes, programs, lfc


# ----------------------------------------------------------------------------------------------
# public entry point
# ----------------------------------------------------------------------------------------------
def synthetic(
    n_spots: int = 2000,
    *,
    n_regions: int = 6,
    n_genes: int = 1000,
    microns_per_pixel: float = 1.0,
    image: bool = True,
    image_size: int | None = None,
    random_state: int | np.random.Generator | None = 0,
    region_scale_um: float | None = None,
    n_program_genes: int = 30,
    fold_change: tuple[float, float] = (3.0, 6.0),
    expression_strength: float = 1.0,
    expression_only_strength: float = 1.0,
    mixing: float = 0.2,
    library_size: float = 4000.0,
    dispersion: float = 4.0,
    nuisance_strength: float = 0.3,
    n_nuisance: int = 3,
    image_strength: float = 1.0,
    image_noise: float = 1.0,
    progress: bool = False,
):
    """Synthetic Visium-like section with an H&E-like full-resolution image and known regions.

    A hexagonal grid of 55 um spots at 100 um pitch (Visium array coordinates)
    covers a roundish piece of tissue divided into ``n_regions`` spatially
    coherent regions. Counts are negative binomial from region programs; the
    image is rendered with region-specific texture. One region differs from its
    parent only in the image ("vessel-rich" vs "stroma") and one only in
    expression ("hypoxic-tumour" vs "tumour"), so methods that use both
    modalities can beat either one alone.

    Parameters
    ----------
    n_spots
        Number of in-tissue spots (exact).
    n_regions
        4 to 8 regions, taken in this order: tumour, stroma, vessel-rich
        (image-only), hypoxic-tumour (expression-only), immune, necrosis,
        adipose, gland.
    n_genes
        Number of genes: ``GENE0001``... plus a few named markers planted in the programs.
    microns_per_pixel
        Pixel size of the full-resolution image (ignored when ``image_size`` is given).
    image
        Render the image (``False``: no images, scalefactors still set; much faster).
    image_size
        Longest side of the full-resolution image in pixels; sets ``microns_per_pixel``.
    random_state
        Seed; the same seed gives the same data.
    region_scale_um
        Length scale of the region blobs (default: a sixth of the section width).
    n_program_genes, fold_change, expression_strength
        Genes per program, their fold-change range, and a multiplier on the log fold changes.
    expression_only_strength
        How far the expression-only region is from its parent in expression: its log fold changes are
        ``s * own + (1 - s) * parent's`` (1: its own program, 0: exactly the tumour program). The
        counterpart of ``image_strength``.
    mixing
        Fraction of a spot's expression program taken from its 6 neighbours.
    library_size, dispersion
        Median UMIs per spot and the negative-binomial shape (smaller = noisier).
    nuisance_strength, n_nuisance
        Spatially smooth programs unrelated to the regions (log-scale amplitude).
    image_strength
        Scales how strongly the image-only region differs from its parent (vessel density).
    image_noise
        Scales pixel noise and stain variation of the image.
    progress
        Print rendering progress.

    Returns
    -------
    AnnData with raw counts in ``X`` (CSR float32) and

    - ``obs``: ``in_tissue``, ``array_row``, ``array_col``, ``annotation`` (region names, categorical)
    - ``obsm["spatial"]``: spot centres in full-resolution pixels (x = column, y = row)
    - ``uns["spatial"]["synthetic"]``: ``images`` (``fullres`` in memory, ``hires``, ``lowres``),
      ``scalefactors``, ``metadata`` (technology "synthetic", spot_diameter_um 55, microns_per_pixel)
    - ``uns["synthetic"]``: ``regions``, ``region_genes`` (planted up-regulated genes of the program
      each region expresses; the image-only region lists its parent's), ``programs``, ``textures``,
      ``image_only``, ``expression_only``, ``parents``, ``params``.
    """
    import anndata as ad
    import pandas as pd
    from scipy import sparse

    from ..errors import InputError

    if not 4 <= int(n_regions) <= len(REGIONS):
        msg = f"n_regions={n_regions} is not allowed; use 4 to {len(REGIONS)}."
        raise InputError(msg)
    if int(n_spots) < 10:
        msg = f"n_spots={n_spots} is too small; use at least 10."
        raise InputError(msg)
    if microns_per_pixel <= 0:
        msg = f"microns_per_pixel must be positive; got {microns_per_pixel}."
        raise InputError(msg)
    rng = _rng(random_state)
    seed_image = int(rng.integers(2**31))
    regions = REGIONS[: int(n_regions)]

    grid = _spot_grid(int(n_spots), rng)
    if image_size is not None:
        if int(image_size) < 64:
            msg = f"image_size={image_size} is too small; use at least 64 pixels."
            raise InputError(msg)
        microns_per_pixel = max(grid["width_um"], grid["height_um"]) / int(image_size)
    mpp = float(microns_per_pixel)
    scale = region_scale_um or max(grid["width_um"], grid["height_um"]) / 6.0
    labels = _region_map(regions, grid, rng, scale)

    inside = grid["inside"]
    x_um, y_um = grid["x_um"][inside], grid["y_um"][inside]
    li = np.clip((y_um / LABEL_CELL_UM).astype(int), 0, labels.shape[0] - 1)
    lj = np.clip((x_um / LABEL_CELL_UM).astype(int), 0, labels.shape[1] - 1)
    lab_spot = labels[li, lj].astype(int) - 1
    if (lab_spot < 0).any():  # spot centre on a glass cell at the outline: take the nearest tissue cell
        from scipy import ndimage

        _, (ii, jj) = ndimage.distance_transform_edt(labels == 0, return_indices=True)
        bad = lab_spot < 0
        lab_spot[bad] = labels[ii[li[bad], lj[bad]], jj[li[bad], lj[bad]]].astype(int) - 1

    xy_um = np.column_stack([x_um, y_um])
    X, var_names, prog_genes, programs, lfc = _counts(
        regions, lab_spot, xy_um, rng, n_genes=int(n_genes), n_program_genes=int(n_program_genes),
        fold_change=fold_change, expression_strength=expression_strength, mixing=mixing,
        program_strength={_region(EXPRESSION_ONLY[0]).program: float(expression_only_strength)},
        library_size=library_size, dispersion=dispersion, nuisance_strength=nuisance_strength,
        n_nuisance=int(n_nuisance),
    )

    barcodes = _barcodes(int(inside.size))
    obs = pd.DataFrame(
        {
            "in_tissue": np.ones(inside.sum(), dtype=np.int64),
            "array_row": grid["array_row"][inside].astype(np.int64),
            "array_col": grid["array_col"][inside].astype(np.int64),
            "annotation": pd.Categorical([regions[i].name for i in lab_spot], categories=[r.name for r in regions]),
        },
        index=pd.Index(barcodes[inside], name=None),
    )
    var = pd.DataFrame({"gene_ids": [f"SYNG{i:05d}" for i in range(1, len(var_names) + 1)],
                        "feature_types": "Gene Expression"}, index=pd.Index(var_names))
    adata = ad.AnnData(X=sparse.csr_matrix(X), obs=obs, var=var)
    # whole pixels, as Space Ranger writes them
    adata.obsm["spatial"] = np.rint(np.column_stack([x_um / mpp, y_um / mpp])).astype(np.float64)

    width_px = int(math.ceil(grid["width_um"] / mpp - 1e-6))
    height_px = int(math.ceil(grid["height_um"] / mpp - 1e-6))
    hires_s = min(1.0, 2000.0 / max(width_px, height_px))
    lowres_s = min(1.0, 600.0 / max(width_px, height_px))
    spot_px = SPOT_DIAMETER_UM / mpp
    images = {}
    texture_params = {}
    from . import _image

    for r in regions:
        texture_params[r.texture] = _image.texture_params(r.texture, image_strength=image_strength)
    if image:
        full = _image.render(
            labels, [r.texture for r in regions], width_px=width_px, height_px=height_px, mpp=mpp,
            label_cell_um=LABEL_CELL_UM, random_state=seed_image, image_strength=image_strength,
            noise=image_noise, progress=progress,
        )
        images["fullres"] = full
        images["hires"] = _image.downsample(full, hires_s)
        images["lowres"] = _image.downsample(images["hires"], lowres_s / hires_s)

    adata.uns["spatial"] = {
        LIBRARY_ID: {
            "images": images,
            "scalefactors": {
                "spot_diameter_fullres": float(spot_px),
                "tissue_hires_scalef": float(hires_s),
                "tissue_lowres_scalef": float(lowres_s),
                "fiducial_diameter_fullres": float(spot_px * 1.615),
            },
            "metadata": {
                "technology": "synthetic",
                "spot_diameter_um": SPOT_DIAMETER_UM,
                "microns_per_pixel": mpp,
                "image_shape": np.array([height_px, width_px], dtype=np.int64),
            },
        }
    }
    program_of = {r.name: r.program for r in regions}
    names = [r.name for r in regions]
    adata.uns["synthetic"] = {
        "regions": names,
        "region_genes": {r.name: [var_names[i] for i in prog_genes[r.program]] for r in regions},
        "programs": program_of,
        "textures": {r.name: r.texture for r in regions},
        "texture_params": texture_params,
        "image_only": IMAGE_ONLY[0],
        "expression_only": EXPRESSION_ONLY[0],
        "parents": {IMAGE_ONLY[0]: IMAGE_ONLY[1], EXPRESSION_ONLY[0]: EXPRESSION_ONLY[1]},
        "params": {
            "n_spots": int(n_spots), "n_regions": int(n_regions), "n_genes": int(n_genes),
            "microns_per_pixel": mpp, "image": bool(image), "image_size": -1 if image_size is None else int(image_size),
            "random_state": -1 if not isinstance(random_state, (int, np.integer)) else int(random_state),
            "region_scale_um": float(scale), "n_program_genes": int(n_program_genes),
            "fold_change": [float(fold_change[0]), float(fold_change[1])],
            "expression_strength": float(expression_strength),
            "expression_only_strength": float(expression_only_strength), "mixing": float(mixing),
            "library_size": float(library_size), "dispersion": float(dispersion),
            "nuisance_strength": float(nuisance_strength), "n_nuisance": int(n_nuisance),
            "image_strength": float(image_strength), "image_noise": float(image_noise),
            "pitch_um": PITCH_UM,
        },
        # grid positions outside the tissue, so a writer can list them as in_tissue = 0
        "off_tissue": {
            "barcode": barcodes[~inside],
            "array_row": grid["array_row"][~inside].astype(np.int64),
            "array_col": grid["array_col"][~inside].astype(np.int64),
            "spatial": np.rint(np.column_stack([grid["x_um"][~inside] / mpp, grid["y_um"][~inside] / mpp])),
        },
    }
    return adata
