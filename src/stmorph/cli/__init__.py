"""The ``stmorph`` command line: ``run``, ``demo``, ``benchmark``, ``report``, ``cohort``.

Each sub-command lives in its own module exposing ``add_parser(subparsers)``
and ``main(args) -> int``. Errors caused by the user's input are printed as one
line on stderr with a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import re
import signal
import sys
import threading

from .. import __version__
from ..errors import StmorphError

_COMMANDS = ("run", "demo", "benchmark", "report", "cohort")


def plain(text: str) -> str:
    """Text for a terminal, without the RST markup of the docstrings and declarations it is built from:
    double backticks are dropped, and a role such as :func:`stmorph.tl.stmorph` becomes its target's name
    (the last part only when it starts with ``~``)."""
    text = re.sub(r":[a-z]+:`([^`]*)`", _role, text)
    return re.sub(r"``([^`]*)``", r"\1", text)


def _role(match: re.Match) -> str:
    target = match.group(1)
    return target[1:].rsplit(".", 1)[-1] if target.startswith("~") else target


class _Parser(argparse.ArgumentParser):
    """argparse, with one-line errors and help without the docstrings' RST markup (descriptions, option
    help and group titles alike)."""

    def format_help(self) -> str:
        return plain(super().format_help())

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="stmorph",
        description="Spatial domains from spatial transcriptomics and the H&E image of the same section.",
    )
    parser.add_argument("--version", action="version", version=f"stmorph {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name in _COMMANDS:
        importlib.import_module(f"{__name__}._{name}").add_parser(sub)
    return parser


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that temporary outputs are removed on the way out."""


def _on_sigterm(signum, frame):
    raise _Terminated


def main(argv: list[str] | None = None) -> int:
    import warnings

    warnings.formatwarning = _one_line_warning  # no source lines on the command line
    parser = build_parser()
    args = parser.parse_args(argv)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return int(args.func(args) or 0)
    except StmorphError as exc:
        print(f"stmorph {args.command}: error: {exc.cli_message()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        term = isinstance(exc, _Terminated)
        print(f"stmorph {args.command}: {'terminated' if term else 'interrupted'}", file=sys.stderr)
        return 143 if term else 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
