"""Run a call in a forked child under a wall-clock guard: for tests of code that must not hang.

A regular expression backtracking in the stdlib ``re`` holds the interpreter in C: no signal handler runs until it
returns, so an in-process alarm cannot stop it. A forked child can be killed, and it starts in milliseconds because it
inherits the test's imports and registries (a method a fixture registered stays registered). POSIX only.
"""

from __future__ import annotations

import multiprocessing
import queue
import time
from collections.abc import Callable
from typing import Any

__all__ = ["run_bounded"]


def _child(results: Any, function: Callable[..., Any], args: tuple[Any, ...]) -> None:
    start = time.perf_counter()
    try:
        value = function(*args)
        results.put(("ok", repr(value)[:200], time.perf_counter() - start))
    except Exception as exc:  # the caller asserts on the type and message
        results.put((type(exc).__name__, str(exc), time.perf_counter() - start))


def run_bounded(function: Callable[..., Any], *args: Any, guard_s: float = 120) -> tuple[str, str, float]:
    """``function(*args)`` in a forked child: ``(outcome, message, seconds)``.

    ``outcome`` is ``"ok"`` (``message`` is then the value's repr, cut short) or the exception's class name (and
    ``message`` its text); ``seconds`` is the time the call took in the child.

    Raises:
        TimeoutError: the call was still running after ``guard_s`` seconds (the child is killed).
    """
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    child = context.Process(target=_child, args=(results, function, args))
    child.start()
    try:
        return results.get(timeout=guard_s)
    except queue.Empty:
        raise TimeoutError(
            f"{getattr(function, '__name__', function)}{args!r} still running after {guard_s} s"
        ) from None
    finally:
        child.kill()
        child.join()
