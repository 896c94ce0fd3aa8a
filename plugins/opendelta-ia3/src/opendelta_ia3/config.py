"""IA3's configuration: which targets are feed-forward (input-scaled), and how the vectors start."""

from __future__ import annotations

import os
from collections import abc
from dataclasses import dataclass
from typing import ClassVar

from opendelta.plugin_api import DeltaConfig, file_patterns

_OWN_PATTERN_FIELDS = ("feedforward_modules",)


@dataclass(kw_only=True)
class IA3Config(DeltaConfig):
    """Configuration of :class:`~opendelta_ia3.IA3Model` (PEFT's ``IA3Config`` names).

    Attributes:
        feedforward_modules: which of the modified modules are feed-forward ones, whose *input* is scaled (the
            paper's ``l_ff``, on the feed-forward down projection); every other target's output is scaled. Patterns
            addressed like ``modified_modules`` (real names, or common names with ``common_structure``). ``None``:
            the targets that are the common structure's ``ff.w2`` (the feed-forward second projection), as PEFT
            takes its per-architecture defaults; ``[]``: none.
        init_ia3_weights: start every vector at ones (the identity); ``False`` draws them from ``N(0, 1)``, as
            PEFT does (for tests only).
    """

    delta_type: ClassVar[str] = "ia3"

    feedforward_modules: list[str] | None = None
    init_ia3_weights: bool = True

    def mark_read_from(
        self, path: str | os.PathLike[str], *, overridden: abc.Iterable[str] = (), fields: abc.Iterable[str] = ()
    ) -> None:
        """Core's file-pattern bounds, for ``feedforward_modules`` too (see ``DeltaConfig.mark_read_from``)."""
        chosen = tuple(fields) or (*file_patterns.PATTERN_FIELDS, *_OWN_PATTERN_FIELDS)
        super().mark_read_from(path, overridden=overridden, fields=chosen)

    @property
    def read_from(self) -> dict[str, str]:
        """The pattern fields that came from a file, ``feedforward_modules`` included."""
        own = {
            name: value.source
            for name in _OWN_PATTERN_FIELDS
            if isinstance(value := getattr(self, name, None), file_patterns.FilePatterns)
        }
        return {**super().read_from, **own}
