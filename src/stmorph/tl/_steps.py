"""The named steps of a method: their timing, and the reuse of a step whose output already exists.

A method's function runs its steps inside ``with step("name"):``. Outside :func:`stmorph.tl.run_methods`
this only runs the block; inside it, the seconds go to the run's :class:`StepLog`, charged to the
method running, unless the step is shared: its output served several methods (e.g. the expression
embedding of ``stmorph`` reused by ``stmorph_expr``, or the image features the run computes for every
method first). A shared step is timed once and counted in no method's time, so the methods' times and
the shared steps' add up to the run's.

:func:`find_output` finds an ``obsm`` entry a step wrote earlier with the same parameters (recorded
next to it in ``uns[key]["params"]``), so a chain can reuse it instead of computing it again.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class StepLog:
    """Seconds per step and which method ran or reused each, for one :func:`~stmorph.tl.run_methods` call.

    With ``progress``, each step prints one line on stderr as it starts (``<method>: <step> ...``), so a
    step that runs for a while without a progress bar of its own is not silent.
    """

    seconds: dict[str, float] = field(default_factory=dict)
    ran: dict[str, list[str]] = field(default_factory=dict)
    reused: dict[str, list[str]] = field(default_factory=dict)
    method_seconds: dict[str, dict[str, float]] = field(default_factory=dict)
    wall: dict[str, float] = field(default_factory=dict)
    method: str = ""
    progress: bool = False

    def own_seconds(self, method: str) -> float:
        """Seconds ``method`` ran (its whole call, steps or not), less the shared steps (:meth:`shared_steps`)
        it ran: those are counted once, apart."""
        shared = set(self.shared_steps())
        paid = sum(t for s, t in self.method_seconds.get(method, {}).items() if s in shared)
        return float(max(self.wall.get(method, 0.0) - paid, 0.0))

    def shared_steps(self) -> list[str]:
        """Steps whose output served more than one method: run by one (or by the run itself, before the
        methods) and found already computed by another. Shown once, in no method's own time."""
        reused = {s for steps in self.reused.values() for s in steps}
        return [s for s in self.seconds if s in reused or s in self.ran.get(PREFETCH, ())]


#: The name :func:`~stmorph.tl.run_methods` runs its own steps under (the image features every method reads).
PREFETCH = "_prefetch"

_LOG: ContextVar[StepLog | None] = ContextVar("stmorph_step_log", default=None)


@contextlib.contextmanager
def recording(log: StepLog) -> Iterator[StepLog]:
    token = _LOG.set(log)
    try:
        yield log
    finally:
        _LOG.reset(token)


@contextlib.contextmanager
def running(method: str) -> Iterator[None]:
    """The block is ``method``'s call: its time, and the steps run inside it, are charged to ``method``."""
    log = _LOG.get()
    if log is None:
        yield
        return
    prev, log.method = log.method, method
    t0 = time.perf_counter()
    try:
        yield
    finally:
        log.method = prev
        log.wall[method] = log.wall.get(method, 0.0) + time.perf_counter() - t0


@contextlib.contextmanager
def step(name: str, *, announce: bool = True) -> Iterator[None]:
    """Time the block as the step ``name`` of the method running; ``announce=False``: no progress line (a
    step too quick to need one)."""
    log = _LOG.get()
    if log is not None and log.progress and announce:
        who = "" if log.method in ("", PREFETCH) else f"{log.method}: "
        print(f"{who}{name.replace('_', ' ')} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    try:
        yield
    finally:
        if log is not None:
            dt = time.perf_counter() - t0
            log.seconds[name] = log.seconds.get(name, 0.0) + dt
            mine = log.method_seconds.setdefault(log.method, {})
            mine[name] = mine.get(name, 0.0) + dt
            log.ran.setdefault(log.method, []).append(name)


def reuse(name: str) -> None:
    """Record that the method running found the output of step ``name`` already computed."""
    log = _LOG.get()
    if log is not None:
        log.seconds.setdefault(name, 0.0)
        log.reused.setdefault(log.method, []).append(name)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple, np.ndarray)) or isinstance(b, (list, tuple, np.ndarray)):
        try:
            x, y = np.asarray(a, dtype=object).ravel(), np.asarray(b, dtype=object).ravel()
        except (TypeError, ValueError):
            return False
        return x.shape == y.shape and all(_same(p, q) for p, q in zip(x, y))
    number = (int, float, np.integer, np.floating)
    if isinstance(a, number) and isinstance(b, number) and not isinstance(a, bool) and not isinstance(b, bool):
        return float(a) == float(b)
    if isinstance(a, str) and isinstance(b, str):
        return str(a) == str(b)
    return type(a) is type(b) and a == b


def find_output(adata, params: Mapping, *, prefer: str | None = None, kind: str | None = None) -> str | None:
    """An ``obsm`` key whose ``uns[key]["params"]`` holds ``params`` (every item equal), ``prefer`` first;
    with ``kind``, only entries that step wrote (``uns[key]["step"] == kind``). None when there is none."""
    keys = list(adata.obsm.keys())
    if prefer in keys:
        keys.remove(prefer)
        keys.insert(0, prefer)
    for key in keys:
        entry = adata.uns.get(key)
        if not isinstance(entry, Mapping) or not isinstance(entry.get("params"), Mapping):
            continue
        if kind is not None and entry.get("step") != kind:
            continue
        have = entry["params"]
        if all(k in have and _same(have[k], v) for k, v in params.items()):
            return key
    return None


#: Image features a method can read: ``name -> (obsm key, patch, pool)``; ``"spot"`` is the run's own patch
#: (its ``patch`` option) under ``obsm["X_image"]``. ``"context"`` is SENCA-st's patch as published (radius 3
#: spacings, the whole patch averaged); ``"context_section"`` the same patch averaged over the tissue section only,
#: so glass beyond the section's edge does not make a domain of the border. ``"ring"`` / ``"ring_section"``: a
#: patch of side 3 spacings, the spot and its first ring of neighbours (the ``stmorph`` method's context).
PATCHES = {"spot": ("X_image", None, "mean"), "context": ("X_image_context", "6spacing", "mean"),
           "context_section": ("X_image_context_section", "6spacing", "section"),
           "ring": ("X_image_ring", "3spacing", "mean"),
           "ring_section": ("X_image_ring_section", "3spacing", "section")}


def feature_spec(name: str, patch="spot") -> tuple[str, Any, str]:
    """``(obsm key, patch, pool)`` of a declared patch (:data:`PATCHES`); ``patch`` is the run's spot patch."""
    if name not in PATCHES:
        msg = f"patch {name!r} is not among {list(PATCHES)}."
        raise ValueError(msg)
    key, size, pool = PATCHES[name]
    return key, patch if size is None else size, pool


def _features_current(adata, key: str, patch, pool: str, encoder) -> bool:
    entry = adata.uns.get(key)
    if key not in adata.obsm:
        return False
    if not isinstance(entry, Mapping) or not isinstance(entry.get("params"), Mapping):
        return True  # features given by the user, without a record: used as they are
    have = entry["params"]
    name = encoder if isinstance(encoder, str) else getattr(encoder, "name", None)
    return (str(have.get("patch", patch)) == str(patch) and have.get("pool", "mean") == pool
            and (name is None or have.get("encoder", name) == name))


def image_features(adata, specs, *, encoder="efficientnet_lite2", encoder_weights=None, device="auto",
                   image=None, progress=True, name: str = "image_features") -> tuple[str, ...]:
    """The step that computes ``obsm[key]`` for each ``(key, patch, pool)`` of ``specs`` with
    :func:`stmorph.im.features`, in one pass over the slide; a key already computed with the same patch,
    pooling and encoder is reused. Returns the keys."""
    specs = [tuple(s) for s in specs]
    todo = [s for s in specs if not _features_current(adata, *s, encoder)]
    if not todo:
        reuse(name)
        return tuple(k for k, _, _ in specs)
    from .. import im

    keys, patches, pools = zip(*todo)
    one = len(todo) == 1
    with step(name):
        im.features(adata, encoder=encoder, weights=encoder_weights, patch=patches[0] if one else patches,
                    key_added=keys[0] if one else keys, pool=pools[0] if one else pools, image=image, device=device,
                    progress=progress)
    return tuple(k for k, _, _ in specs)
