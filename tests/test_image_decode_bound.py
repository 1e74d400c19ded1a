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
    monkeypatch.setenv("STMORPH_MAX_DECODE_BYTES", str(10**9))
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
