"""`stmorph report`."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="(being built)")
    p.set_defaults(func=main)


def main(args) -> int:
    from ..errors import StmorphError

    msg = "`stmorph report` is not built yet."
    raise StmorphError(msg)
