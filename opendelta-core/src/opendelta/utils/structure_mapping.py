"""0.3.2's ``opendelta.utils.structure_mapping``: ``CommonStructureMap``, a model's real names to common names.

It is a view of the common-structure mapping registered for the model's architecture (see
:mod:`opendelta.structures`; the shipped mappings come from ``opendelta-common-structures``), the one every delta
model uses for its default ``modified_modules``. ``transform("bert.encoder.layer.0.attention.self.query")`` is
``"encoder.block.0.attn.q"``.

Deliberate differences from 0.3.2: ``transform`` returns the common name as a string, not 0.3.2's internal triple
``(key, virtual_key, order)`` with ``@``-marked components (``"bert.encoder@.block@.0.attn@.q@"``), and a model
with no mapping raises :class:`~opendelta.errors.StructureNotFoundError`, whose message says how to proceed
(0.3.2 raised a ``KeyError``; catch ``LookupError``, the parent of both).
"""

from __future__ import annotations

from torch import nn

from opendelta.structure_registry import structure_for_model
from opendelta.structures import CommonName
from opendelta.utils.logging import get_logger

__all__ = ["CommonStructureMap"]


def _joined(names: list[CommonName]) -> str:
    """One string for the common names of one module: ``attn.q`` or, for a fused module, ``attn.q,k,v`` as 0.3.2."""
    if len(names) == 1:
        return names[0].name
    parents = {n.name.rpartition(".")[0] for n in names}
    if len(parents) == 1:
        parent = parents.pop()
        leaves = ",".join(n.name.rpartition(".")[2] for n in names)
        return f"{parent}.{leaves}" if parent else leaves
    return ",".join(n.name for n in names)


class CommonStructureMap:
    """The common names of ``backbone_model``'s modules.

    Args:
        backbone_model: a transformers model of a mapped architecture, a derivative with a task head, or a module
            that wraps one.
        strict, warning: the defaults of :meth:`transform`'s arguments of the same names.
        visualize: accepted for 0.3.2's signature, which drew nothing either; ``opendelta show --common <model>``
            draws the common tree.

    Raises:
        StructureNotFoundError: no mapping is registered (nor resolved by a plugin) for the model's architecture.
    """

    def __init__(self, backbone_model: nn.Module, strict: bool = True, warning: bool = False, visualize: bool = True):
        self.structure = structure_for_model(backbone_model)
        self.strict = strict
        self.warning = warning
        self.mapping: dict[str, list[CommonName]] = self.structure.common_names(backbone_model)
        """Real module name -> its common name(s) (several for a fused module such as GPT-2's ``c_attn``)."""

    def __repr__(self) -> str:
        return f"CommonStructureMap({self.structure.model_type!r}, {len(self.mapping)} modules mapped)"

    def transform(self, org_key: str, strict: bool | None = None, warning: bool | None = None) -> str | None:
        """The common name of the module called ``org_key`` in the original model.

        A module outside the common structure (BERT's ``embeddings.position_embeddings``) has none: ``strict``
        returns ``None`` for it, otherwise ``org_key`` itself; ``warning`` logs that it has none. Both default to
        the values given to the constructor.
        """
        strict = self.strict if strict is None else strict
        warning = self.warning if warning is None else warning
        names = self.mapping.get(org_key)
        if names:
            return _joined(names)
        if warning:
            get_logger(__name__).warning(f"{org_key!r} has no common mapping.")
        return None if strict else org_key
