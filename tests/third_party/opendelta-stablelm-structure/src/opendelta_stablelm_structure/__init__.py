"""A common-structure mapping for LLaMA, shipped as a third-party distribution: no change to OpenDelta's core.

Installing it is all it takes: ``LoraModel(llama_model)`` then finds ``attn.q``/``attn.v`` (``q_proj``/``v_proj``).
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

__all__ = ["mapping"]


def mapping() -> dict[str, Any]:
    """The LLaMA common-structure document this distribution registers."""
    document: dict[str, Any] = json.loads(resources.files(__name__).joinpath("llama.json").read_text(encoding="utf-8"))
    return document
