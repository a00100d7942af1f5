"""Markdown tables: the one renderer behind every table the package and its benchmarks write."""

from __future__ import annotations

import math

_ALIGN = {"l": ":--", "r": "--:", "c": ":-:"}


def markdown_table(header: list[str], rows, align: str | None = None) -> str:
    """A GitHub markdown table of ``rows`` (each a list of cells, written with ``str``) under ``header``.

    Args:
        header: the column names.
        rows: the rows, each with one cell per column.
        align: one of ``l``, ``r``, ``c`` per column; ``None`` leaves the columns to the renderer (left).

    Raises:
        ValueError: ``align`` does not name one alignment per column.
    """
    if align is not None and (len(align) != len(header) or set(align) - set(_ALIGN)):
        raise ValueError(f"align needs one of l, r, c per column ({len(header)}), got {align!r}")
    marks = ["---"] * len(header) if align is None else [_ALIGN[a] for a in align]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(f" {mark} " for mark in marks) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def number_cell(value: float | None, digits: int = 3) -> str:
    """A table cell for a measured number: ``-`` where none was measured (``None`` or NaN)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"
