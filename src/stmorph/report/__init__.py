"""Self-contained HTML report of a run (``report.html``: figures embedded as PNG, opens from disk)."""

from ._html import build_report, write_report

__all__ = ["write_report", "build_report"]
