"""0.3.2's ``opendelta.delta_models``: every installed method's classes, and one module per 0.3.2 method.

``from opendelta.delta_models import LoraModel`` and ``from opendelta.delta_models.lora import LoraConfig`` both
resolve, on first access, to the classes the installed plugin registered (the same objects as
``opendelta.LoraModel``). A method whose plugin is missing raises
:class:`~opendelta.errors.DeltaMethodNotInstalledError` naming the distribution to install.
"""

from __future__ import annotations

from typing import Any

from opendelta.method_classes import method_class


def __getattr__(name: str) -> Any:
    """Resolve ``XxxModel`` / ``XxxConfig`` through the registry of installed plugins."""
    return method_class(name, __name__)
