"""The report of a run (``report.html``): results first, a card per domain, a zoomable view over the H&E.

One self-contained file: figures and image tiles are embedded, the viewer is inline JavaScript, nothing
is fetched from the network.
"""

from ._html import build_report, chosen_method, report_methods, write_report

__all__ = ["write_report", "build_report", "chosen_method", "report_methods"]
