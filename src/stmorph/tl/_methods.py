"""The registry of domain-finding methods and :func:`run_methods`, the dispatcher the CLI and benchmark use.

A method is a function ``fn(adata, run)`` that writes ``obs[name]`` (and its
embeddings and ``uns[name]["params"]``), using the :class:`MethodRun` it is
handed for the run's options, for the steps methods share (expression PCA,
image features, the expression baseline's cluster count) and for timing.
Adding a method is one call to :func:`register_method` in the module that
defines it (imported by ``stmorph/tl/__init__.py``, which fixes the run order)::

    register_method("mymethod", run_mymethod, image="optional", summary="...")

``image`` says what the method does with the H&E: ``"required"`` (refused, or
skipped with ``skip_unavailable``, when no image or image features exist),
``"optional"`` (uses it when there is one, otherwise runs on expression alone
and records so) or ``"none"``.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from .. import _spatial
from ..errors import InputError

_IMAGE_USE = ("required", "optional", "none")


@dataclass(frozen=True)
class Method:
    """One registered method."""

    name: str
    run: Callable[[Any, MethodRun], None]
    image: str = "none"
    summary: str = ""
    #: the declared patches (keys of :data:`PATCHES`), or ``patches(options)`` giving them for a run's options
    patches: tuple[str, ...] | Callable[[dict], tuple[str, ...]] = ()
    #: ``reads_image(options)``: whether this run of the method reads image features (``None``: always, when
    #: there is an image); a method whose options turn the image off is left out of the one-pass prefetch
    reads_image: Callable[[dict], bool] | None = None


_REGISTRY: dict[str, Method] = {}


#: Image features methods can declare (``patches=``): obsm key, patch size and pooling of the encoder's map
#: (:func:`stmorph.im.features`' ``pool``); ``"spot"`` follows the run's ``feature_key``/``patch`` options.
#: :func:`run_methods` computes every declared one the chosen methods need in one pass over the slide (each
#: region decoded once, each patch size encoded once). ``"context"`` is SENCA-st's patch as published (the
#: whole patch averaged); ``"context_section"`` the same patch averaged over the tissue section only, so glass
#: beyond the section's edge does not make a domain of the border. ``"ring"`` / ``"ring_section"``: a patch of
#: side 3 spacings, the spot and its first ring of neighbours (the ``stmorph`` method's default context).
PATCHES = {"spot": None, "context": ("X_image_context", "6spacing", "mean"),
           "context_section": ("X_image_context_section", "6spacing", "section"),
           "ring": ("X_image_ring", "3spacing", "mean"),
           "ring_section": ("X_image_ring_section", "3spacing", "section")}


def register_method(name: str, run: Callable, *, image: str = "none", summary: str = "",
                    patches: tuple[str, ...] | Callable[[dict], tuple[str, ...]] = (),
                    reads_image: Callable[[dict], bool] | None = None) -> Method:
    """Register ``run(adata, method_run)`` under ``name`` (the ``obs`` key it writes).

    ``patches`` names the image features the method reads (keys of :data:`PATCHES`), or is a function of
    the :func:`run_methods` options returning them, so that a run of several methods extracts them all in one
    pass; ``reads_image(options)`` says whether a run with these options reads them at all (default: yes).
    """
    if image not in _IMAGE_USE:
        msg = f"image={image!r} is not one of {_IMAGE_USE}."
        raise ValueError(msg)
    if not callable(patches):
        _check_patches(tuple(patches))
    m = Method(name, run, image, summary, patches if callable(patches) else tuple(patches), reads_image)
    _REGISTRY[name] = m
    return m


def _check_patches(patches: tuple[str, ...]) -> tuple[str, ...]:
    unknown = [p for p in patches if p not in PATCHES]
    if unknown:
        msg = f"patches {unknown} are not among {list(PATCHES)}."
        raise ValueError(msg)
    return patches


def method_patches(name: str, options: dict) -> tuple[str, ...]:
    """The patches (keys of :data:`PATCHES`) the method ``name`` reads with these :func:`run_methods` options."""
    p = get_method(name).patches
    return _check_patches(tuple(p(options))) if callable(p) else p


def available_methods() -> tuple[str, ...]:
    """Registered method names, in the order they run."""
    return tuple(_REGISTRY)


def get_method(name: str) -> Method:
    if name not in _REGISTRY:
        msg = f"unknown method {name!r}; choose from {list(_REGISTRY)} or 'all'."
        raise InputError(msg)
    return _REGISTRY[name]


def has_image(adata, image=None, feature_key: str | None = "X_image") -> bool:
    """Whether image features exist (``obsm[feature_key]``) or can be computed for ``adata``; with
    ``feature_key=None``, only whether there is an image to compute them from."""
    if image is not None or (feature_key is not None and feature_key in adata.obsm):
        return True
    try:
        lib = _spatial.library(adata)
    except (InputError, KeyError):
        return False
    return bool(lib.get("metadata", {}).get("source_image_path")) or "fullres" in lib.get("images", {})


@dataclass
class MethodRun:
    """What a method sees while :func:`run_methods` runs it: options, shared steps, timing."""

    adata: Any
    options: dict
    n_clusters: int | None
    has_image: bool
    steps: dict[str, float] = field(default_factory=dict)
    uses: dict[str, list[str]] = field(default_factory=dict)
    done: set[str] = field(default_factory=set)
    current: str = ""

    def __getattr__(self, name):  # run.resolution, run.random_state, ... read the options
        try:
            return self.__dict__["options"][name]
        except KeyError:
            raise AttributeError(name) from None

    def step(self, name: str, fn: Callable, *args, **kwargs):
        """Run ``fn`` as the step ``name`` of the current method, timing it."""
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        self.steps[name] = self.steps.get(name, 0.0) + time.perf_counter() - t0
        self.uses.setdefault(self.current, []).append(name)
        return out

    def shared(self, name: str, done: bool, fn: Callable, *args, **kwargs):
        """A step several methods need: run once (``done`` says it already was), charged to each user."""
        if done:
            self.steps.setdefault(name, 0.0)
            self.uses.setdefault(self.current, []).append(name)
            return None
        return self.step(name, fn, *args, **kwargs)

    # ---- steps methods share ------------------------------------------------------------
    def expression_pca(self) -> str:
        """stMIC's expression embedding ``obsm["X_expr_pca"]`` (computed once per run)."""
        from ._embedding import expression_embedding

        self.shared("expression_embedding", "expression_embedding" in self.steps, expression_embedding, self.adata,
                    n_comps=self.n_comps, random_state=self.random_state)
        return "X_expr_pca"

    def image_features(self, keys=("X_image",), patches=None, pools=None) -> tuple[str, ...]:
        """``obsm[key]`` for each key from :func:`stmorph.im.features`, computed once (in one pass for several
        patch sizes; the disk cache serves reruns). ``patches`` default: the run's ``patch`` for every key;
        ``pools`` (``"mean"``/``"section"``) default: ``"mean"`` for every key."""
        from .. import im

        keys = (keys,) if isinstance(keys, str) else tuple(keys)
        patches = (self.patch,) * len(keys) if patches is None else tuple(patches)
        pools = ("mean",) * len(keys) if pools is None else tuple(pools)
        todo = [(k, p, q) for k, p, q in zip(keys, patches, pools) if k not in self.adata.obsm]
        name = "image_features" if keys[0] == "X_image" else f"image_features_{keys[0]}"
        todo_keys, todo_patches, todo_pools = zip(*todo) if todo else ((), (), ())
        one = len(todo) == 1
        self.shared(name, not todo, im.features, self.adata, encoder=self.encoder, weights=self.encoder_weights,
                    patch=todo_patches[0] if one else todo_patches, key_added=todo_keys[0] if one else todo_keys,
                    pool=todo_pools[0] if one else (todo_pools or "mean"),
                    image=self.image, device=self.device, progress=self.progress)
        return keys

    def patch_key(self, name: str) -> tuple[str, Any]:
        """``(obsm key, patch size)`` of a declared patch (see :data:`PATCHES`)."""
        return (self.feature_key, self.patch) if PATCHES[name] is None else PATCHES[name][:2]

    def patch_pool(self, name: str) -> str:
        """The pooling (``"mean"`` or ``"section"``) of a declared patch (see :data:`PATCHES`)."""
        return "mean" if PATCHES[name] is None else PATCHES[name][2]

    def expression_count(self) -> int | None:
        """The cluster count for methods told to follow the expression baseline (stMIC's protocol)."""
        if self.n_clusters is not None:
            return self.n_clusters
        self.run_method("expression")
        self.uses.setdefault(self.current, []).extend(self.uses.get("expression", []))
        return int(self.adata.obs["expression"].nunique())

    def run_method(self, name: str) -> None:
        """Run the registered method ``name`` unless this run already did."""
        if name in self.done:
            return
        prev, self.current = self.current, name
        try:
            get_method(name).run(self.adata, self)
        finally:
            self.current = prev
        self.done.add(name)


def run_methods(
    adata,
    methods: Iterable[str] | str = ("expression", "image", "stmic"),
    *,
    n_clusters: int | None = None,
    resolution: float = 1.7,
    match_expression: bool = True,
    n_neighbors: int = 39,
    cluster_method: str = "louvain",
    n_comps: int = 10,
    modality_weights: tuple[float, float] | None = None,
    image=None,
    encoder: str = "efficientnet_lite2",
    encoder_weights: str | None = None,
    patch="spot",
    feature_key: str = "X_image",
    device: str = "auto",
    refine: bool | None = None,
    skip_unavailable: bool = False,
    senca_options: dict | None = None,
    stmorph_options: dict | None = None,
    random_state: int = 0,
    progress: bool = True,
) -> dict[str, float]:
    """Run several domain-finding methods on one section, sharing common steps.

    Parameters
    ----------
    adata
        A section in stmorph's data model (see :func:`stmorph.validate`).
    methods
        Registered method names (:func:`methods`): ``"stmorph"`` (stmorph's own,
        see :func:`stmorph.tl.stmorph`), ``"expression"`` (the stMIC paper's GEBC
        baseline), ``"image"`` (image only), ``"stmic"``, ``"senca"``; ``"all"`` for every one.
    n_clusters
        Number of domains for every method. ``None``: ``stmorph`` chooses its
        own count (see :func:`stmorph.tl.stmorph`); the expression baseline uses
        ``resolution`` and, with ``match_expression``, ``image``/``stmic``/``senca``
        take its cluster count (as the stMIC paper did).
    resolution
        Louvain resolution used when no cluster count is set (the paper: 1.5-1.9).
    match_expression
        Without ``n_clusters``, give ``image``/``stmic`` the expression
        baseline's cluster count; otherwise they use ``resolution`` too
        (SENCA-st always needs a count).
    n_neighbors, cluster_method
        kNN size and ``"louvain"``/``"leiden"`` of the stMIC-family methods
        (see :func:`stmorph.tl.cluster`).
    n_comps
        Principal components per modality of stMIC (the paper: 10).
    modality_weights
        stMIC's ``(expression, image)`` multipliers in the concatenation; ``None`` = equal.
    image, encoder, encoder_weights, patch, feature_key, device
        Image features: an explicit image (path or array), the encoder name
        and weights file, the patch size (``"spot"``, pixels, or ``"NNum"``),
        the ``obsm`` key (reused when present, so features are computed once)
        and the torch device. See :func:`stmorph.im.features`.
    refine
        Majority refinement over spatial neighbours for every method that clusters with
        :func:`stmorph.tl.cluster`; ``None``: each method's default (on for ``stmorph``,
        off for the papers' methods, which stay as published).
    skip_unavailable
        Skip methods that require an image when none is available instead of raising.
    senca_options, stmorph_options
        Keyword arguments for :func:`stmorph.tl.senca` and :func:`stmorph.tl.stmorph`.
    random_state
        Seed for PCA, community detection, mixtures and SENCA-st.
    progress
        Show progress bars.

    Returns
    -------
    Seconds each method took, its shared steps included; a skipped method is absent.

    Sets the following fields:

    ``adata.obs[method]`` for each method run, with its embeddings in ``obsm`` and
    ``uns[method]["params"]``; ``uns["stmorph_run"]`` with ``steps_s`` (seconds per step),
    ``methods_s``, ``skipped`` (method -> reason), ``n_clusters`` and ``primary`` (the
    method to show first: ``stmorph`` when it ran).
    """
    registered = available_methods()
    chosen = list(registered) if methods == "all" or "all" in list(methods) else list(dict.fromkeys(methods))
    unknown = [m for m in chosen if m not in registered]
    if unknown:
        msg = f"unknown method(s) {unknown}; choose from {list(registered)} or 'all'."
        raise InputError(msg)
    chosen = [m for m in registered if m in chosen]
    skipped: dict[str, str] = {}
    image_ok = has_image(adata, image, feature_key)
    if not image_ok:
        reason = "no full-resolution image (give one with image=/--image) and no precomputed image features"
        for m in chosen:
            if get_method(m).image == "required":
                if not skip_unavailable:
                    msg = f"method {m!r} needs the H&E image: {reason}."
                    raise InputError(msg)
                skipped[m] = reason
        chosen = [m for m in chosen if m not in skipped]

    options = {
        "resolution": resolution, "match_expression": match_expression, "n_neighbors": n_neighbors,
        "cluster_method": cluster_method, "n_comps": n_comps, "modality_weights": modality_weights, "image": image,
        "encoder": encoder, "encoder_weights": encoder_weights, "patch": patch, "feature_key": feature_key,
        "device": device, "refine": refine, "senca_options": dict(senca_options or {}), "stmorph_options": dict(stmorph_options or {}),
        "random_state": random_state, "progress": progress,
    }
    run = MethodRun(adata, options, n_clusters, image_ok)
    readers = [m for m in chosen if get_method(m).reads_image is None or get_method(m).reads_image(options)]
    wanted = list(dict.fromkeys(p for m in readers for p in method_patches(m, options))) if image_ok else []
    if len(wanted) > 1:  # one pass over the slide for every patch size the chosen methods read
        keys, sizes = zip(*[run.patch_key(p) for p in wanted])
        run.current = "_prefetch"
        run.image_features(keys, sizes, [run.patch_pool(p) for p in wanted])
        prefetch = run.uses.pop("_prefetch", [])
        for m in readers:  # its time counts for every method that reads image features
            if method_patches(m, options):
                run.uses.setdefault(m, []).extend(prefetch)
    for name in chosen:
        run.run_method(name)

    seconds = {m: float(sum(run.steps.get(s, 0.0) for s in dict.fromkeys(run.uses.get(m, [])))) for m in chosen}
    counts = {int(adata.obs[m].nunique()) for m in chosen if m in adata.obs}
    adata.uns["stmorph_run"] = {
        "steps_s": {k: float(v) for k, v in run.steps.items()},
        "methods_s": seconds,
        "skipped": skipped,
        "n_clusters": int(n_clusters) if n_clusters is not None else (counts.pop() if len(counts) == 1 else -1),
        "primary": "stmorph" if "stmorph" in chosen else (chosen[-1] if chosen else ""),
    }
    for m, why in skipped.items():
        warnings.warn(f"skipped {m!r}: {why}", stacklevel=2)
    return seconds
