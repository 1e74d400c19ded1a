"""Peak memory and speed of cropping every spot of a 30,000 x 30,000 whole-slide TIFF.

Writes (in a temporary folder, deleted afterwards) a 30,000 x 30,000 RGB tiled
TIFF (512 x 512 tiles, JPEG quality 90 by default: 2.7 GB decoded), streamed
tile by tile so the writer never holds the image; lays a Visium-like hexagonal
grid of spots over it (spot diameter 200 px, centre-to-centre 100/55 of that,
as on Visium); then, in a fresh child process, crops every spot with
:func:`stmorph.im.iter_patches` (resized to 260 px, as the image-feature
pipeline does) and reports the child's peak RSS (``ru_maxrss``), which must
stay under 1.5 GB. A second child times ``Slide.thumbnail(2000)`` of the same
(non-pyramidal) file, which streams bands of tiles.

Usage::

    python benchmarks/bench_patch_memory.py                # the 30k x 30k run (about a minute)
    python benchmarks/bench_patch_memory.py --side 8000    # quick
    python benchmarks/bench_patch_memory.py --compression zlib --out-size 0
    python benchmarks/bench_patch_memory.py --svs          # an Aperio .svs, read through OpenSlide

With ``--svs`` the same tiles are written as an Aperio SVS (``Aperio Image
Library`` ImageDescription), which :func:`stmorph.im.open_slide` reads through
the OpenSlide backend (``pip install 'stmorph[openslide]'``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

LIMIT_MB = 1536


def peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def _he_tiles(tile: int, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """A few H&E-like 512 px textures: pink stroma with purple nuclei."""
    from scipy import ndimage

    out = []
    for _ in range(n):
        stroma = ndimage.gaussian_filter(rng.random((tile, tile)), 6)
        stroma = (stroma - stroma.min()) / (np.ptp(stroma) + 1e-9)
        nuclei = ndimage.gaussian_filter((rng.random((tile, tile)) > 0.9985).astype(float), 3.5)
        nuclei = np.clip(nuclei / (nuclei.max() + 1e-9) * 2.5, 0, 1)
        pink = np.array([236, 160, 200]) - 40 * stroma[..., None] * np.array([0.3, 1, 0.6])
        purple = np.array([90, 50, 140])
        img = pink * (1 - nuclei[..., None]) + purple * nuclei[..., None]
        img += rng.normal(0, 4, img.shape)
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return out


def write_slide(path: str, side: int, tile: int, compression: str, seed: int = 0, strips: int = 0,
                svs: bool = False) -> None:
    """Stream a side x side RGB tiled TIFF, tile by tile (row-major), to ``path``.

    With ``strips`` > 0 the file is stripped instead (``strips`` rows per strip, zlib), written band by band.
    """
    import tifffile

    rng = np.random.default_rng(seed)
    textures = _he_tiles(tile, 8, rng)
    blank = np.full((tile, tile, 3), 246, np.uint8)
    n = math.ceil(side / tile)
    c = (n - 1) / 2

    def tiles():
        for r in range(n):
            for col in range(n):
                # elliptical "tissue" with white glass around it
                if ((r - c) / (0.48 * n)) ** 2 + ((col - c) / (0.45 * n)) ** 2 > 1:
                    yield blank
                else:
                    t = textures[(r * 7 + col * 3) % len(textures)]
                    yield np.roll(t, (r * 37) % tile, axis=(col % 2))

    kwargs = {"compression": compression}
    if compression == "jpeg":
        kwargs["compressionargs"] = {"level": 90}
    elif compression == "none":
        kwargs = {}
    if strips:  # zlib strips, encoded here (tifffile takes an iterator of encoded segments)
        import imagecodecs

        def bands():
            gen = tiles()
            for _ in range(n):
                yield np.concatenate([next(gen) for _ in range(n)], axis=1)[:, :side]

        encoded = (imagecodecs.zlib_encode(np.ascontiguousarray(s), level=1) for s in _rows(bands(), side, strips))
        tifffile.imwrite(path, encoded, shape=(side, side, 3), dtype=np.uint8, rowsperstrip=strips,
                         compression="zlib", photometric="rgb", bigtiff=True)
        return
    if svs:  # how OpenSlide recognises an Aperio file
        kwargs["description"] = (f"Aperio Image Library v12.0.0 \r\n{side}x{side} [0,0 {side}x{side}] "
                                 f"({tile}x{tile}) {compression.upper()}/RGB|AppMag = 20|MPP = 0.5")
        kwargs["metadata"] = None
    tifffile.imwrite(path, tiles(), shape=(side, side, 3), dtype=np.uint8, tile=(tile, tile),
                     photometric="rgb", bigtiff=True, **kwargs)


def _rows(bands, side: int, strips: int):
    """Re-cut bands of rows into strips of ``strips`` rows (what tifffile expects from an iterator)."""
    buf = None
    done = 0
    for band in bands:
        buf = band if buf is None else np.concatenate([buf, band])
        while len(buf) >= strips and done < side:
            take = min(strips, side - done)
            yield buf[:take]
            buf = buf[take:]
            done += take
    if buf is not None and len(buf) and done < side:
        yield buf[: side - done]


def visium_grid(side: int, diameter: float) -> np.ndarray:
    """Hexagonal grid of spot centres (x, y) over the whole image, Visium proportions (55 um spots, 100 um apart).

    The grid starts a quarter pitch from the edges, so the outer spots' patches cross the border (padded, flagged).
    """
    pitch = diameter * 100 / 55
    dy = pitch * math.sqrt(3) / 2
    ys = np.arange(pitch / 4, side, dy)
    pts = []
    for i, y in enumerate(ys):
        xs = np.arange(pitch / 4 + (pitch / 2 if i % 2 else 0), side, pitch)
        pts.append(np.column_stack([xs, np.full(len(xs), y)]))
    return np.concatenate(pts)


def child_crop(path: str, spots: str, size: int, out_size: int, batch_size: int) -> dict:
    from stmorph.im import iter_patches, open_slide

    xy = np.load(spots)
    t0 = time.perf_counter()
    n = 0
    n_border = 0
    checksum = 0
    with open_slide(path) as slide:
        for b in iter_patches(slide, xy, size, out_size=out_size or None, batch_size=batch_size):
            n += len(b.index)
            n_border += int((b.inside < 1).sum())
            checksum += int(b.patches[:, ::16, ::16].sum())
        info = slide.cache_info()
        backend = slide.backend
    secs = time.perf_counter() - t0
    return {"n": n, "n_border": n_border, "seconds": secs, "tiles_decoded": info["decoded"],
            "cache_max_mb": info["max_bytes"] / 2**20, "peak_rss_mb": peak_rss_mb(), "checksum": checksum,
            "backend": backend}


def child_thumbnail(path: str, max_side: int) -> dict:
    from stmorph.im import open_slide

    t0 = time.perf_counter()
    with open_slide(path) as slide:
        thumb, scale = slide.thumbnail(max_side)
    return {"shape": list(thumb.shape), "scale": scale, "seconds": time.perf_counter() - t0,
            "peak_rss_mb": peak_rss_mb()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--side", type=int, default=30000, help="image side in pixels (default 30000)")
    p.add_argument("--tile", type=int, default=512)
    p.add_argument("--compression", default="jpeg", choices=["jpeg", "zlib", "none"],
                   help="tile compression (default jpeg; --strips always writes zlib)")
    p.add_argument("--strips", type=int, default=0, help="write a stripped zlib TIFF with this many rows per strip")
    p.add_argument("--diameter", type=float, default=200.0, help="spot diameter = patch side, px (default 200)")
    p.add_argument("--out-size", type=int, default=260, help="resize patches to this side; 0 = keep (default 260)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--svs", action="store_true", help="write an Aperio .svs and read it through OpenSlide")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (prints its path)")
    p.add_argument("--_child", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args._child:
        mode, *rest = args._child
        if mode == "crop":
            res = child_crop(rest[0], rest[1], int(rest[2]), int(rest[3]), int(rest[4]))
        else:
            res = child_thumbnail(rest[0], int(rest[1]))
        print(json.dumps(res))
        return 0

    tmp = tempfile.mkdtemp(prefix="stmorph_bench_")
    try:
        if args.svs and args.strips:
            p.error("--svs writes a tiled slide; drop --strips")
        path = os.path.join(tmp, "slide.svs" if args.svs else "slide.tif")
        t0 = time.perf_counter()
        write_slide(path, args.side, args.tile, args.compression, strips=args.strips, svs=args.svs)
        gen_s = time.perf_counter() - t0
        xy = visium_grid(args.side, args.diameter)
        np.save(os.path.join(tmp, "xy.npy"), xy)
        size = int(round(args.diameter))
        decoded_gb = args.side * args.side * 3 / 1e9
        layout = f"{args.strips}-row strips, zlib" if args.strips else f"{args.tile} px tiles, {args.compression}"
        print(f"slide: {args.side} x {args.side} RGB, {layout}; "
              f"{decoded_gb:.2f} GB decoded, {os.path.getsize(path) / 1e6:.0f} MB on disk; "
              f"written in {gen_s:.1f} s (writer peak RSS {peak_rss_mb():.0f} MB)")

        def run(*child_args):
            out = subprocess.run([sys.executable, __file__, "--_child", *map(str, child_args)],
                                 check=True, capture_output=True, text=True)
            return json.loads(out.stdout.strip().splitlines()[-1])

        r = run("crop", path, os.path.join(tmp, "xy.npy"), size, args.out_size, args.batch_size)
        n_tiles = math.ceil(args.side / args.strips) if args.strips else math.ceil(args.side / args.tile) ** 2
        print(f"spots: {r['n']} (Visium-like hex grid, {r['n_border']} crossing the border); "
              f"patch {size} px -> {args.out_size or size} px; batch {args.batch_size}")
        decoded = (f"tiles/strips decoded {r['tiles_decoded']} of {n_tiles}" if r["backend"] != "openslide"
                   else f"{n_tiles} tiles, decoded and cached by OpenSlide")
        print(f"crop every spot ({r['backend']} backend): {r['seconds']:.1f} s, {r['n'] / r['seconds']:.0f} patches/s; "
              f"{decoded}; cache budget {r['cache_max_mb']:.0f} MB")
        ok = r["peak_rss_mb"] < LIMIT_MB
        print(f"peak RSS while cropping: {r['peak_rss_mb']:.0f} MB (limit {LIMIT_MB} MB): {'OK' if ok else 'OVER'}")
        t = run("thumbnail", path, 2000)
        print(f"thumbnail(2000) of the same non-pyramidal file: {t['shape'][1]} x {t['shape'][0]} px in "
              f"{t['seconds']:.1f} s, peak RSS {t['peak_rss_mb']:.0f} MB")
        return 0 if ok else 1
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
