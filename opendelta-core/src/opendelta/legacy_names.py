"""OpenDelta 0.3.x's way of writing module names (``attn@.q@`` for a common name), turned into ours.

Foundation layer: a 0.3.2-style ``DeltaBase`` (model layer) reads its ``default_modified_modules`` through this, and
so does the reader of 0.3.x checkpoints (persistence), without the one importing the other.
"""

from __future__ import annotations

from typing import Any

from opendelta.errors import CheckpointError

__all__ = ["strip_legacy_names"]


def strip_legacy_names(patterns: list[str] | None, common_structure: Any, field: str) -> tuple[list[str] | None, bool]:
    """Turn the original's module patterns into ours: ``(patterns, whether they are common names)``.

    With ``common_structure`` the original matched common names written ``attn@.q@``; they become ``attn.q``. A
    pattern without ``@`` then matched only modules outside the mapping, by real name: a list of only those is a
    real-name list here; a list mixing both cannot be expressed and is refused.
    """
    if not patterns or not common_structure:
        return patterns, bool(common_structure and not patterns)
    marked = [p for p in patterns if isinstance(p, str) and "@" in p]
    if not marked:
        return patterns, False
    if len(marked) != len(patterns):
        plain = [p for p in patterns if p not in marked]
        raise CheckpointError(
            f"the OpenDelta 0.3.x config's {field}={patterns!r} mixes common names ({marked!r}) with real module names "
            f"({plain!r}), which one list cannot express here; pass {field}=[...] (real names, or common names "
            f"with common_structure=True) to from_finetuned"
        )
    return [p.replace("@", "") for p in patterns], True
