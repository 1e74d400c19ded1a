"""A JPEG/PNG whose decoded size would not fit in memory is refused before decoding, in one line."""

import struct
import zlib

import numpy as np
import pytest

from stmorph.errors import ImageError
from stmorph.im import open_slide


def _png_1bit(path, width, height):
    """A valid, tiny (highly compressible) black-and-white PNG of any size."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\x00" + b"\x00" * ((width + 7) // 8)
    z = zlib.compressobj(9)
    body = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return path


def test_huge_png_with_a_small_file_is_refused_before_decoding(tmp_path, monkeypatch):
    path = _png_1bit(tmp_path / "bomb.png", 30000, 30000)
    assert path.stat().st_size < 2_000_000
    monkeypatch.setenv("STMORPH_MAX_DECODE_BYTES", str(5 * 10**8))  # it takes 0.9 GB: one byte per pixel
    with open_slide(path) as slide:
        assert (slide.width, slide.height) == (30000, 30000)  # the header is read, nothing decoded
        with pytest.raises(ImageError, match="tiled pyramidal TIFF") as info:
            slide.read_region(0, 0, 8, 8)
    msg = str(info.value)
    assert "\n" not in msg and "bomb.png" in msg and "GiB" in msg


def test_png_within_the_bound_is_decoded(tmp_path, monkeypatch):
    path = _png_1bit(tmp_path / "small.png", 300, 200)
    monkeypatch.setenv("STMORPH_MAX_DECODE_BYTES", str(10**9))
    with open_slide(path) as slide:
        region = slide.read_region(0, 0, 8, 8)
    assert region.shape == (8, 8, 3) and np.all(region == 0)


# --------------------------------------------------------------------------- bombs and truncated images
import io  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
from pathlib import Path  # noqa: E402

from PIL import Image  # noqa: E402

SRC = str(Path(__file__).resolve().parent.parent / "src")


def _jpeg_claiming(path, width, height):
    """A valid 8 x 8 px JPEG (about 630 bytes) whose frame header claims ``width`` x ``height`` px."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 180, 190)).save(buf, "JPEG", quality=75)
    b = bytearray(buf.getvalue())
    i = 2
    while b[i + 1] not in (0xC0, 0xC1, 0xC2):
        i += 2 + struct.unpack(">H", b[i + 2: i + 4])[0]
    b[i + 5: i + 9] = struct.pack(">HH", height, width)
    path.write_bytes(bytes(b))
    return path


def _strip_tiff(path, width, height):
    """A deflate-compressed RGB TIFF of zeros stored as ONE strip: tiny on disk, ``3 * width * height`` decoded."""
    z = zlib.compressobj(9)
    row = bytes(3 * width)
    data = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    tags = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 3, None), (259, 3, 1, 8), (262, 3, 1, 2),
            (273, 4, 1, None), (277, 3, 1, 3), (278, 4, 1, height), (279, 4, 1, len(data)), (284, 3, 1, 1)]
    bps_at = 8 + 2 + 12 * len(tags) + 4
    data_at = bps_at + 6
    out = bytearray(b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", len(tags)))
    for tag, typ, count, value in tags:
        value = {258: bps_at, 273: data_at}.get(tag, value)
        out += struct.pack("<HHIHH", tag, typ, count, value, 0) if typ == 3 and count == 1 else \
            struct.pack("<HHII", tag, typ, count, value)
    out += struct.pack("<I", 0) + struct.pack("<HHH", 8, 8, 8) + data
    path.write_bytes(bytes(out))
    return path


def _in_subprocess(code: str, *, extra_mib: int | None = None, env: dict | None = None) -> dict:
    """Run ``code`` (which sets ``result``) in a fresh Python; with ``extra_mib`` under an address-space cap of
    what the interpreter holds after its imports plus that much. Returns ``result`` and the peak RSS growth."""
    prog = textwrap.dedent(f"""
        import json, os, resource, sys
        sys.path.insert(0, {SRC!r})
        import numpy as np
        from stmorph.im import open_slide
        from stmorph.errors import ImageError
        extra = {extra_mib!r}
        if extra is not None:
            vsize = int(open("/proc/self/statm").read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
            resource.setrlimit(resource.RLIMIT_AS, (vsize + extra * 2**20, resource.RLIM_INFINITY))
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        result = {{}}
        try:
    """) + textwrap.indent(textwrap.dedent(code), "    ") + textwrap.dedent("""
        except ImageError as e:
            result["error"] = str(e)
        result["peak_mib"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
        print(json.dumps(result))
    """)
    environ = {k: v for k, v in os.environ.items() if k != "STMORPH_MAX_DECODE_BYTES"}
    environ.update({"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", **(env or {})})
    proc = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, env=environ, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


import os  # noqa: E402


def test_tiny_jpeg_claiming_a_huge_image_is_refused_without_decoding(tmp_path):
    path = _jpeg_claiming(tmp_path / "bomb.jpg", 40000, 40000)
    assert path.stat().st_size < 1000
    out = _in_subprocess(f"open_slide({str(path)!r}).read_region(0, 0, 8, 8)", extra_mib=1024)
    assert "bomb.jpg" in out["error"] and "truncated" in out["error"] and "40000 x 40000" in out["error"]
    assert "\n" not in out["error"] and out["peak_mib"] < 100


def test_truncated_jpeg_with_its_end_marker_put_back_is_refused(tmp_path):
    """A JPEG cut short and given back its end-of-image marker: libjpeg fills the rest with grey, silently."""
    rng = np.random.default_rng(0)
    a = (rng.random((600, 800, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG", quality=90, restart_marker_rows=1)
    data = buf.getvalue()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) * 2 // 3] + b"\xff\xd9")
    with pytest.raises(ImageError, match=r"cut\.jpg: JPEG file is truncated: scan 1 holds \d+ of its 38 restart"):
        open_slide(tmp_path / "cut.jpg")
    # no restart markers: a file cut to 0.5% holds less than any 800 x 600 px JPEG needs
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    (tmp_path / "cut2.jpg").write_bytes(data[: len(data) // 200] + b"\xff\xd9")
    with pytest.raises(ImageError, match=r"cut2\.jpg: JPEG file is truncated or corrupt: its header says 800 x 600"):
        open_slide(tmp_path / "cut2.jpg")
    (tmp_path / "whole.jpg").write_bytes(data)
    with open_slide(tmp_path / "whole.jpg") as s:
        assert s.read_region(0, 0, 800, 600).shape == (600, 800, 3)


def test_single_strip_tiff_is_refused_when_its_strip_does_not_fit(tmp_path, monkeypatch):
    """A TIFF decodes a strip whole: one 40000 px strip of zeros is tiny on disk and gigabytes in memory."""
    path = _strip_tiff(tmp_path / "strip.tif", 8000, 8000)  # 192 MB decoded
    assert path.stat().st_size < 1_000_000
    monkeypatch.setenv("STMORPH_MAX_DECODE_BYTES", "100M")
    with open_slide(path) as slide:
        with pytest.raises(ImageError, match="tiled pyramidal TIFF") as info:
            slide.read_region(0, 0, 8, 8)
        with pytest.raises(ImageError, match="one 8000 x 8000 px strip"):
            slide.check_decode()
    msg = str(info.value)
    assert "\n" not in msg and "strip.tif" in msg and "on disk" in msg and "STMORPH_MAX_DECODE_BYTES" in msg
    # under a memory cap (no setting): refused with the same line instead of a MemoryError
    out = _in_subprocess(f"open_slide({str(path)!r}).read_region(0, 0, 8, 8)", extra_mib=300)
    assert "strip.tif" in out["error"] and "tiled pyramidal TIFF" in out["error"]
    monkeypatch.setenv("STMORPH_MAX_DECODE_BYTES", "1G")
    with open_slide(path) as slide:
        assert slide.read_region(0, 0, 8, 8).max() == 0


def test_the_readers_refuse_an_image_too_large_to_decode_before_any_work(tmp_path, monkeypatch):
    from stmorph import datasets
    from stmorph.cli import main

    adata = datasets.synthetic(200, n_genes=300, random_state=0)
    datasets.write_visium(adata, tmp_path / "vis", fullres=None)
    big = _png_1bit(tmp_path / "big.png", 12000, 12000)  # 144 MB decoded; the hires PNG takes about 43 MB
    monkeypatch.setenv("STMORPH_MAX_DECODE_BYTES", "100M")
    import contextlib

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["run", str(tmp_path / "vis"), "--image", str(big), "--out", str(tmp_path / "out"), "--quiet"])
    lines = err.getvalue().strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "big.png" in lines[0] and "12000 x 12000 px PNG whole" in lines[0], lines
    assert not (tmp_path / "out").exists()


def _png(path, mode, side):
    rng = np.random.default_rng(0)
    rgb = Image.fromarray((rng.random((side, side, 3)) * 255).astype(np.uint8))
    im = {"1": lambda: rgb.convert("1"), "L": lambda: rgb.convert("L"), "RGB": lambda: rgb,
          "RGBA": lambda: rgb.convert("RGBA"), "P": lambda: rgb.quantize(16)}[mode]()
    if mode == "P":
        im.info["transparency"] = 0
    im.save(path, compress_level=1)
    return path


@pytest.mark.parametrize("kind", ["png-1", "png-P", "png-L", "png-RGB", "png-RGBA", "jpeg-RGB", "jpeg-L", "gif-P"])
def test_decode_memory_estimate_bounds_what_the_decode_really_takes(tmp_path, kind):
    """The estimate that the decode budget is compared with is never below the peak memory the decode takes."""
    from stmorph.im.slide._pil import decode_bytes

    fmt, mode = kind.split("-")
    side = 3000
    path = tmp_path / f"img.{fmt}"
    if fmt == "png":
        _png(path, mode, side)
    else:
        rng = np.random.default_rng(0)
        im = Image.fromarray((rng.random((side, side, 3)) * 255).astype(np.uint8)).convert(mode)
        im = im.quantize(64) if fmt == "gif" else im
        im.save(path)
    out = _in_subprocess(f"""
        with open_slide({str(path)!r}) as s:
            a = s.read_region(0, 0, 100, 100)
            result["mode"] = s._levels[0].mode
            result["format"] = s.format
    """)
    assert "error" not in out
    estimate = (decode_bytes(out["format"], out["mode"], side, side) + path.stat().st_size) / 2**20
    assert out["peak_mib"] <= estimate * 1.05 + 8, (out, estimate)


def test_palette_and_one_bit_images_take_a_byte_per_pixel(tmp_path):
    """A 1-bit PNG decoded through Pillow's RGB conversion took 11 bytes per pixel; now 1 (under a memory cap)."""
    path = _png_1bit(tmp_path / "bits.png", 12000, 12000)  # 144 MB at a byte per pixel
    out = _in_subprocess(f"result['mean'] = float(open_slide({str(path)!r}).read_region(0, 0, 64, 64).mean())",
                         extra_mib=700)
    assert out.get("mean") == 0.0 and out["peak_mib"] < 200, out
    p = _png(tmp_path / "pal.png", "P", 2000)
    with open_slide(p) as s, Image.open(p) as im:
        expected = np.asarray(im.convert("RGBA"))[:50, :50]
        got = s.read_region(0, 0, 50, 50)
    alpha = expected[..., 3:4] / 255.0
    want = np.round(expected[..., :3] * alpha + 255 * (1 - alpha))  # transparent entries on white glass
    assert np.abs(got.astype(int) - want).max() <= 1


def test_thumbnail_of_a_single_strip_tiff_decodes_the_strip_once(tmp_path):
    path = _strip_tiff(tmp_path / "strip.tif", 6000, 6000)  # 108 MB decoded
    out = _in_subprocess(f"""
        with open_slide({str(path)!r}) as s:
            t, _ = s.thumbnail(500, fill="glass")
            result["shape"] = list(t.shape)
            result["decoded"] = s.cache_info()["decoded"]
    """)
    assert out["shape"] == [500, 500, 3] and out["decoded"] == 1
    assert out["peak_mib"] < 108 * 1.3 + 20, out


def _run_cli(argv):
    import contextlib

    from stmorph.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, err.getvalue().strip().splitlines()


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_a_huge_space_ranger_png_is_refused_in_one_line(tmp_path, monkeypatch):
    from stmorph import datasets

    adata = datasets.synthetic(200, n_genes=300, random_state=0)
    outs = datasets.write_visium(adata, tmp_path / "vis", fullres=None)
    hires = outs / "spatial" / "tissue_hires_image.png"
    _png_1bit(hires, 14000, 14000)  # over Pillow's decompression-bomb limit
    rc, lines = _run_cli(["run", str(outs), "--out", str(tmp_path / "out"), "--quiet"])
    assert rc == 2 and len(lines) == 1 and "tissue_hires_image.png" in lines[0] and "too large" in lines[0], lines
    _png_1bit(hires, 5000, 5000)
    monkeypatch.setenv("STMORPH_MAX_DECODE_BYTES", "50M")
    rc, lines = _run_cli(["run", str(outs), "--out", str(tmp_path / "out"), "--quiet"])
    assert rc == 2 and len(lines) == 1 and "tissue_hires_image.png (5000 x 5000 px" in lines[0], lines
    assert "cannot be read" not in lines[0] and lines[0].endswith("give the image Space Ranger wrote.")
    assert not (tmp_path / "out").exists()
