"""Built-in data: synthetic tissue with a full-resolution H&E-like image."""

from ._synthetic import synthetic  # noqa: E402
from ._visium_hd import synthetic_visium_hd, write_visium_hd  # noqa: E402
from ._write import write_visium  # noqa: E402

__all__ = ["synthetic", "write_visium", "synthetic_visium_hd", "write_visium_hd"]
