"""Markdown table cells for the benchmarks' reports (``perf.md``, ``gpu.md``)."""

from __future__ import annotations

NONE = "–"  # a value not measured for this row (an empty cell reads as a formatting slip)


def cell(v: object) -> str:
    """One value as a table cell: floats to 3 significant digits (whole numbers from 100 on, with
    thousands separators), booleans as yes/no, and no ``|`` to break the row."""
    if v is None:
        return NONE
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"
    return str(v).replace("|", "/")
