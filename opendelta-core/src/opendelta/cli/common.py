"""What every command of the ``opendelta`` CLI shares: the error it raises and plain-text formatting."""

from __future__ import annotations

from collections.abc import Sequence

from opendelta.errors import OpenDeltaError

__all__ = ["CommandError", "format_table", "human_bytes", "one_line"]


class CommandError(OpenDeltaError):
    """A command cannot do what it was asked; the CLI prints the message on one line and exits with status 1."""


def one_line(message: str) -> str:
    """``message`` on one line: multi-line messages (schema errors, lists) are joined with ``"; "``."""
    return "; ".join(line.strip() for line in str(message).splitlines() if line.strip())


def human_bytes(size: int) -> str:
    """``1536`` -> ``"1.5 KiB"``: sizes as people read them (exact bytes stay in ``--json`` output)."""
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    value, unit = float(size), 0
    while value >= 1024 and unit < len(units) - 1:
        value, unit = value / 1024, unit + 1
    return f"{size} B" if unit == 0 else f"{value:.1f} {units[unit]}"


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]], indent: int = 2) -> str:
    """Left-aligned columns separated by two spaces; the last column is not padded (it may be long)."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = []
    for row in cells:
        padded = [cell.ljust(width) for cell, width in zip(row[:-1], widths[:-1], strict=True)] + [row[-1]]
        lines.append(" " * indent + "  ".join(padded).rstrip())
    return "\n".join(lines)
