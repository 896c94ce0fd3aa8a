"""A common-structure mapping for StableLM, shipped as a third-party distribution: no change to OpenDelta's core.

Installing it is all it takes: ``LoraModel(stablelm_model)`` then finds ``attn.q``/``attn.v`` (``q_proj``/``v_proj``).
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

__all__ = ["mapping"]


def mapping() -> dict[str, Any]:
    """The StableLM common-structure document this distribution registers."""
    text = resources.files(__name__).joinpath("stablelm.json").read_text(encoding="utf-8")
    document: dict[str, Any] = json.loads(text)
    return document
