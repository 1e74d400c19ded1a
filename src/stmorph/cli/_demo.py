"""`stmorph demo`."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="(being built)")
    p.set_defaults(func=main)


def main(args) -> int:
    from ..errors import StmorphError

    msg = "`stmorph demo` is not built yet."
    raise StmorphError(msg)
