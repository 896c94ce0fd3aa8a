"""Helpers for tests that race real threads: run them and collect what they raised, make races show quickly.

Tests of thread safety must assert on results, never on timing; these helpers only bound how long a thread may
hang (a deadlock then fails the test instead of hanging the suite) and make the interpreter switch threads often.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator, Sized
from contextlib import contextmanager
from typing import Any

__all__ = ["in_threads", "let_others_run", "switch_back_and_forth", "switching_threads_often"]


def in_threads(*targets: Callable[[], object], timeout: float = 120.0) -> list[BaseException]:
    """Run each callable in its own thread and join them all; return the exceptions they raised.

    Raises:
        AssertionError: a thread was still running after ``timeout`` seconds (a deadlock).
    """
    errors: list[BaseException] = []

    def guarded(target: Callable[[], object]) -> None:
        try:
            target()
        except BaseException as error:  # reported to the test, which fails on it
            errors.append(error)

    threads = [threading.Thread(target=guarded, args=(t,), daemon=True) for t in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    assert not any(t.is_alive() for t in threads), "a thread is stuck (deadlock)"
    return errors


def let_others_run(results: Sized, at_most: float = 0.05) -> None:
    """Wait (at most ``at_most`` seconds) until another thread added to ``results``, so that threads interleave."""
    count, deadline = len(results), time.monotonic() + at_most
    while len(results) == count and time.monotonic() < deadline:
        time.sleep(0.0002)


def switch_back_and_forth(delta_model: Any, times: int, results: Sized, stop: threading.Event) -> None:
    """Detach and re-attach ``delta_model`` ``times`` times, letting the others add results in between; then ``stop``.

    ``stop`` is set however this ends, so that threads looping until it is set end too.
    """
    try:
        for _ in range(times):
            delta_model.detach()
            let_others_run(results)
            delta_model.attach()
            let_others_run(results)
    finally:
        stop.set()


@contextmanager
def switching_threads_often(interval: float = 1e-5) -> Iterator[None]:
    """Let the interpreter switch threads every ``interval`` seconds (not 5 ms), so races show in a short test."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(interval)
    try:
        yield
    finally:
        sys.setswitchinterval(before)
