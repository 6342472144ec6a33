"""Table cells that a value cannot break: the one escaper for every table the package writes (markdown in
reports, model cards and Dagster metadata; aligned text in the CLI).

A cell is one line: any line break (``\\n``, ``\\r``, and the other separators Python's
``str.splitlines`` knows) becomes a space, so a hostile file name cannot start a new row. In markdown a
``|`` is escaped as ``\\|`` (GitHub-flavoured tables honour that escape even inside code spans), so it
cannot open a new column.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

# Every character str.splitlines() breaks on: what a terminal or a markdown renderer may take as a new line.
_LINE_BREAKS = str.maketrans(dict.fromkeys("\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029", " "))


def one_line(value: object) -> str:
    """``str(value)`` with every line break replaced by a space."""
    return str(value).translate(_LINE_BREAKS)


def md_cell(value: object) -> str:
    """``value`` as the text of one markdown table cell (one line, ``|`` escaped)."""
    return one_line(value).replace("|", "\\|")


def md_table(header: Sequence[object], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub-flavoured markdown table; every header and cell goes through :func:`md_cell`."""
    lines = ["| " + " | ".join(md_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
