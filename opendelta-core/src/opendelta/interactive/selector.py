"""``select_modules``: pick the modules to modify by clicking them in a browser (manual section 1.15.3).

``DeltaModel(backbone, interactive_modify=True)`` (or a port number) calls :func:`modified_modules_from_page`:
the page's selection becomes ``modified_modules`` (real, full module names) with ``common_structure=False``, so
the saved config records exactly the modules that were clicked and reloads without the page.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable
from typing import Any, TextIO

from torch import nn

from opendelta.errors import DeltaConfigError
from opendelta.interactive.server import SelectionServer
from opendelta.interactive.tree import build_tree
from opendelta.targets import backbone_module_names

__all__ = [
    "DEFAULT_TIMEOUT",
    "TIMEOUT_ENV",
    "modified_modules_from_page",
    "resolve_timeout",
    "select_modules",
    "selectable_for",
]

TIMEOUT_ENV = "OPENDELTA_INTERACTIVE_TIMEOUT"
"""Environment variable: seconds to wait for a submission when no ``timeout`` is passed."""
DEFAULT_TIMEOUT = 900.0
"""Seconds to wait when neither ``timeout`` nor :data:`TIMEOUT_ENV` says: long enough to browse a large model."""


def resolve_timeout(timeout: float | None = None) -> float:
    """The timeout to use: ``timeout``, else :data:`TIMEOUT_ENV`, else :data:`DEFAULT_TIMEOUT`.

    Raises:
        DeltaConfigError: the value is not a positive, finite number of seconds (naming where it came from).
    """
    source = "timeout"
    value: Any = timeout
    if timeout is None:
        value, source = os.environ.get(TIMEOUT_ENV), TIMEOUT_ENV
        if value is None or not value.strip():
            return DEFAULT_TIMEOUT
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = math.nan
    if isinstance(value, bool) or not (math.isfinite(seconds) and seconds > 0):
        raise DeltaConfigError(f"{source}={value!r} must be a positive number of seconds, e.g. {DEFAULT_TIMEOUT:g}")
    return seconds


def _port_number(port: int | bool | None) -> int:
    if port is None or port is True:
        return 0
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise DeltaConfigError(
            f"the selection server's port must be True (a free port) or a port number 1-65535, got {port!r}"
        )
    return port


def select_modules(
    model: nn.Module,
    port: int | bool | None = None,
    *,
    host: str = "127.0.0.1",
    timeout: float | None = None,
    method: str | None = None,
    selectable: Callable[[nn.Module], bool] | None = None,
    validate: Callable[[list[str]], None] | None = None,
    stream: TextIO | None = None,
) -> list[str]:
    """Serve ``model``'s module tree on a local page, print its link, and return the names submitted there.

    The page shows the modules that hold parameters, with repeated blocks folded (``0-11``); clicking a name
    selects every module it stands for, ``[*]`` shows a folded block's repeats one by one, and "submit" sends
    the selection. Returned names are full real names (``bert.encoder.layer.3.attention.self.query``), in module
    order: a folded block selected as a whole gives the module in each repeat, not a regex.

    Args:
        model: the backbone.
        port: the port to serve on; ``None``/``True`` picks a free one.
        host: the address to listen on (``127.0.0.1``: this machine only; forward the port to reach it remotely).
        timeout: seconds to wait for a submission (default: :data:`TIMEOUT_ENV`, else :data:`DEFAULT_TIMEOUT`).
        method: the delta method's name, shown on the page.
        selectable: which modules the method can modify; the others are greyed out and refused.
        validate: a last check of the names, whose :class:`~opendelta.errors.OpenDeltaError` is shown on the page.
        stream: where the link and the result are printed (default: ``sys.stdout``).

    Returns:
        The selected module names, for ``modified_modules``.

    Raises:
        InteractiveSelectionTimeout: nothing was submitted in time (the server is shut down).
        InteractiveSelectionCancelled: the page's "cancel" button was pressed.
        InteractiveSelectionError: the port cannot be used.
        DeltaConfigError: a bad port or timeout.
    """
    port_number = _port_number(port)
    seconds = resolve_timeout(timeout)
    out = sys.stdout if stream is None else stream
    tree = build_tree(model, selectable=selectable)
    server = SelectionServer(
        tree, order=backbone_module_names(model), host=host, port=port_number, method=method, validate=validate
    )
    try:
        server.start()
        who = f"{method} should modify" if method else "to modify"
        print(
            f"OpenDelta: select the modules {who} in {type(model).__name__} at\n    {server.url}\n"
            f"  Click names to select them ([+] expands, [*] unfolds a repeated block), then 'submit'.\n"
            f"  On a remote machine, forward the port first (ssh -L {server.port}:localhost:{server.port} HOST).\n"
            f"  Waiting up to {seconds:g} s ({TIMEOUT_ENV} changes it; Ctrl-C stops).",
            file=out,
            flush=True,
        )
        names = server.wait(seconds)
    finally:
        server.close()
    print(f"modified_modules: {names}", file=out, flush=True)
    return names


def modified_modules_from_page(
    delta_class: type[Any], backbone_model: nn.Module, interactive_modify: bool | int, given: Any
) -> dict[str, Any]:
    """The config entries ``interactive_modify`` sets for a delta model about to be built.

    Args:
        delta_class: the :class:`~opendelta.DeltaModel` subclass; its ``layer_types()`` decide what can be
            clicked.
        backbone_model: the backbone.
        interactive_modify: ``True`` for a free port, or the port number.
        given: the ``modified_modules`` the caller also passed (must be ``None``).

    Returns:
        ``{"modified_modules": [names], "common_structure": False}``.

    Raises:
        DeltaConfigError: ``modified_modules`` was passed too, or ``interactive_modify`` is neither a bool nor a port.
    """
    name = delta_class.__name__
    if isinstance(interactive_modify, bool) or not isinstance(interactive_modify, int):
        if interactive_modify is not True:
            raise DeltaConfigError(
                f"{name}(interactive_modify={interactive_modify!r}): pass True (a free port) or a port number"
            )
    if given is not None:
        raise DeltaConfigError(
            f"{name} got modified_modules={given!r} and interactive_modify={interactive_modify!r}: the page's "
            f"selection would replace modified_modules; pass one of them"
        )
    names = select_modules(backbone_model, port=interactive_modify, method=name, selectable=selectable_for(delta_class))
    return {"modified_modules": names, "common_structure": False}


def selectable_for(delta_class: type) -> Callable[[nn.Module], bool] | None:
    """Which rows of the page can be clicked for ``delta_class``: its layer types (``None``: every row).

    ``layer_types()`` resolves a function such as ``linear_types``; a class without it holds a plain tuple.
    """
    layer_types = getattr(delta_class, "layer_types", None)
    types = layer_types() if callable(layer_types) else getattr(delta_class, "supported_layer_types", None)
    if types is None:
        return None
    return lambda module: isinstance(module, types)
