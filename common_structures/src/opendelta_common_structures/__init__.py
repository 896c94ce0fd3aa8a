"""The common-structure mappings shipped with OpenDelta, one JSON document per architecture."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

__all__ = ["iter_mappings"]


def iter_mappings() -> list[tuple[str, dict[str, Any]]]:
    """Every shipped mapping as ``(file name, parsed document)``, sorted by file name."""
    files = [f for f in resources.files(__name__).iterdir() if f.name.endswith(".json")]
    return [(f.name, json.loads(f.read_text(encoding="utf-8"))) for f in sorted(files, key=lambda f: f.name)]
