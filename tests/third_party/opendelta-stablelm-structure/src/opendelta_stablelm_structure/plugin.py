"""The entry point: registers the StableLM mapping through the hook every mapping package uses."""

from __future__ import annotations

from opendelta.plugin_api import RegisterCommonStructure, hookimpl
from opendelta_stablelm_structure import mapping


@hookimpl
def register_common_structures(register: RegisterCommonStructure) -> None:
    """Register ``stablelm.json`` (core validates it against its schema, as it does every mapping)."""
    register(mapping(), source="opendelta_stablelm_structure/stablelm.json")
