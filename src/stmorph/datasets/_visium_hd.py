"""Synthetic Visium HD section (2 um square bins) and a writer of Space Ranger HD ``outs/`` folders.

The section has the region design of :func:`stmorph.datasets.synthetic` (same region catalogue, the
image-only "vessel-rich" and expression-only "hypoxic-tumour" regions, the same H&E-like texture per region)
on a Visium HD capture area: a square grid of 2 um bins, ``size_um`` a side (6.5 mm on a real slide).

Steps:

1. ``_tissue``: a rounded, slightly irregular tissue outline covering ``tissue_fraction`` of the capture area,
   and the region map of :func:`stmorph.datasets._synthetic._region_map` (5 um cells).
2. ``_bin_counts``: counts of every 2 um bin under tissue, sampled UMI by UMI, stripe by stripe (memory is the
   sparse counts, never a dense bins x genes matrix). A bin's expression profile is that of the region at a
   point a few micrometres away (transcripts diffuse laterally, so borders blur), scaled by a cell-sized
   (8 um) activity level and carrying the spatially smooth nuisance programs; library sizes vary per 8 um
   block and per bin. Profiles are quantised (region program x nuisance levels x activity level) so each UMI
   is one table look-up.
3. The H&E-like image: :func:`stmorph.datasets._image.render` over the region map.

:func:`write_visium_hd` writes ``binned_outputs/square_002um|008um|016um/`` (summed with
:func:`stmorph.read.rebin`) and the full-resolution image as a tiled pyramidal BigTIFF.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ..errors import DependencyError, InputError
from ._fields import _smooth_field
from ._synthetic import (
    EXPRESSION_ONLY,
    FIELD_CELL_UM,
    IMAGE_ONLY,
    LABEL_CELL_UM,
    LIBRARY_FACTOR,
    REGIONS,
    _gene_programs,
    _region,
    _region_map,
    _rng,
)

__all__ = ["synthetic_visium_hd", "write_visium_hd"]

BIN_UM = 2  # the finest bin of Visium HD
MARGIN_UM = 150.0  # glass around the capture area in the image
LIBRARY_ID = "synthetic_hd"
STRIPE_ROWS = 128  # 2 um rows per stripe of count sampling (a multiple of 8: 16 um bins never straddle stripes)
N_ACTIVITY = 4  # quantised activity levels per 8 um block
HIRES_MAX_SIDE = 6000  # Space Ranger's tissue_hires_image.png for a 6.5 mm HD capture area
LOWRES_MAX_SIDE = 600
POSITIONS_COLUMNS = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]


# ----------------------------------------------------------------------------------------------
# 1. tissue outline and regions
# ----------------------------------------------------------------------------------------------
def _tissue(size_um: float, tissue_fraction: float, rng: np.random.Generator) -> dict:
    n = int(math.ceil(size_um / BIN_UM))
    cap = n * BIN_UM
    side = cap + 2 * MARGIN_UM
    centre, half = side / 2, cap / 2
    fs = int(math.ceil(side / FIELD_CELL_UM))
    warp = _smooth_field(rng, (fs, fs), sigma=max(fs / 6, 1.0))

    def shape_value(xu, yu):
        u = np.abs((xu - centre) / half)
        v = np.abs((yu - centre) / half)
        r = (u**2.4 + v**2.4) ** (1 / 2.4)
        fi = np.clip((yu / FIELD_CELL_UM).astype(int), 0, fs - 1)
        fj = np.clip((xu / FIELD_CELL_UM).astype(int), 0, fs - 1)
        box = np.maximum(u, v)  # keep the tissue on the capture area
        return r + 0.09 * warp[fi, fj] + 20.0 * np.maximum(box - 0.97, 0.0)

    m = int(math.ceil(side / LABEL_CELL_UM))
    cc = (np.arange(m) + 0.5) * LABEL_CELL_UM
    on_capture = (cc > MARGIN_UM) & (cc < MARGIN_UM + cap)
    s = shape_value(cc[on_capture][None, :], cc[on_capture][:, None])
    threshold = float(np.quantile(s, tissue_fraction))
    return dict(n_bins=n, capture_um=cap, width_um=side, height_um=side, shape_value=shape_value,
                threshold=threshold)


# ----------------------------------------------------------------------------------------------
# 2. counts of the 2 um bins
# ----------------------------------------------------------------------------------------------
class _Profiles:
    """Cumulative gene distributions of quantised profiles (program, nuisance levels, activity), built lazily."""

    def __init__(self, log_p, lfc, nuis_genes, nuis_load, nuisance_strength, activity_levels):
        self.log_p, self.lfc = log_p, lfc
        self.nuis_genes, self.nuis_load = nuis_genes, nuis_load
        self.strength, self.activity = nuisance_strength, activity_levels
        self.n_genes = log_p.size
        self.n_nuis = len(nuis_genes)
        self.cache: dict[int, np.ndarray] = {}

    def code(self, program, nuis_q, activity):
        """Profile code of each bin: program, nuisance levels (-2..2 each), activity level."""
        c = program.astype(np.int64)
        for k in range(self.n_nuis):
            c = c * 5 + (nuis_q[k].astype(np.int64) + 2)
        return c * N_ACTIVITY + activity

    def cdf(self, code: int) -> np.ndarray:
        if code not in self.cache:
            c, a = divmod(code, N_ACTIVITY)
            levels = []
            for _ in range(self.n_nuis):
                c, q = divmod(c, 5)
                levels.append(q - 2)
            levels = levels[::-1]
            logits = self.log_p + self.activity[a] * self.lfc[c]
            for k, q in enumerate(levels):
                logits[self.nuis_genes[k]] += self.strength * q * self.nuis_load[k]
            p = np.exp(logits - logits.max())
            cdf = np.cumsum(p)
            self.cache[code] = cdf / cdf[-1]
        return self.cache[code]


def _bin_counts(labels, grid, regions, rng, *, n_genes, n_program_genes, fold_change, expression_strength,
                expression_only_strength, library_size, nuisance_strength, n_nuisance, diffusion_um, progress):
    """CSR counts of every 2 um bin under tissue (row-major), with their array rows/cols and region labels."""
    import scipy.sparse as sp

    var_names, prog_genes, nuis_genes, programs, log_p, lfc = _gene_programs(
        regions, rng, n_genes=n_genes, n_program_genes=n_program_genes, fold_change=fold_change,
        expression_strength=expression_strength, n_nuisance=n_nuisance,
        program_strength={_region(EXPRESSION_ONLY[0]).program: float(expression_only_strength)})
    n = grid["n_bins"]
    H, W = labels.shape
    prog_of_label = np.array([0] + [programs.index(r.program) for r in regions], dtype=np.int64)
    lib_of_label = np.array([1.0] + [LIBRARY_FACTOR.get(r.program, 1.0) for r in regions])
    # spatially smooth nuisance programs (200 um cells, as in datasets.synthetic), quantised to 5 levels
    cell = 200.0
    nf = int(math.ceil((grid["width_um"]) / cell)) + 2
    nuis_fields = [_smooth_field(rng, (nf, nf), sigma=3.0) for _ in range(n_nuisance)]
    nuis_load = [rng.uniform(0.5, 1.0, g.size) for g in nuis_genes]
    from scipy.stats import norm

    activity_levels = np.exp(0.25 * norm.ppf((np.arange(N_ACTIVITY) + 0.5) / N_ACTIVITY))
    profiles = _Profiles(log_p, lfc, nuis_genes, nuis_load, nuisance_strength if n_nuisance else 0.0,
                         activity_levels)
    n8 = int(math.ceil(n / 4))
    block_lib = np.exp(rng.normal(0.0, 0.35, (n8, n8))).astype(np.float32)  # cells per 8 um block vary
    block_act = rng.integers(0, N_ACTIVITY, (n8, n8)).astype(np.int64)
    per_bin = library_size / 16.0  # library_size is per 8 um bin (16 bins of 2 um)

    x_um = MARGIN_UM + (np.arange(n) + 0.5) * BIN_UM
    lj_c = np.clip((x_um / LABEL_CELL_UM).astype(np.int64), 0, W - 1)
    parts, rows_all, cols_all, lab_all = [], [], [], []
    n_stripes = int(math.ceil(n / STRIPE_ROWS))
    for si in range(n_stripes):
        r0, r1 = si * STRIPE_ROWS, min(n, (si + 1) * STRIPE_ROWS)
        y_um = MARGIN_UM + (np.arange(r0, r1) + 0.5) * BIN_UM
        li = np.clip((y_um / LABEL_CELL_UM).astype(np.int64), 0, H - 1)
        lab = labels[li[:, None], lj_c[None, :]]
        rr, cc = np.nonzero(lab)
        if rr.size == 0:
            continue
        own = lab[rr, cc].astype(np.int64)
        yb, xb = y_um[rr], x_um[cc]
        # the region whose transcripts a bin captures: a point diffusion_um away (borders blur)
        sy = np.clip(((yb + rng.normal(0, diffusion_um, rr.size)) / LABEL_CELL_UM).astype(np.int64), 0, H - 1)
        sx = np.clip(((xb + rng.normal(0, diffusion_um, rr.size)) / LABEL_CELL_UM).astype(np.int64), 0, W - 1)
        src = labels[sy, sx].astype(np.int64)
        src = np.where(src > 0, src, own)
        nq = [np.clip(np.rint(f[(yb // cell).astype(np.int64), (xb // cell).astype(np.int64)]), -2, 2)
              for f in nuis_fields]
        br, bc = (rr + r0) // 4, cc // 4
        code = profiles.code(prog_of_label[src], nq, block_act[br, bc])
        lib = per_bin * lib_of_label[src] * block_lib[br, bc] * np.exp(rng.normal(0.0, 0.25, rr.size))
        n_umi = rng.poisson(lib)
        uniq, inv = np.unique(code, return_inverse=True)
        table = np.stack([profiles.cdf(int(u)) for u in uniq]) + np.arange(uniq.size)[:, None]
        shift = np.repeat(inv, n_umi)
        gene = np.searchsorted(table.ravel(), rng.random(shift.size) + shift, side="right") - shift * n_genes
        np.clip(gene, 0, n_genes - 1, out=gene)
        key = np.repeat(np.arange(rr.size, dtype=np.int64), n_umi) * n_genes + gene
        key, cnt = np.unique(key, return_counts=True)
        row = key // n_genes
        indptr = np.concatenate([[0], np.cumsum(np.bincount(row, minlength=rr.size))])
        parts.append(sp.csr_matrix((cnt.astype(np.float32), (key % n_genes).astype(np.int32), indptr),
                                   shape=(rr.size, n_genes)))
        rows_all.append((rr + r0).astype(np.int32))
        cols_all.append(cc.astype(np.int32))
        lab_all.append(own.astype(np.uint8))
        if progress and (si % max(n_stripes // 10, 1) == 0 or si == n_stripes - 1):
            print(f"counts: stripe {si + 1}/{n_stripes}", flush=True)
    X = sp.vstack(parts, format="csr")
    return (X, np.concatenate(rows_all), np.concatenate(cols_all), np.concatenate(lab_all), var_names, prog_genes,
            programs)


# ----------------------------------------------------------------------------------------------
# public entry point
# ----------------------------------------------------------------------------------------------
def synthetic_visium_hd(
    size_um: float = 600.0,
    *,
    bin_size: int = BIN_UM,
    n_regions: int = 6,
    n_genes: int = 500,
    microns_per_pixel: float = 0.5,
    image: bool = True,
    tissue_fraction: float = 0.7,
    random_state: int | np.random.Generator | None = 0,
    region_scale_um: float | None = None,
    n_program_genes: int = 30,
    fold_change: tuple[float, float] = (3.0, 6.0),
    expression_strength: float = 1.0,
    expression_only_strength: float = 1.0,
    library_size: float = 150.0,
    diffusion_um: float = 3.0,
    nuisance_strength: float = 0.3,
    n_nuisance: int = 3,
    image_strength: float = 1.0,
    image_noise: float = 1.0,
    progress: bool = False,
):
    """Synthetic Visium HD section: square bins with counts, known regions and an H&E-like image.

    Counts are sampled for every 2 um bin under tissue, then (``bin_size`` > 2) summed into larger bins
    exactly as :func:`stmorph.read.rebin` does, so the sections at 2, 8 and 16 um hold the same UMIs.

    Parameters
    ----------
    size_um
        Side of the square capture area (6500 on a real Visium HD slide; the default 600 keeps tests fast:
        ~4,000 bins of 8 um under tissue). Memory grows with the number of UMIs, not with bins x genes.
    bin_size
        Side of the returned bins: 2, or a multiple of 2 (8, 16 ...).
    n_regions, n_genes, region_scale_um, n_program_genes, fold_change, expression_strength
        As in :func:`stmorph.datasets.synthetic` (the region catalogue and the image-only and expression-only
        regions are the same).
    expression_only_strength, nuisance_strength, n_nuisance, image_strength, image_noise
        As in :func:`stmorph.datasets.synthetic`.
    microns_per_pixel
        Pixel size of the full-resolution image (Visium HD microscopes: ~0.25-0.5 um). The image spans the
        capture area plus a 150 um margin: at full size and 0.3 um/px that is ~22,700 px a side (1.5 GB in
        memory).
    image
        Render the image (``False``: no image, scale factors still set; much faster).
    tissue_fraction
        Share of the capture area under tissue.
    random_state
        Seed; the same seed gives the same data.
    library_size
        Mean UMIs per 8 um bin (necrotic, adipose and immune tissue scaled as in ``synthetic``).
    diffusion_um
        Lateral diffusion: a bin captures the transcripts of the region at a point this far away (s.d.).
    progress
        Print progress.

    Returns
    -------
    AnnData of the bins under tissue (row-major), raw counts in ``X`` (CSR float32), and

    - ``obs``: ``in_tissue``, ``array_row``, ``array_col`` (0-based; a ``b`` um bin is 2 um bins
      ``array_row * b/2 ... + b/2 - 1``), ``annotation`` (the region of the bin centre; for bins larger than
      2 um, the most frequent among its 2 um bins); barcodes ``s_008um_00012_00034-1``
    - ``obsm["spatial"]``: bin centres in full-resolution pixels (x = column, y = row)
    - ``uns["spatial"]["synthetic_hd"]``: ``images`` (``fullres`` in memory, ``hires`` at most 6000 px,
      ``lowres`` 600 px), ``scalefactors`` (``spot_diameter_fullres`` = the bin side in px, ``bin_size_um``,
      ``microns_per_pixel``, ``tissue_hires_scalef``, ``tissue_lowres_scalef``, ``regist_target_img_scalef``),
      ``metadata`` (``technology="visium_hd"``, ``bin_size_um``, ``spot_diameter_um``, ``microns_per_pixel``,
      ``image_shape``)
    - ``uns["synthetic"]``: as :func:`stmorph.datasets.synthetic` sets it, plus ``capture`` (the 2 um grid:
      ``n_rows``, ``n_cols``) for writers listing every bin of the capture area.
    """
    import anndata as ad
    import pandas as pd

    from ..read._visium_hd import aggregate_bins, bin_barcodes

    if not 4 <= int(n_regions) <= len(REGIONS):
        msg = f"n_regions={n_regions} is not allowed; use 4 to {len(REGIONS)}."
        raise InputError(msg)
    if not size_um >= 100:
        msg = f"size_um={size_um} is too small; use at least 100 (um)."
        raise InputError(msg)
    if not (isinstance(bin_size, (int, np.integer)) and bin_size >= BIN_UM and bin_size % BIN_UM == 0):
        msg = f"bin_size={bin_size!r} is not allowed; use 2 or a multiple of 2 um (8, 16 ...)."
        raise InputError(msg)
    if not microns_per_pixel > 0:
        msg = f"microns_per_pixel must be positive; got {microns_per_pixel}."
        raise InputError(msg)
    if not 0.05 <= tissue_fraction <= 0.95:
        msg = f"tissue_fraction={tissue_fraction} is not allowed; use 0.05 to 0.95."
        raise InputError(msg)
    rng = _rng(random_state)
    seed_image = int(rng.integers(2**31))
    regions = REGIONS[: int(n_regions)]
    grid = _tissue(float(size_um), float(tissue_fraction), rng)
    scale = region_scale_um or grid["capture_um"] / 6.0
    labels = _region_map(regions, grid, rng, scale)
    X, rows, cols, lab, var_names, prog_genes, _ = _bin_counts(
        labels, grid, regions, rng, n_genes=int(n_genes), n_program_genes=int(n_program_genes),
        fold_change=fold_change, expression_strength=expression_strength,
        expression_only_strength=expression_only_strength, library_size=float(library_size),
        nuisance_strength=nuisance_strength, n_nuisance=int(n_nuisance), diffusion_um=float(diffusion_um),
        progress=progress)

    k = int(bin_size) // BIN_UM
    n_cat = len(regions)
    codes = lab.astype(np.int64) - 1
    if k > 1:
        rows, cols, X, member = aggregate_bins(rows, cols, X, k)
        votes = np.bincount(member * n_cat + codes, minlength=rows.size * n_cat).reshape(rows.size, n_cat)
        codes = votes.argmax(axis=1)
        del member, votes
    mpp = float(microns_per_pixel)
    origin = MARGIN_UM
    x_px = (origin + (cols + 0.5) * bin_size) / mpp
    y_px = (origin + (rows + 0.5) * bin_size) / mpp
    obs = pd.DataFrame({
        "in_tissue": np.ones(rows.size, dtype=np.int64),
        "array_row": rows.astype(np.int64),
        "array_col": cols.astype(np.int64),
        "annotation": pd.Categorical.from_codes(codes, categories=[r.name for r in regions]),
    }, index=pd.Index(bin_barcodes(int(bin_size), rows, cols), name=None))
    var = pd.DataFrame({"gene_ids": [f"SYNG{i:05d}" for i in range(1, len(var_names) + 1)],
                        "feature_types": "Gene Expression"}, index=pd.Index(var_names))
    adata = ad.AnnData(X=X.astype(np.float32), obs=obs, var=var)
    adata.obsm["spatial"] = np.column_stack([x_px, y_px]).astype(np.float64)

    side_px = int(math.ceil(grid["width_um"] / mpp - 1e-6))
    hires_s = min(1.0, HIRES_MAX_SIDE / side_px)
    lowres_s = min(1.0, LOWRES_MAX_SIDE / side_px)
    images = {}
    from . import _image

    if image:
        full = _image.render(labels, [r.texture for r in regions], width_px=side_px, height_px=side_px, mpp=mpp,
                             label_cell_um=LABEL_CELL_UM, random_state=seed_image, image_strength=image_strength,
                             noise=image_noise, progress=progress)
        images["fullres"] = full
        images["hires"] = _image.downsample(full, hires_s)
        images["lowres"] = _image.downsample(images["hires"], lowres_s / hires_s)
    adata.uns["spatial"] = {
        LIBRARY_ID: {
            "images": images,
            "scalefactors": {
                "spot_diameter_fullres": float(bin_size / mpp),
                "bin_size_um": float(bin_size),
                "microns_per_pixel": mpp,
                "tissue_hires_scalef": float(hires_s),
                "tissue_lowres_scalef": float(lowres_s),
                "regist_target_img_scalef": float(hires_s),
            },
            "metadata": {
                "technology": "visium_hd",
                "bin_size_um": float(bin_size),
                "spot_diameter_um": float(bin_size),
                "microns_per_pixel": mpp,
                "image_shape": np.array([side_px, side_px], dtype=np.int64),
            },
        }
    }
    adata.uns["synthetic"] = {
        "regions": [r.name for r in regions],
        "region_genes": {r.name: [var_names[i] for i in prog_genes[r.program]] for r in regions},
        "programs": {r.name: r.program for r in regions},
        "textures": {r.name: r.texture for r in regions},
        "texture_params": {r.texture: _image.texture_params(r.texture, image_strength=image_strength) for r in regions},
        "image_only": IMAGE_ONLY[0],
        "expression_only": EXPRESSION_ONLY[0],
        "parents": {IMAGE_ONLY[0]: IMAGE_ONLY[1], EXPRESSION_ONLY[0]: EXPRESSION_ONLY[1]},
        "capture": {"n_rows": int(grid["n_bins"]), "n_cols": int(grid["n_bins"]), "bin_size_um": BIN_UM},
        "params": {
            "size_um": float(size_um), "bin_size": int(bin_size), "n_regions": int(n_regions),
            "n_genes": int(n_genes), "microns_per_pixel": mpp, "image": bool(image),
            "tissue_fraction": float(tissue_fraction),
            "random_state": -1 if not isinstance(random_state, (int, np.integer)) else int(random_state),
            "region_scale_um": float(scale), "n_program_genes": int(n_program_genes),
            "fold_change": [float(fold_change[0]), float(fold_change[1])],
            "expression_strength": float(expression_strength),
            "expression_only_strength": float(expression_only_strength), "library_size": float(library_size),
            "diffusion_um": float(diffusion_um), "nuisance_strength": float(nuisance_strength),
            "n_nuisance": int(n_nuisance), "image_strength": float(image_strength),
            "image_noise": float(image_noise),
        },
    }
    return adata


# ----------------------------------------------------------------------------------------------
# writer
# ----------------------------------------------------------------------------------------------
def _positions_parquet(path: Path, adata, bin_um: int, coef: np.ndarray, n_rows: int, n_cols: int) -> None:
    """Every bin of the capture area (in_tissue 0/1), written in row groups so memory stays bounded."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ..read._visium_hd import bin_barcodes

    in_tissue = np.zeros((n_rows, n_cols), dtype=bool)
    r = np.asarray(adata.obs["array_row"], dtype=np.int64)
    cc = np.asarray(adata.obs["array_col"], dtype=np.int64)
    it = np.asarray(adata.obs["in_tissue"], dtype=np.int64) if "in_tissue" in adata.obs else np.ones(r.size, np.int64)
    in_tissue[r, cc] = it == 1
    schema = pa.schema([("barcode", pa.string()), ("in_tissue", pa.int32()), ("array_row", pa.int32()),
                        ("array_col", pa.int32()), ("pxl_row_in_fullres", pa.float64()),
                        ("pxl_col_in_fullres", pa.float64())])
    step = max(1, 1_000_000 // max(n_cols, 1))
    with pq.ParquetWriter(path, schema, compression="snappy") as writer:
        for r0 in range(0, n_rows, step):
            r1 = min(n_rows, r0 + step)
            rr, cols = np.meshgrid(np.arange(r0, r1), np.arange(n_cols), indexing="ij")
            rr, cols = rr.ravel(), cols.ravel()
            xy = np.column_stack([cols, rr, np.ones(rr.size)]) @ coef
            table = pa.table({
                "barcode": bin_barcodes(bin_um, rr, cols),
                "in_tissue": in_tissue[r0:r1].ravel().astype(np.int32),
                "array_row": rr.astype(np.int32),
                "array_col": cols.astype(np.int32),
                "pxl_row_in_fullres": xy[:, 1],
                "pxl_col_in_fullres": xy[:, 0],
            }, schema=schema)
            writer.write_table(table)


def write_visium_hd(
    adata,
    path: str | os.PathLike,
    *,
    bin_sizes: tuple[int, ...] | None = None,
    fullres: str | os.PathLike | None = "../tissue_image.btf",
    force: bool = False,
    compression: str = "jpeg",
    labels: bool = True,
    library_id: str | None = None,
    progress: bool = False,
) -> Path:
    """Write square bins as a Space Ranger 3/4 Visium HD ``outs/`` folder (and the full-resolution H&E).

    Parameters
    ----------
    adata
        Square bins as :func:`synthetic_visium_hd` or :func:`stmorph.read.visium_hd` make them: raw counts,
        ``obs["array_row"]``/``["array_col"]``, ``obsm["spatial"]``, ``bin_size_um`` in the metadata.
    path
        The ``outs/`` folder to create.
    bin_sizes
        Bin sides to write (default: 2, 8 and 16 um, those that are multiples of ``adata``'s bin size). Larger
        bins are summed with :func:`stmorph.read.rebin`.
    fullres
        Where to write ``images["fullres"]`` as a tiled, pyramidal BigTIFF; relative paths are taken from
        ``path`` (default ``../tissue_image.btf``: beside ``outs/``, where Space Ranger's input image usually
        lives); ``None`` skips it.
    force
        Replace an existing ``path`` and image file that an earlier ``write_visium_hd`` wrote (the folder's
        ``.stmorph`` marker, the TIFF's Software tag); anything else is never replaced.
    compression
        TIFF compression: ``"jpeg"`` (quality 90), ``"zlib"`` (lossless) or ``"none"``.
    labels
        Also write ``labels.tsv`` (``barcode``, ``annotation``) into each bin folder when ``obs["annotation"]``
        exists (not a Space Ranger file: :func:`stmorph.read.visium_hd` reads it as ground truth).
    library_id
        Which ``uns["spatial"]`` library (default: the only one).
    progress
        Print each step.

    Returns
    -------
    The ``outs/`` folder. It holds ``spatial/`` (``scalefactors_json.json``, ``tissue_hires_image.png``,
    ``tissue_lowres_image.png``) and ``binned_outputs/square_XXXum/`` with ``filtered_feature_bc_matrix.h5``
    (10x HDF5 v3, the bins under tissue) and ``spatial/`` (``tissue_positions.parquet`` listing every bin of the
    capture area, ``in_tissue`` 0/1, pixel coordinates as floats; ``scalefactors_json.json`` with
    ``bin_size_um``, ``microns_per_pixel``, ``spot_diameter_fullres`` = bin side in px; the PNGs).
    The folder is written to a temporary folder and moved into place; the image to a temporary file, then
    renamed.

    Raises
    ------
    OutputExistsError
        ``path`` is not empty, or the image file exists, and ``force`` is False or stmorph did not write it.
    InputError
        Missing fields, a bin size that is not a multiple of ``adata``'s.
    DependencyError
        pyarrow is not installed.
    """
    import time

    from PIL import Image

    from .._outputs import record_entries, swap_into_place
    from .._spatial import coordinates
    from ..read._visium_hd import BIN_FOLDER, _bin_size, _grid_affine, rebin
    from ._write import _library, _write_h5, _write_tiff, check_output_folder, check_output_image

    if compression not in ("zlib", "jpeg", "none", "deflate"):
        msg = f"compression={compression!r} is not allowed; use 'zlib', 'jpeg' or 'none'."
        raise InputError(msg)
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        msg = 'write_visium_hd writes tissue_positions.parquet and needs pyarrow: pip install "stmorph[parquet]".'
        raise DependencyError(msg) from None
    out = Path(path).expanduser()
    check_output_folder(out, force)
    lib_id, lib = _library(adata, library_id)
    base = _bin_size(adata, lib, lib_id)
    if bin_sizes is None:
        bin_sizes = tuple(s for s in (2, 8, 16) if s >= base and abs(s / base - round(s / base)) < 1e-9)
    bin_sizes = tuple(int(s) for s in bin_sizes)
    bad = [s for s in bin_sizes if s < base or abs(s / base - round(s / base)) > 1e-9]
    if bad or not bin_sizes:
        msg = f"bin_sizes={list(bin_sizes)} must be multiples of the data's bin size {base:g} um."
        raise InputError(msg)
    for col in ("array_row", "array_col"):
        if col not in adata.obs:
            raise InputError(f'adata.obs["{col}"] is missing; write_visium_hd needs the bins\' array coordinates.')
    rows = np.asarray(adata.obs["array_row"], dtype=np.int64)
    cols = np.asarray(adata.obs["array_col"], dtype=np.int64)
    coef = _grid_affine(rows, cols, coordinates(adata))
    if coef is None:
        msg = 'obsm["spatial"] does not follow the array grid (an affine map of array_col/array_row); cannot write.'
        raise InputError(msg)
    mpp = float(lib.get("metadata", {}).get("microns_per_pixel") or lib["scalefactors"].get("microns_per_pixel")
                or base / float(lib["scalefactors"]["spot_diameter_fullres"]))
    capture = adata.uns.get("synthetic", {}).get("capture")
    if capture:  # the capture area's grid, in 2 um bins
        f = base / float(capture.get("bin_size_um", 2))
        cap_rows, cap_cols = int(math.ceil(capture["n_rows"] / f)), int(math.ceil(capture["n_cols"] / f))
    else:
        cap_rows, cap_cols = int(rows.max()) + 1, int(cols.max()) + 1
    full = (lib.get("images", {}) or {}).get("fullres")
    img_path = None
    if fullres is not None and full is not None:
        img_path = Path(fullres).expanduser()
        img_path = img_path if img_path.is_absolute() else (out / img_path)
        img_path = Path(os.path.normpath(img_path))
        check_output_image(img_path, force)
    sf = {k: float(v) for k, v in (lib.get("scalefactors", {}) or {}).items() if np.isscalar(v)}
    sf["microns_per_pixel"] = mpp

    def log(text):
        if progress:
            print(f"write_visium_hd: {text}", flush=True)

    t0 = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    img_tmp = None
    try:
        spatial = tmp / "spatial"
        spatial.mkdir()
        images = lib.get("images", {}) or {}
        pngs = {}
        for res in ("hires", "lowres"):
            img, key = images.get(res), f"tissue_{res}_scalef"
            if img is None and full is not None and key in sf:
                from ._image import downsample

                img = downsample(np.asarray(full), sf[key])
            if img is not None:
                pngs[res] = spatial / f"tissue_{res}_image.png"
                Image.fromarray(np.asarray(img)).save(pngs[res])
        top_sf = {k: v for k, v in sf.items() if k != "bin_size_um"}
        top_sf["spot_diameter_fullres"] = float(BIN_UM / mpp)
        (spatial / "scalefactors_json.json").write_text(json.dumps(top_sf, indent=1))
        for size in bin_sizes:
            t1 = time.perf_counter()
            k = int(round(size / base))
            bins = adata if k == 1 else rebin(adata, size, library_id=lib_id)
            folder = tmp / "binned_outputs" / BIN_FOLDER.format(size)
            (folder / "spatial").mkdir(parents=True)
            _write_h5(folder / "filtered_feature_bc_matrix.h5", bins, genome=lib_id)
            c_rows, c_cols = int(math.ceil(cap_rows / k)), int(math.ceil(cap_cols / k))
            c_rows = max(c_rows, int(bins.obs["array_row"].max()) + 1)
            c_cols = max(c_cols, int(bins.obs["array_col"].max()) + 1)
            bcoef = coef.copy()
            bcoef[:2] *= k  # a k-times larger bin: k 2 um steps per step, centred on its members
            bcoef[2] += (k - 1) / 2.0 * (coef[0] + coef[1])
            _positions_parquet(folder / "spatial" / "tissue_positions.parquet", bins, size, bcoef, c_rows, c_cols)
            bsf = dict(sf, bin_size_um=float(size), spot_diameter_fullres=float(size / mpp))
            (folder / "spatial" / "scalefactors_json.json").write_text(json.dumps(bsf, indent=1))
            for res, png in pngs.items():
                shutil.copyfile(png, folder / "spatial" / png.name)
            if labels and "annotation" in bins.obs:
                import pandas as pd

                lab = pd.DataFrame({"barcode": np.asarray(bins.obs_names, dtype=str),
                                    "annotation": bins.obs["annotation"].astype(object).to_numpy()})
                lab[lab["annotation"].notna()].to_csv(folder / "labels.tsv", sep="\t", index=False)
            log(f"{BIN_FOLDER.format(size)}: {bins.n_obs} bins in {time.perf_counter() - t1:.1f} s")
            del bins
        if img_path is not None:
            t1 = time.perf_counter()
            img_path.parent.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix=f".{img_path.name}.", suffix=".tmp", dir=img_path.parent)
            os.close(fd)
            img_tmp = Path(name)
            _write_tiff(img_tmp, np.asarray(full), "none" if compression == "none" else compression, bigtiff=True)
            log(f"full-resolution BigTIFF {full.shape[1]} x {full.shape[0]} px in {time.perf_counter() - t1:.1f} s")
        record_entries(tmp)
        swap_into_place(tmp, out)
        if img_tmp is not None:
            os.replace(img_tmp, img_path)
            img_tmp = None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if img_tmp is not None:
            img_tmp.unlink(missing_ok=True)
        raise
    log(f"done in {time.perf_counter() - t0:.1f} s")
    return out
