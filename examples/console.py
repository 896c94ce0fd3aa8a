"""What the examples print while they run: stage headers with wall times, a progress bar, a loss curve."""

from __future__ import annotations

import time


def stage(title: str) -> float:
    """Print a stage header; returns its start time."""
    print(f"\n=== {title} ===", flush=True)
    return time.perf_counter()


def done(start: float) -> None:
    """Print the wall time since ``start``."""
    print(f"    ({time.perf_counter() - start:.1f} s)", flush=True)


def progress(step: int, total: int, loss: float, width: int = 30) -> None:
    """Redraw a one-line progress bar."""
    filled = int(width * step / total)
    print(f"\r    [{'#' * filled}{'.' * (width - filled)}] step {step}/{total} loss {loss:.3f}", end="", flush=True)


def loss_curve(losses: list[float], width: int = 60, height: int = 8) -> str:
    """An ASCII plot of ``losses`` (averaged into at most ``width`` columns), labelled with its range and steps."""
    if not losses:
        return "    (no steps)"
    per_column = max(1, -(-len(losses) // width))
    columns = [losses[i : i + per_column] for i in range(0, len(losses), per_column)]
    means = [sum(c) / len(c) for c in columns]
    top, bottom = max(means), min(means)
    span = (top - bottom) or 1.0
    levels = [round((m - bottom) / span * (height - 1)) for m in means]
    rows = []
    for row in range(height - 1, -1, -1):
        label = f"{bottom + span * row / (height - 1):7.3f} |" if row in (0, height - 1) else "        |"
        rows.append("    " + label + "".join("*" if level == row else " " for level in levels))
    rows.append("    " + " " * 8 + "+" + "-" * len(levels))
    rows.append("    " + " " * 9 + f"step 1{' ' * max(1, len(levels) - 6 - len(str(len(losses))))}{len(losses)}")
    return "\n".join(rows)
