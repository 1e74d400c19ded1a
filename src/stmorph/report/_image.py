"""The section's H&E as the report reads it: regions in full-resolution pixel coordinates, at any scale.

The full-resolution slide (:func:`stmorph.im.slide_for`) is preferred; without one the Space Ranger
``hires`` (else ``lowres``) image stands in, scaled by its scalefactor. Regions are read from the
coarsest pyramid level that is still fine enough, then area-averaged to the size asked for, so a
30k x 30k slide is never decoded whole.
"""

from __future__ import annotations

import base64
import io

import numpy as np

from .. import _spatial
from ..errors import InputError


class SectionImage:
    """Read RGB regions of the section's image; ``kind`` says which image (``None`` when there is none)."""

    def __init__(self, adata, *, library_id: str | None = None):
        self.slide, self.scale, self.kind = None, 1.0, None  # scale: source pixels per full-resolution pixel
        try:
            from ..im import slide_for

            self.slide, self.kind = slide_for(adata, library_id=library_id), "full-resolution"
        except (ImportError, InputError, OSError):
            self.slide = None
        if self.slide is None:
            try:
                lib = _spatial.library(adata, library_id)
            except InputError:
                return
            imgs, sf = lib.get("images", {}) or {}, lib.get("scalefactors", {}) or {}
            for name in ("hires", "lowres"):
                scale = sf.get(f"tissue_{name}_scalef")
                if name in imgs and scale:
                    from ..im import open_slide
                    from ..pl._utils import _as_rgb

                    self.slide = open_slide(_as_rgb(np.asarray(imgs[name])))
                    self.scale, self.kind = float(scale), name
                    break

    def __bool__(self) -> bool:
        return self.slide is not None

    def region(self, x0: float, y0: float, w: float, h: float, out_w: int, out_h: int) -> np.ndarray:
        """Region ``[x0, x0 + w) x [y0, y0 + h)`` (full-resolution pixels) as uint8 ``(out_h, out_w, 3)``;
        outside the image is white."""
        from PIL import Image

        s = self.scale
        sx, sy, sw, sh = x0 * s, y0 * s, max(w * s, 1e-6), max(h * s, 1e-6)
        per_out = min(sw / out_w, sh / out_h)  # source pixels per output pixel
        ds = self.slide.level_downsamples
        k = max((i for i, d in enumerate(ds) if d <= max(per_out, 1.0)), default=0)
        rw, rh = max(1, int(round(sw / ds[k]))), max(1, int(round(sh / ds[k])))
        arr = self.slide.read_region(int(round(sx)), int(round(sy)), rw, rh, level=k, fill=255)
        if arr.shape[:2] == (out_h, out_w):
            return arr
        im = Image.fromarray(arr)
        method = Image.Resampling.BOX if rw >= out_w else Image.Resampling.BILINEAR
        return np.asarray(im.resize((int(out_w), int(out_h)), method))

    def close(self) -> None:
        if self.slide is not None:
            self.slide.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def encode(arr: np.ndarray, fmt: str = "JPEG", *, quality: int = 80) -> bytes:
    """An RGB array as JPEG (or PNG) bytes."""
    from PIL import Image

    buf = io.BytesIO()
    im = Image.fromarray(np.ascontiguousarray(arr))
    if fmt.upper() == "JPEG":
        im.save(buf, "JPEG", quality=int(quality), optimize=True)
    else:
        im.save(buf, "PNG", optimize=True)
    return buf.getvalue()


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
