"""The entry point: registers the LLaMA mapping through the hook every mapping package uses."""

from __future__ import annotations

from opendelta import hookimpl
from opendelta.hookspecs import RegisterCommonStructure
from opendelta_llama_structure import mapping


@hookimpl
def register_common_structures(register: RegisterCommonStructure) -> None:
    """Register ``llama.json`` (core validates it against its schema, as it does every mapping)."""
    register(mapping(), source="opendelta_llama_structure/llama.json")
