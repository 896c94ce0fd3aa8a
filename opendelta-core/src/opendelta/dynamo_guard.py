"""Make ``torch.compile`` check module hooks, applied the moment ``torch._dynamo`` is first imported.

What it sets, process-wide: ``torch._dynamo.config.skip_nnmodule_hook_guards = False``. PyTorch skips those guards by
default for speed; attaching and detaching a delta adds and removes forward hooks, which a compiled model would
otherwise ignore (it would keep running the deltas it was compiled with). With the guards, each attach/detach state
is compiled once and then reused. It affects every compiled module in the process, with or without deltas: a hook
added or removed later recompiles it instead of being silently ignored.

Why at that moment: importing ``torch._dynamo`` costs about a second, and most uses of OpenDelta never compile. So
``import opendelta`` does not import it; :func:`install` puts a one-shot finder on ``sys.meta_path`` that applies the
setting right after ``torch._dynamo`` is imported by anyone (``torch.compile`` imports it on first use), and removes
itself. If ``torch._dynamo`` is already imported, the setting is applied at once.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import threading
from types import ModuleType
from typing import Any

__all__ = ["apply", "install"]

_MODULE = "torch._dynamo"
_lock = threading.Lock()


def apply(dynamo: ModuleType | None = None) -> None:
    """Set the hook guards on (``torch._dynamo`` must be imported, or be given)."""
    module = dynamo if dynamo is not None else sys.modules[_MODULE]
    module.config.skip_nnmodule_hook_guards = False


class _Loader(importlib.abc.Loader):
    """Runs the real loader of ``torch._dynamo``, then applies the setting."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        apply(module)


class _Finder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the loader the other finders give ``torch._dynamo``, once."""

    def find_spec(self, fullname: str, path: Any, target: ModuleType | None = None) -> Any:
        if fullname != _MODULE:
            return None
        _uninstall()
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


_FINDER = _Finder()


def _uninstall() -> None:
    with _lock:
        if _FINDER in sys.meta_path:
            sys.meta_path.remove(_FINDER)


def install() -> None:
    """Apply the setting now if ``torch._dynamo`` is imported, else when it is (idempotent, thread-safe)."""
    with _lock:
        if _MODULE in sys.modules:
            apply()
        elif _FINDER not in sys.meta_path:
            sys.meta_path.insert(0, _FINDER)
