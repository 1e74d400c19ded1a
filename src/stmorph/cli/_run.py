"""`stmorph run`."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("run", help="(being built)")
    p.set_defaults(func=main)


def main(args) -> int:
    from ..errors import StmorphError

    msg = "`stmorph run` is not built yet."
    raise StmorphError(msg)
