"""Command-line flags of the methods' options, built from their declarations (:mod:`stmorph.tl._options`).

``stmorph run``, ``stmorph demo``, ``stmorph benchmark`` and cohort manifests (whose columns are
``stmorph run``'s options) all take these flags; each is declared once, where its method registers.
A flag left out is not passed at all (``argparse.SUPPRESS``), so a method's own default applies and
an option nobody gave is never recorded as given.
"""

from __future__ import annotations

import argparse

from ..tl import _methods

#: Options the command line sets itself (per section, per seed) rather than as flags of this module.
NOT_FLAGS = ("random_state",)


def _defaults_line(name: str) -> str:
    """``"default: 0.3"`` or ``"default: stmorph gmm; expression louvain"``: each method's default for ``name``,
    from its function's signature ("" when every method leaves it unset)."""
    by_value: dict[str, list[str]] = {}
    for m in _methods.users_of(name):
        v = _methods.get_method(m).defaults().get(name)
        if v is None:
            continue
        shown = " ".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)
        by_value.setdefault(shown, []).append(m)
    if not by_value:
        return ""
    if len(by_value) == 1:
        return f"default: {next(iter(by_value))}; "
    return "default: " + "; ".join(f"{', '.join(ms)} {v}" for v, ms in by_value.items()) + "; "


def _parser_for(option):
    def parse(text: str):
        return option._one(text)

    parse.__name__ = option.name
    return parse


def add_method_options(parser, *, exclude=()) -> None:
    """Add a flag for every declared option (grouped as declared), each defaulting to "not given"."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for name, opt in _methods.OPTIONS.items():
        if name in NOT_FLAGS or name in exclude or not _methods.users_of(name):
            continue
        g = groups.get(opt.group)
        if g is None:
            g = groups[opt.group] = parser.add_argument_group(opt.group)
        used = ", ".join(_methods.users_of(name))
        # RST markup in the declarations is removed when the help is shown (cli._Parser.format_help)
        help_text = (f"{opt.help} ({_defaults_line(name)}used by {used}"
                     f"{'; only ' + opt.when if opt.when else ''})").replace("%", "%%")
        kw = {"dest": name, "default": argparse.SUPPRESS, "help": help_text}
        if opt.negatable:
            g.add_argument(opt.cli_flag, action=argparse.BooleanOptionalAction, **kw)
            continue
        if opt.choices is not None:
            kw["choices"] = opt.choices
        else:
            kw["type"] = _parser_for(opt)
            kw["metavar"] = opt.metavar or name.split("_")[-1].upper()
        if opt.nargs:
            kw["nargs"] = opt.nargs
        g.add_argument(opt.cli_flag, **kw)


def given_options(args) -> dict:
    """The method options given on the command line (flag dests are the options' names)."""
    return {name: getattr(args, name) for name in _methods.OPTIONS if name not in NOT_FLAGS and hasattr(args, name)}
