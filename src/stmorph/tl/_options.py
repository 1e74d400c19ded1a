"""Method options, declared once: name, type, help, and which methods use them.

An :class:`Option` is declared once, either here (options several methods share: the number of
domains, the clustering, the image encoder) or by the method that owns it, when it registers
(:func:`stmorph.tl.register_method`'s ``declare=``). Each method lists the options it takes
(``options=``); its default for each is the default of its function's keyword, read from the
signature, so nothing is written twice. The command line's flags and choices, the cohort
manifest's columns, ``stmorph benchmark``'s options and ``run.json`` are built from these
declarations (:mod:`stmorph.cli._options`), and :func:`stmorph.tl.run_methods` refuses an option
that none of the chosen methods uses instead of recording and ignoring it.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import InputError

#: Largest seed: numpy's ``SeedSequence`` takes any integer, but h5py and torch want 64 and 32 bits.
MAX_SEED = 2**32 - 1


def _number(text: str, kind: type) -> float:
    try:
        v = kind(text)
    except (TypeError, ValueError, OverflowError):
        msg = f"expected a {'whole ' if kind is int else ''}number, got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    return v


def between(low: float | None = None, high: float | None = None, *, kind: type = float,
            open_low: bool = False) -> Callable[[Any], Any]:
    """A parser of numbers in ``[low, high]`` (``(low, high]`` with ``open_low``), for text or values."""

    def parse(value):
        v = _number(value, kind) if isinstance(value, str) else value
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            v = _number(str(value), kind)
        if kind is int and not float(v).is_integer():
            msg = f"expected a whole number, got {value!r}"
            raise argparse.ArgumentTypeError(msg)
        v = kind(v)
        too_low = low is not None and (v <= low if open_low else v < low)
        if too_low or (high is not None and v > high) or not math.isfinite(v):
            lo = "" if low is None else (f"above {low:g}" if open_low else f"at least {low:g}")
            if low == 0 and open_low:
                lo = "a positive number"
            hi = "" if high is None else f"at most {high:g}"
            msg = f"must be {' and '.join(x for x in (lo, hi) if x)}; got {value!r}"
            raise argparse.ArgumentTypeError(msg)
        return v

    parse.__name__ = f"{kind.__name__} in [{low}, {high}]"
    return parse


def boolean(value) -> bool:
    """``True``/``False``, or the words a manifest cell may hold (true/false, yes/no, on/off, 1/0)."""
    if isinstance(value, bool):
        return value
    v = str(value).strip().lower()
    if v in ("true", "yes", "on", "1"):
        return True
    if v in ("false", "no", "off", "0"):
        return False
    msg = f"expected true or false, got {value!r}"
    raise argparse.ArgumentTypeError(msg)


def text(value) -> str:
    return str(value)


@dataclass(frozen=True)
class Option:
    """One option of one or more methods.

    ``name`` is the keyword of every method function that takes it and the key in ``run.json``;
    ``flag`` the command line's (default ``--`` + ``name`` with dashes); ``parse`` turns a command-line
    word, a manifest cell or a Python value into the value (raising ``argparse.ArgumentTypeError``);
    ``choices`` the values allowed; ``nargs="+"`` for a list; ``group`` the heading it is listed under
    in ``--help``; ``applies(options)``, when given, says whether a method that lists it uses it with the
    other options of the run (e.g. the Louvain resolution is not used by the Gaussian mixture), and
    ``when`` says so in words.
    """

    name: str
    help: str
    parse: Callable[[Any], Any] = text
    choices: tuple | None = None
    nargs: str | None = None
    metavar: str | None = None
    flag: str | None = None
    group: str = "clustering"
    negatable: bool = False
    applies: Callable[[dict], bool] | None = None
    when: str = ""

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    def value(self, raw) -> Any:
        """``raw`` (text or a Python value) parsed and checked, or a one-line :class:`InputError`."""
        try:
            if self.nargs == "+":
                items = raw if isinstance(raw, (list, tuple)) else [raw]
                if not items:
                    raise argparse.ArgumentTypeError("expected one or more values")
                v = tuple(self._one(x) for x in items)
            else:
                v = self._one(raw)
        except argparse.ArgumentTypeError as exc:
            msg = f"{self.cli_flag} ({self.name}): {exc}"
            raise InputError(msg) from None
        return v

    def _one(self, raw):
        v = self.parse(raw)
        if self.choices is not None and v not in self.choices:
            msg = f"must be one of {', '.join(map(str, self.choices))}; got {raw!r}"
            raise argparse.ArgumentTypeError(msg)
        return v


def _uses_graph(options: dict) -> bool:
    return options.get("cluster_method") not in ("gmm", "consensus")


_GRAPH = "with --cluster-method louvain or leiden (the Gaussian mixtures, gmm and consensus, have no graph)"


#: Options several methods share. A method takes those it lists in ``register_method(options=...)``.
SHARED: tuple[Option, ...] = (
    Option("n_clusters", "number of domains. Without it: stmorph and stmorph_expr take the number of Louvain "
           "communities in their embedding's kNN graph (15 neighbours, resolution 0.5, kept within 2-12; with "
           "--cluster-method louvain or leiden, the communities at --resolution); the expression baseline its "
           "Louvain communities at --resolution; image, stmic and senca the expression baseline's count",
           between(2, kind=int), metavar="K"),
    Option("cluster_method", "how the domains are found: consensus (the majority of many tied Gaussian "
           "mixtures), gmm (one tied Gaussian mixture, best of its restarts), louvain or leiden (kNN graph "
           "communities)", choices=("consensus", "gmm", "louvain", "leiden")),
    Option("resolution", "modularity resolution of louvain/leiden without n_clusters (stMIC paper: 1.5-1.9)",
           between(0, 1e4, open_low=True), applies=_uses_graph, when=_GRAPH),
    Option("n_neighbors", "kNN graph size of louvain/leiden (stMIC paper: 39)", between(2, 10_000, kind=int),
           applies=_uses_graph, when=_GRAPH),
    Option("refine", "majority refinement over each spot's first ring of neighbours, at most 150 um away (legacy "
           "ST spots, 200 um apart, keep their labels)", boolean, negatable=True),
    Option("encoder", "image encoder: efficientnet_lite2 (embedded), resnet50, or a pathology foundation model "
           "preset (uni, uni2_h, virchow2, h_optimus_0, phikon_v2, gigapath, conch_vision); all but the default "
           "need encoder_weights (a local file, never downloaded)", group="image features"),
    Option("encoder_weights", "encoder weights file (e.g. torchvision resnet50-*.pth)", flag="--weights",
           metavar="FILE", group="image features"),
    Option("patch", "patch side: spot (the spot diameter, stMIC), pixels (e.g. 224) or micrometres (e.g. 100um)",
           group="image features"),
    Option("device", "torch device: auto (CUDA when present), cpu, cuda, cuda:1 ...", group="image features"),
)


def merge(options: Sequence[Option], into: dict[str, Option]) -> None:
    """Add ``options`` to the catalogue ``into``; a name declared twice must be the same declaration."""
    for o in options:
        if o.name in into and into[o.name] != o:
            msg = f"option {o.name!r} is declared twice, differently."
            raise ValueError(msg)
        into[o.name] = o
