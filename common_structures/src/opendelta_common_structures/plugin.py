"""Registers the shipped mappings through the same hook a third-party mapping package uses.

It deliberately does not import ``opendelta`` (which depends on this distribution): a marker for the same
pluggy project name is all a hook implementation needs.
"""

from __future__ import annotations

from typing import Any

from pluggy import HookimplMarker

from opendelta_common_structures import iter_mappings

hookimpl = HookimplMarker("opendelta")


@hookimpl
def register_common_structures(register: Any) -> None:
    """Register every JSON mapping in this package."""
    for name, document in iter_mappings():
        register(document, source=f"opendelta_common_structures/{name}")
