"""Tables: in rich for a terminal, in Markdown for RESULTS.md (or where rich is missing)."""

from __future__ import annotations

from collections.abc import Collection, Sequence

__all__ = ["markdown_table", "print_table"]

Row = Sequence[str]


def markdown_table(headers: Row, rows: Sequence[Row], *, right: Collection[int] = ()) -> str:
    """A Markdown table; the columns in ``right`` (their indices) aligned right."""
    rule = ("---:" if i in right else "---" for i in range(len(headers)))
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(rule) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def print_table(
    title: str,
    headers: Row,
    rows: Sequence[Row],
    *,
    right: Collection[int],
    use_markdown: bool = False,
    section_by: int | None = None,
    width: int = 220,
) -> None:
    """Print a table in rich, or in Markdown when asked or without rich. ``section_by``: a
    column whose value starts a new section of the rich table when it changes."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        use_markdown = True
    if use_markdown:
        print(markdown_table(headers, rows, right=right))
        return
    table = Table(title=title)
    for i, header in enumerate(headers):
        table.add_column(header, justify="right" if i in right else "left")
    for i, row in enumerate(rows):
        if section_by is not None and i and row[section_by] != rows[i - 1][section_by]:
            table.add_section()
        table.add_row(*row)
    Console(width=width).print(table)
