"""The registry of domain-finding methods and :func:`run_methods`, which runs several on one section.

A method is its algorithm: a function ``fn(adata, *, <its options>, random_state=0, progress=True)``
that writes ``obs[name]`` (with its embeddings and ``uns[name]["params"]``), such as
:func:`stmorph.tl.stmorph`. Registering it says which options it takes and what it does with the H&E;
its defaults are its function's own. Adding a method is one module calling :func:`register_method`
(imported by ``stmorph/tl/__init__.py``, which fixes the run order)::

    register_method("mymethod", my_function, options=("n_clusters", "my_option"),
                    declare=(Option("my_option", "what it does", between(0, 1)),), summary="...")

The command line (``stmorph run``, ``demo``, ``benchmark``) and cohort manifests then offer
``--my-option`` for it without any other change. A method outside stmorph is a module named by an
entry point of the group ``stmorph.methods`` (in its package's metadata): :func:`load_plugins`
imports it when ``stmorph.tl`` is imported, in every process, cohort workers included. ``image`` says what the method does with the H&E:
``"required"`` (refused, or skipped with ``skip_unavailable``, when no image or image features exist),
``"optional"`` (uses it when there is one, otherwise runs on expression alone and records so) or
``"none"``. A group (``register_group``) names several methods run together, as stMIC with its two
baselines.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .. import _spatial
from ..errors import InputError
from . import _steps
from ._options import SHARED, Option, merge

_IMAGE_USE = ("required", "optional", "none")
#: Keywords :func:`run_methods` passes to every method function that takes them (never refused).
RUN_KEYWORDS = ("random_state", "progress", "image")


@dataclass(frozen=True)
class Method:
    """One registered method: its function, the options it takes and what it reads."""

    name: str
    function: Callable[..., None]
    options: tuple[str, ...] = ()
    image: str = "none"
    summary: str = ""
    #: the declared patches (keys of :data:`~._steps.PATCHES`), or ``patches(options)`` giving them for its options
    patches: tuple[str, ...] | Callable[[dict], tuple[str, ...]] = ()
    #: ``reads_image(options)``: whether the method reads image features with these options (``None``: always,
    #: when there is an image); a method whose options turn the image off is left out of the one-pass prefetch
    reads_image: Callable[[dict], bool] | None = None
    #: a baseline or variant shown beside a method (stMIC's expression-only and image-only, stmorph_expr), never
    #: chosen as the run's main result when a method that is not one ran
    baseline: bool = False

    def defaults(self) -> dict[str, Any]:
        """The method's default for each of its options: its function's keyword defaults."""
        return {k: v for k, v in _signature_defaults(self.function).items() if k in self.options}

    def accepts(self, keyword: str) -> bool:
        return keyword in _signature_defaults(self.function)

    def resolved(self, given: dict) -> dict:
        """Its options with ``given`` applied over its defaults."""
        return {**self.defaults(), **{k: v for k, v in given.items() if k in self.options}}

    def uses(self, option: str, given: dict) -> bool:
        """Whether this method uses ``option`` with the other options ``given``."""
        if option not in self.options:
            return False
        applies = OPTIONS[option].applies
        return applies is None or applies(self.resolved(given))

    def read_patches(self, given: dict) -> tuple[str, ...]:
        opts = self.resolved(given)
        if self.reads_image is not None and not self.reads_image(opts):
            return ()
        p = self.patches(opts) if callable(self.patches) else self.patches
        for name in p:
            _steps.feature_spec(name)
        return tuple(p)


@functools.lru_cache(maxsize=None)
def _signature_defaults(function: Callable) -> dict[str, Any]:
    fixed = {}
    while isinstance(function, functools.partial):  # a variant: the keywords it fixes are its defaults
        fixed = {**function.keywords, **fixed}
        function = function.func
    params = inspect.signature(function).parameters
    out = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
    return {**out, **{k: v for k, v in fixed.items() if k in params}}


_REGISTRY: dict[str, Method] = {}
_GROUPS: dict[str, tuple[str, str]] = {}  # name -> (summary, members joined by ",")
#: Every option any method declares, by name (:data:`~._options.SHARED` and those methods declare).
OPTIONS: dict[str, Option] = {o.name: o for o in SHARED}


def register_method(name: str, function: Callable, *, options: Sequence[str] = (), declare: Sequence[Option] = (),
                    image: str = "none", summary: str = "",
                    patches: tuple[str, ...] | Callable[[dict], tuple[str, ...]] = (),
                    reads_image: Callable[[dict], bool] | None = None, baseline: bool = False) -> Method:
    """Register ``function`` as the method ``name`` (the ``obs`` key it writes).

    Parameters
    ----------
    name
        The method's name: ``obs[name]``, ``--method name``.
    function
        ``function(adata, **options)`` writing ``obs[name]`` and ``uns[name]["params"]``; it also receives
        ``random_state``, ``progress`` and ``image`` when its signature has them.
    options
        Names of the options it takes (shared ones, see :data:`~._options.SHARED`, and those in ``declare``);
        each must be a keyword of ``function``, whose default is the method's default.
    declare
        :class:`~._options.Option` declarations of options this method brings.
    image
        ``"required"``, ``"optional"`` or ``"none"`` (see the module's description).
    summary
        One line for ``--help`` and the docs.
    patches
        The image features it reads (keys of :data:`~._steps.PATCHES`), or a function of its options giving
        them, so that a run of several methods extracts them all in one pass over the slide.
    reads_image
        ``reads_image(options)``: whether it reads image features at all with these options (default: yes).
    baseline
        A baseline or variant of another method (shown beside it, never the run's main result when that one ran).
    """
    if image not in _IMAGE_USE:
        msg = f"image={image!r} is not one of {_IMAGE_USE}."
        raise ValueError(msg)
    merge(declare, OPTIONS)
    params = _signature_defaults(function)
    missing = [o for o in options if o not in OPTIONS or o not in params]
    if missing:
        msg = (f"method {name!r}: options {missing} must be declared (SHARED or declare=) and be keywords with "
               "defaults of its function.")
        raise ValueError(msg)
    if not callable(patches):
        for p in patches:
            _steps.feature_spec(p)
    m = Method(name, function, tuple(options), image, summary, patches if callable(patches) else tuple(patches),
               reads_image, baseline)
    _REGISTRY[name] = m
    return m


#: The entry-point group of methods defined outside stmorph: each entry names a module that registers one.
PLUGIN_GROUP = "stmorph.methods"


def load_plugins(group: str = PLUGIN_GROUP) -> list[str]:
    """Import every module the entry points of ``group`` name (each registers its methods); one that fails to
    load is reported as a warning and left out. Returns the entry points loaded."""
    from importlib.metadata import entry_points

    loaded = []
    for ep in entry_points(group=group):
        try:
            ep.load()
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not break stmorph
            warnings.warn(f"stmorph method plugin {ep.name!r} ({ep.value}) could not be loaded: "
                          f"{type(exc).__name__}: {exc}", stacklevel=2)
            continue
        loaded.append(ep.name)
    return loaded


def register_group(name: str, members: Sequence[str], *, summary: str = "") -> None:
    """``--method name`` runs every one of ``members`` (registered methods); a group may carry the name of
    one of its members (``stmic``: the method and its two baselines)."""
    unknown = [m for m in members if m not in _REGISTRY]
    if unknown or (name in _REGISTRY and name not in members):
        msg = f"group {name!r}: {'unknown members ' + str(unknown) if unknown else 'a method has that name'}."
        raise ValueError(msg)
    _GROUPS[name] = (summary, ",".join(members))


def available_methods() -> tuple[str, ...]:
    """Registered method names, in the order they run."""
    return tuple(_REGISTRY)


def method_groups() -> dict[str, tuple[str, ...]]:
    """Groups: name -> the methods it runs (besides ``"all"``, every method)."""
    return {g: tuple(members.split(",")) for g, (_, members) in _GROUPS.items()}


def method_summary(name: str) -> str:
    return _GROUPS[name][0] if name in _GROUPS else get_method(name).summary


def get_method(name: str) -> Method:
    if name not in _REGISTRY:
        msg = f"unknown method {name!r}; choose from {list(_REGISTRY)} or 'all'."
        raise InputError(msg)
    return _REGISTRY[name]


def resolve_methods(chosen: Iterable[str] | str | None, default: Sequence[str] = ("stmorph",), *,
                    groups_first: bool = False) -> list[str]:
    """Method names, groups and ``"all"`` expanded to registered methods, in run order. A name that is both a
    method and a group (``stmic``) is the method, or with ``groups_first`` (the command line's ``--method``)
    the group."""
    if chosen is None:
        chosen = list(default)
    chosen = [chosen] if isinstance(chosen, str) else list(chosen)
    if "all" in chosen:
        return list(_REGISTRY)
    groups = method_groups()
    names = [n for c in chosen
             for n in (groups[c] if c in groups and (groups_first or c not in _REGISTRY) else (c,))]
    unknown = [m for m in names if m not in _REGISTRY]
    if unknown:
        msg = f"unknown method(s) {unknown}; choose from {[*_REGISTRY, *groups]} or 'all'."
        raise InputError(msg)
    return [m for m in _REGISTRY if m in names]


def primary_method(methods: Sequence[str]) -> str:
    """The result to show first among ``methods``: the first that is not a baseline (in run order), else the
    first; "" for none. Unregistered names count as methods."""
    main = [m for m in methods if m not in _REGISTRY or not _REGISTRY[m].baseline]
    return (main or list(methods) or [""])[0]


def users_of(option: str) -> list[str]:
    """The registered methods that take ``option``."""
    return [m.name for m in _REGISTRY.values() if option in m.options]


def check_options(methods: Sequence[str], given: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each method's keywords from the options ``given`` (catalogue names), parsed and checked.

    An option that is not declared, or that none of ``methods`` uses with these options, is refused with
    one line naming it and who would use it; one that only some use goes to those.
    """
    parsed = {}
    for name, raw in given.items():
        if name not in OPTIONS:
            msg = f"unknown option {name!r}; methods take: {', '.join(sorted(OPTIONS))}."
            raise InputError(msg)
        parsed[name] = OPTIONS[name].value(raw)
    out: dict[str, dict[str, Any]] = {m: {} for m in methods}
    for name, value in parsed.items():
        takers = [m for m in methods if get_method(m).uses(name, parsed)]
        if not takers:
            opt = OPTIONS[name]
            listing = [m for m in methods if name in get_method(m).options]
            if listing:  # listed, but not with these options (e.g. a resolution for the Gaussian mixture)
                msg = f"{opt.cli_flag} is not used by {', '.join(listing)} as run: it applies only {opt.when}."
            else:
                msg = (f"{opt.cli_flag} is not used by the chosen method(s) {', '.join(methods)}; "
                       f"it is an option of {', '.join(users_of(name)) or 'no registered method'}.")
            raise InputError(msg)
        for m in takers:
            out[m][name] = value
    return out


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


def _prefetch(adata, chosen: Sequence[str], kwargs: dict[str, dict], *, image, progress: bool) -> None:
    """Every image feature the chosen methods read, in one pass over the slide (each region decoded once,
    each patch size encoded once): a step of the run, shared, not of any one method."""
    specs, runtime = [], None
    for m in chosen:
        method = get_method(m)
        names = method.read_patches(kwargs[m])
        if not names:
            continue
        opts = method.resolved(kwargs[m])
        for n in names:
            spec = _steps.feature_spec(n, opts.get("patch", "spot"))
            if spec not in specs:
                specs.append(spec)
        here = {k: opts.get(k, d) for k, d in (("encoder", "efficientnet_lite2"), ("encoder_weights", None),
                                               ("device", "auto"))}
        runtime = runtime or here
    if specs:
        _steps.image_features(adata, specs, image=image, progress=progress, **runtime)


def run_methods(
    adata,
    methods: Iterable[str] | str = ("expression", "image", "stmic"),
    *,
    n_clusters: int | None = None,
    image=None,
    skip_unavailable: bool = False,
    random_state: int = 0,
    progress: bool = True,
    **options: Any,
) -> dict[str, float]:
    """Run several domain-finding methods on one section, sharing the steps they have in common.

    Parameters
    ----------
    adata
        A section in stmorph's data model (see :func:`stmorph.validate`).
    methods
        Registered method names (:func:`available_methods`) or groups: ``"stmorph"`` (stmorph's own, see
        :func:`stmorph.tl.stmorph`), ``"stmorph_expr"`` (the same on expression alone), ``"stmic"`` (stMIC
        with its two baselines ``"expression"`` and ``"image"``), ``"senca"``; ``"all"`` for every method.
    n_clusters
        Number of domains for every method; ``None``: each method's own rule (``stmorph`` chooses its count,
        the expression baseline uses its resolution, and ``image``, ``stmic`` and ``senca`` take the
        expression baseline's count, as the stMIC paper did).
    image
        An explicit full-resolution image (path or array) for the methods that read one.
    skip_unavailable
        Skip methods that require an image when none is available instead of raising.
    random_state
        Seed of every random step.
    progress
        Show progress bars, and a line on stderr as each step starts.
    **options
        Options of the chosen methods, by name (``resolution=1.5``, ``sigmas_um=(100, 200)``,
        ``epochs=20``...; see ``stmorph run --help``); each goes to the methods that take it. An option none
        of them uses is refused.

    Returns
    -------
    Seconds each method took on its own steps. Shared steps (output used by more than one method, and the
    image features computed for all of them first) are in no method's time: they are in
    ``uns["stmorph_run"]["steps_s"]``, once, and named in ``uns["stmorph_run"]["shared_steps"]``. A skipped
    method is absent.

    Sets the following fields:

    ``adata.obs[method]`` for each method run, with its embeddings in ``obsm`` and ``uns[method]["params"]``;
    ``adata.uns["stmorph_run"]``
        ``steps_s`` (seconds per step), ``methods_s``, ``shared_steps`` (steps whose output more than one
        method used), ``skipped`` (method -> reason), ``n_clusters`` and ``primary`` (the method to show
        first: ``stmorph`` when it ran).
    """
    chosen = resolve_methods(methods)
    if n_clusters is not None:
        options["n_clusters"] = n_clusters
    kwargs = check_options(chosen, options)
    skipped: dict[str, str] = {}
    image_ok = has_image(adata, image)
    if not image_ok:
        def reason(how):
            return f"no full-resolution image (give one with {how}) and no precomputed image features"

        for m in chosen:
            if get_method(m).image == "required":
                if not skip_unavailable:
                    raise InputError(f"method {m!r} needs the H&E image: {reason('image=')}.",
                                     cli=f"method {m!r} needs the H&E image: {reason('--image')}.")
                skipped[m] = reason("image=/--image")
        chosen = [m for m in chosen if m not in skipped]
    log = _steps.StepLog(progress=progress)
    with _steps.recording(log):
        if image_ok:
            with _steps.running(_steps.PREFETCH):
                _prefetch(adata, chosen, kwargs, image=image, progress=progress)
        for name in chosen:
            method = get_method(name)
            run = {"random_state": random_state, "progress": progress, "image": image}
            call = {**{k: v for k, v in run.items() if method.accepts(k)}, **kwargs[name]}
            with _steps.running(name):
                method.function(adata, **call)
    seconds = {m: log.own_seconds(m) for m in chosen}
    counts = {int(adata.obs[m].nunique()) for m in chosen if m in adata.obs}
    adata.uns["stmorph_run"] = {
        "steps_s": {k: float(v) for k, v in log.seconds.items()},
        "methods_s": seconds,
        "shared_steps": log.shared_steps(),
        "skipped": skipped,
        "n_clusters": int(n_clusters) if n_clusters is not None else (counts.pop() if len(counts) == 1 else -1),
        "primary": primary_method(chosen),
    }
    for m, why in skipped.items():
        warnings.warn(f"skipped {m!r}: {why}", stacklevel=2)
    return seconds
