"""`stmorph benchmark`."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("benchmark", help="(being built)")
    p.set_defaults(func=main)


def main(args) -> int:
    from ..errors import StmorphError

    msg = "`stmorph benchmark` is not built yet."
    raise StmorphError(msg)
