"""Interactive module selection: click the modules to modify on a local web page (manual section 1.15.3).

``LoraModel(model, interactive_modify=True)`` or :func:`select_modules` serves the page; see
:mod:`opendelta.interactive.tree` for how repeated blocks fold and what names a selection gives.
"""

from __future__ import annotations

from opendelta.interactive.errors import (
    InteractiveSelectionCancelled,
    InteractiveSelectionError,
    InteractiveSelectionTimeout,
)
from opendelta.interactive.selector import (
    DEFAULT_TIMEOUT,
    TIMEOUT_ENV,
    modified_modules_from_page,
    resolve_timeout,
    select_modules,
)
from opendelta.interactive.server import SelectionServer
from opendelta.interactive.tree import ModuleNode, build_tree

__all__ = [
    "DEFAULT_TIMEOUT",
    "TIMEOUT_ENV",
    "InteractiveSelectionCancelled",
    "InteractiveSelectionError",
    "InteractiveSelectionTimeout",
    "ModuleNode",
    "SelectionServer",
    "build_tree",
    "modified_modules_from_page",
    "resolve_timeout",
    "select_modules",
]
