"""From a delta config to the list of backbone modules to modify.

Real names (``modified_modules=["query"]``) are matched against the backbone's module names; common names
(``["attn.q"]``, and every method's defaults) are first translated through the architecture's common-structure
mapping, then matched against the common names. Either way, ``exclude_modules`` applies to real names, modules
inside deltas are never targets, and a list that designates nothing is an error, not a silent no-op. A list written
for several architectures (``["query", "q_proj"]``) works on each: the entries that matched nothing are named in an
:class:`~opendelta.errors.OpenDeltaAddressingWarning`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from opendelta import file_patterns
from opendelta.addressing import Pattern, compile_patterns, find_matches, is_all_linear, is_excluded
from opendelta.all_linear import all_linear_names
from opendelta.errors import ModuleNotFoundInStructureError, OpenDeltaAddressingWarning
from opendelta.fused_split import FusedSplit
from opendelta.markers import iter_delta_modules
from opendelta.shapes import fused_output_index
from opendelta.structure_registry import structure_for_model
from opendelta.structures import CommonStructure

__all__ = ["Target", "backbone_module_names", "resolve_targets"]


@dataclass(frozen=True)
class Target:
    """One module a delta method will modify."""

    name: str
    """Real dotted name relative to the backbone (``bert.encoder.layer.0.attention.self.query``)."""
    module: nn.Module
    common_name: str | None = None
    """Its common name when addressed through a mapping (``encoder.block.0.attn.q``)."""
    parts: tuple[int, ...] | None = None
    """For a fused module (GPT-2 ``c_attn``): which of its ``num_parts`` parts are targeted (see ``split``)."""
    num_parts: int | None = None
    output: Target | None = None
    """For a delta spanning two modules (a parallel adapter from a feed-forward block's first linear layer to its
    second): the module whose output it adds to; ``module`` is then the one whose input feeds it."""
    parameter: str | None = None
    """For a delta on one parameter of ``module`` (a stack of expert weights, ``gate_up_proj``): its name. The delta
    is then placed with :func:`opendelta.parameter_insertion.insert_parameter_delta`."""

    split: FusedSplit | None = None
    """For a fused module's parts: where they lie in its output, read from the mapping and the model's config
    (Phi-3's unequal q/k/v, GPT-NeoX's per-head interleaving); ``None`` means ``num_parts`` equal contiguous slices."""

    def output_index(self, out_features: int, device: torch.device | str | None = None) -> torch.Tensor | None:
        """Indices of the output features this target covers, ``None`` for a whole module.

        What a method that supports fused targets sizes and places its delta with, so it slices every layout the
        mapping describes (see :mod:`opendelta.fused_split`).

        Raises:
            UnsupportedTargetError: the mapping refuses to slice this module on this model, or its output does not
                divide as the mapping says; the message names the module and its common name.
        """
        where = f"{self.name} (common name {self.common_name!r})" if self.common_name else self.name
        return fused_output_index(out_features, self.parts, self.num_parts, device, self.split, where)

    @property
    def host_name(self) -> str:
        """Name of the module the delta is attached to: ``output``'s when spanning, else this target's."""
        return self.output.name if self.output is not None else self.name

    @property
    def parent_and_child_name(self) -> tuple[str, str]:
        """The parent's dotted name and this module's attribute name in it."""
        parent, _, child = self.name.rpartition(".")
        return parent, child


def backbone_module_names(model: nn.Module) -> list[str]:
    """Every named module of ``model`` except the root and anything inside an attached delta."""
    inside = [name for name, _ in iter_delta_modules(model)]
    return [
        name
        for name, _ in model.named_modules()
        if name and not any(name == d or name.startswith(d + ".") for d in inside)
    ]


def _ancestors(common_name: str, enabled: bool) -> list[str]:
    """The strict dotted prefixes of a common name (``a.b.c`` -> ``a``, ``a.b``) when scopes are covered."""
    parts = common_name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))] if enabled else []


def resolve_targets(
    model: nn.Module,
    modified_modules: Sequence[str] | None,
    exclude_modules: Sequence[str] | None,
    default_modified_modules: Sequence[str],
    common_structure: bool | None,
    method: str,
    *,
    cover_scopes: bool = False,
) -> list[Target]:
    """The modules of ``model`` a delta should modify, in module order.

    Args:
        model: the backbone.
        modified_modules: the user's patterns, or ``None`` for the method's defaults (common names).
        exclude_modules: real-name patterns to leave alone.
        default_modified_modules: the method's default common names.
        common_structure: whether ``modified_modules`` are common names.
        method: the method's class name, for messages.
        cover_scopes: let a common name designate everything named under it too, even where no single real module
            carries it (``ff`` covers BART's ``fc1`` and ``fc2``, children of the layer itself). Methods that
            broadcast to submodules (BitFit) want this; methods placed after one module (adapters) do not.

    Raises:
        ModuleNotFoundInStructureError: nothing matched (for user patterns, the ones that alone matched nothing are
            named in an :class:`~opendelta.errors.OpenDeltaAddressingWarning` instead).
        StructureNotFoundError: common names were needed but no mapping covers the model.
    """
    use_defaults = modified_modules is None
    if not use_defaults and is_all_linear(modified_modules):
        return _all_linear_targets(model, exclude_modules, method)
    patterns = compile_patterns(default_modified_modules if use_defaults else modified_modules)
    exclude = compile_patterns(exclude_modules, argument="exclude_modules")
    if not patterns:  # [] designates nothing: falling back to the defaults would modify modules nobody named
        given = "has no default modified_modules" if use_defaults else "got an empty modified_modules list"
        fallback = (
            f"leave modified_modules out (None) for the defaults {list(default_modified_modules)!r}, or "
            if default_modified_modules and not use_defaults
            else ""
        )
        raise ModuleNotFoundInStructureError(
            f"{method} {given}, so no module would be modified; {fallback}name the modules to modify, e.g. "
            f"modified_modules=['query']"
        )
    names = backbone_module_names(model)
    modules = dict(model.named_modules())
    describe = f"{type(model).__name__}"
    if not (use_defaults or common_structure):
        chosen = find_matches(names, patterns, exclude, require_each=False, warn_unmatched=True, describe=describe)
        return [Target(n, modules[n]) for n in chosen]

    structure = structure_for_model(model)
    explained = _warn_unplaced(structure, model, patterns)
    allowed = set(names)
    common = {real: cn for real, cn in structure.common_names(model).items() if real in allowed}
    scopes = {s: None for cns in common.values() for c in cns for s in [*_ancestors(c.name, cover_scopes), c.name]}
    describe = f"{describe} (common structure {structure.model_type!r}, names like 'encoder.block.0.attn.q')"
    matched = set(
        find_matches(
            list(scopes),
            patterns,
            (),
            require_each=False,
            warn_unmatched=not use_defaults,
            describe=describe,
            explained=explained,
        )
    )
    targets = []
    for real, cns in common.items():
        if is_excluded(real, exclude):
            continue
        whole = any(c.part is None and c.name in matched for c in cns) or any(
            a in matched for c in cns for a in _ancestors(c.name, cover_scopes)
        )
        parts = tuple(sorted({c.part for c in cns if c.part is not None and c.name in matched}))  # aliases: once
        if whole or parts:
            hit = next((c for c in cns if c.name in matched), cns[0])
            sliced = {"parts": parts, "num_parts": hit.num_parts, "split": hit.split} if not whole else {}
            targets.append(Target(real, modules[real], hit.name, **sliced))
    if not targets:
        texts, excluded = [p.text for p in patterns], [p.text for p in exclude]
        if any(p.source for p in [*patterns, *exclude]):  # a file's lists may be long: show their start
            listed, unlisted = file_patterns.shown(texts), file_patterns.shown(excluded)
        else:
            listed, unlisted = repr(texts), repr(list(exclude_modules or []))
        raise ModuleNotFoundInStructureError(
            f"{method}: modified_modules={listed} matched modules of {describe}, but "
            f"exclude_modules={unlisted} excluded all of them"
        )
    return targets


def _warn_unplaced(structure: CommonStructure, model: nn.Module, patterns: Sequence[Pattern]) -> set[str]:
    """Say which requested common names the mapping could not place on this model, instead of dropping them.

    A model of a mapped ``model_type`` may be built differently from the classes the mapping was checked on (a T5
    config with the gated feed-forward has no ``DenseReluDense.wi``, which the ``t5`` mapping names ``ff.w1``).

    Returns:
        The texts of the patterns that asked for an unplaced name (warned about here, so not again as unmatched).
    """
    unplaced = structure.unplaced_names(model)
    wanted = {name: path for name, path in unplaced.items() if any(p.matches(name) for p in patterns)}
    if not wanted:
        return set()
    listed = ", ".join(f"{name} ({path})" for name, path in sorted(wanted.items()))
    warnings.warn(
        f"the common-structure mapping {structure.model_type!r} fits {type(model).__name__} only partly: {listed} "
        f"name no module of this model, so nothing is placed there. Name real modules with modified_modules=[...] "
        f"(list them with `opendelta show <model folder>`), or install a mapping for this variant.",
        OpenDeltaAddressingWarning,
        stacklevel=4,
    )
    return {p.text for p in patterns if any(p.matches(name) for name in wanted)}


def _all_linear_targets(model: nn.Module, exclude_modules: Sequence[str] | None, method: str) -> list[Target]:
    """``modified_modules="all-linear"``: the linear layers inside the blocks, less the excluded ones."""
    exclude = compile_patterns(exclude_modules, argument="exclude_modules")
    chosen = all_linear_names(model, backbone_module_names(model), method)
    kept = [name for name in chosen if not is_excluded(name, exclude)]
    if not kept:
        raise ModuleNotFoundInStructureError(
            f"{method}: modified_modules='all-linear' matched {len(chosen)} linear layer(s) of "
            f"{type(model).__name__}, but exclude_modules={list(exclude_modules or [])!r} excluded all of them"
        )
    modules = dict(model.named_modules())
    return [Target(name, modules[name]) for name in kept]
