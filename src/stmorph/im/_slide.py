"""Former home of every slide backend, kept so that ``stmorph.im._slide`` keeps working.

The slide code now lives in :mod:`stmorph.im.slide` (one module per backend).
Every name defined there or in its modules resolves here, and setting one here
(e.g. ``MAX_PIL_PIXELS``, or a test's monkeypatch) sets it in every slide module
that holds it, so the code that reads it sees the new value.
"""

from __future__ import annotations

import sys
import types

from . import slide as _pkg
from .slide import _array, _base, _fill, _openslide, _pil, _tiff

__all__ = list(_pkg.__all__)
_MODULES = (_base, _fill, _tiff, _pil, _array, _openslide, _pkg)


def _forward(name: str) -> property:
    owners = [m for m in _MODULES if name in vars(m)]

    def get(self):
        return vars(owners[0])[name]

    def set_(self, value):
        for m in owners:
            setattr(m, name, value)

    return property(get, set_)


# a data descriptor per name: reads and writes (monkeypatch and its undo included) go to the slide modules
_Alias = type("_Alias", (types.ModuleType,), {
    n: _forward(n) for m in _MODULES for n in vars(m) if not n.startswith("__") and n not in globals()})
sys.modules[__name__].__class__ = _Alias
