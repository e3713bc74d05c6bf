"""The study as a web report: ``$MEDPLAN_RESULTS/report/index.html``, opened from the file system.

:func:`build_report` reads the results tree (and the plan stage's files) and writes the page,
its figures (PNG for the page, PDF and SVG at a column width for the paper) and its pictures.
It sits above :mod:`medplan.evaluation` (whose tables and statistics it shows) and below the
drivers and the CLI (``medplan_evaluate --all-folds`` / ``--html`` and the study's end call it).
"""
from medplan.report.build import INDEX, REPORT_DIR, build_report

__all__ = ["INDEX", "REPORT_DIR", "build_report"]
