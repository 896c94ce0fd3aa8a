"""Common-structure mappings: one naming (``encoder.block.0.attn.q``) for every architecture's modules.

A mapping is a JSON document (see ``schemas/common-structure.schema.json`` and :func:`get_schema`) registered by a
plugin through the ``register_common_structures`` hook. Core validates every document, ours and third parties',
against that schema, then uses it to translate the real module names of a backbone into common names.

The tree is rooted at the *base model* (``model.base_model``: ``BertModel`` inside ``BertForSequenceClassification``),
so one mapping serves every derivative model; task heads outside the base model are mapped under ``heads``,
relative to the model that carries the ``config``. A node may name the transformers releases it exists under
(``"transformers": "<5"``), for a module tree a release restructured; it is left out under the others.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as distribution_version
from typing import Any

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version
from torch import nn

from opendelta.errors import StructureValidationError
from opendelta.fused_split import FusedSplit, check_split_spec, resolve_split

__all__ = [
    "CommonName",
    "CommonStructure",
    "admits_installed_transformers",
    "base_model_of",
    "find_config_model",
    "get_schema",
    "validate_structure",
]

SCHEMA_FILE = "common-structure.schema.json"
WILDCARD = "$"


@cache
def get_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) that every common-structure mapping must satisfy."""
    text = resources.files("opendelta").joinpath("schemas", SCHEMA_FILE).read_text(encoding="utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


@cache
def _validator() -> Any:
    from jsonschema import Draft202012Validator  # on first validation: jsonschema costs ~0.1 s to import

    return Draft202012Validator(get_schema())


def validate_structure(document: Any, source: str | None = None) -> None:
    """Raise :class:`StructureValidationError` listing every schema violation of ``document``.

    Args:
        document: the parsed JSON mapping.
        source: where it came from (file or plugin), for the message.
    """
    errors = sorted(_validator().iter_errors(document), key=lambda e: list(e.absolute_path))
    if errors:
        where = source or (document.get("model_type") if isinstance(document, dict) else None) or "<mapping>"
        lines = [f"  at /{'/'.join(str(p) for p in e.absolute_path)}: {e.message}" for e in errors]
        raise StructureValidationError(
            f"common-structure mapping {where} does not conform to {SCHEMA_FILE}:\n" + "\n".join(lines)
        )


@dataclass(frozen=True)
class CommonName:
    """The common name of a real module; ``part`` is set when one fused module computes several common modules.

    Example: GPT-2's ``h.0.attn.c_attn`` computes q, k and v, so it has three common names
    ``decoder.block.0.attn.q`` (part 0 of 3), ``...attn.k`` (part 1 of 3) and ``...attn.v`` (part 2 of 3).
    """

    name: str
    part: int | None = None
    num_parts: int | None = None
    split: FusedSplit | None = None
    """For a part: where the parts lie in the fused output on this model (sizes, per-head interleaving); see
    :mod:`opendelta.fused_split`. Equal contiguous slices when the mapping says nothing."""


@dataclass(frozen=True)
class _Node:
    name: str | None  # None: the root; "": not part of the common structure; "$": keep the real component
    fused: tuple[str, ...] | None
    children: tuple[tuple[tuple[str, ...], _Node], ...]
    aliases: tuple[str, ...] = ()  # further names of this module itself, relative to the same parent
    split: Any = None  # a fused node's raw `split` (resolved per model's config by fused_split.resolve_split)
    part_aliases: tuple[tuple[str, ...], ...] = ()  # a fused node's further names of each part, in `fused` order
    other_paths: tuple[tuple[str, ...], ...] = ()  # further real paths of this node (another release's names)

    @classmethod
    def parse(cls, raw: dict[str, Any], name: str | None = None, where: str = "tree") -> _Node:
        children = tuple(
            (tuple(key.split(".")), cls.parse(child, child.get("name", ""), f"{where}/children/{key}"))
            for key, child in raw.get("children", {}).items()
            if admits_installed_transformers(child.get("transformers"))
        )
        fused = tuple(raw["fused"]) if "fused" in raw else None
        part_aliases: tuple[tuple[str, ...], ...] = ()
        if fused:
            check_split_spec(raw.get("split"), len(fused), where)
            extra = raw.get("part_aliases", {})
            unknown = sorted(set(extra) - set(fused))
            if unknown:
                raise StructureValidationError(
                    f"{where}: part_aliases names {unknown}, which are not among the fused parts {list(fused)}"
                )
            part_aliases = tuple(tuple(extra.get(part, ())) for part in fused)
        own = name if name is not None else raw.get("name")
        other_paths = tuple(tuple(path.split(".")) for path in raw.get("other_paths", ()))
        aliases = tuple(raw.get("aliases", ()))
        return cls(own, fused, children, aliases, raw.get("split"), part_aliases, other_paths)

    def paths(self, key: tuple[str, ...]) -> tuple[tuple[str, ...], ...]:
        """The real paths this node (under ``key`` in its parent) may have: the key's, then ``other_paths``."""
        return (key, *self.other_paths)

    def part_names(self, prefix: str) -> list[tuple[int, str]]:
        """A fused node's common names under ``prefix``: each part's, then its aliases, with the part's index."""
        assert self.fused is not None
        names = [(i, _join(prefix, part)) for i, part in enumerate(self.fused)]
        return names + [(i, _join(prefix, a)) for i, aliases in enumerate(self.part_aliases) for a in aliases]


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


@cache
def _installed_transformers() -> Version | None:
    """The installed transformers release without its pre-release tag (a 5.0 dev build has 5.0's module tree)."""
    try:
        return Version(Version(distribution_version("transformers")).base_version)
    except (PackageNotFoundError, InvalidVersion):
        return None


def admits_installed_transformers(releases: str | None) -> bool:
    """Whether a node's ``transformers`` specifier (schema: ``transformersReleases``) admits the installed release.

    A node without one exists under every release. Without an installed transformers (a plain ``nn.Module``
    backbone) no node is release-specific, so only those without a specifier apply.
    """
    if releases is None:
        return True
    installed = _installed_transformers()
    return installed is not None and SpecifierSet(releases).contains(installed, prereleases=True)


def _names_under(
    node: _Node, parts: list[str], start: int, prefix: str, parent: str = "", config: Any = None
) -> list[CommonName]:
    """Common names of the module whose path (relative to ``node``'s module) is ``parts[start:]``.

    ``prefix`` is ``node``'s own common name and ``parent`` its parent's, which ``node``'s aliases extend;
    ``config`` is the model's, from which a fused node's split is read.
    """
    if start == len(parts):
        if node.fused:
            n = len(node.fused)
            split = resolve_split(node.split, n, config)
            return [CommonName(name, i, n, split) for i, name in node.part_names(prefix)]
        own = [CommonName(prefix)] if prefix and node.name else []
        return own + [CommonName(_join(parent, alias)) for alias in node.aliases]
    found: list[CommonName] = []
    for key, child in node.children:
        if key == (WILDCARD,):
            consumed = 1
            own = parts[start] if child.name == WILDCARD else child.name or ""
        else:
            path = next((p for p in child.paths(key) if tuple(parts[start : start + len(p)]) == p), None)
            if path is None:
                continue
            consumed, own = len(path), child.name or ""
        found += _names_under(child, parts, start + consumed, _join(prefix, own), prefix, config)
    return found


class CommonStructure:
    """A validated mapping, able to name the modules of any model of its architecture."""

    def __init__(self, document: dict[str, Any], source: str | None = None) -> None:
        validate_structure(document, source)
        self.document = document
        self.source = source
        self.model_type: str = document["model_type"]
        self.architectures: tuple[str, ...] = tuple(document["architectures"])
        where = source or self.model_type
        self._tree = _Node.parse(document["tree"], name=None, where=f"{where}: /tree")
        self._heads = _Node.parse({"children": document.get("heads", {})}, name=None, where=f"{where}: /heads")
        self.attention: dict[str, Any] = dict(document.get("attention", {}))
        """The optional hints for mechanisms that add positions inside attention (see the schema)."""

    def __repr__(self) -> str:
        return f"CommonStructure(model_type={self.model_type!r}, source={self.source!r})"

    def common_names(self, model: nn.Module) -> dict[str, list[CommonName]]:
        """Map the real name of every module of ``model`` that has a common name to its common name(s).

        ``model`` is the backbone as the user holds it: a transformers model of this architecture, a derivative
        with a task head, or any module that wraps one. Real names are relative to ``model``.
        """
        config_prefix, config_model = find_config_model(model) or ("", model)  # a plain module maps from its root
        base = base_model_of(config_model)
        base_prefix = _join(config_prefix, _relative_name(config_model, base))
        mapping: dict[str, list[CommonName]] = {}
        for root, prefix, tree in ((base, base_prefix, self._tree), (config_model, config_prefix, self._heads)):
            for rel, _module in root.named_modules():
                if not rel:
                    continue
                names = _names_under(tree, rel.split("."), 0, "", config=getattr(config_model, "config", None))
                if names:
                    mapping.setdefault(_join(prefix, rel), []).extend(names)
        return mapping

    def unplaced_names(self, model: nn.Module) -> dict[str, str]:
        """Common names of the tree that no module of ``model`` carries, each with the real path that is missing.

        Empty for every architecture the mapping lists; a model of the same ``model_type`` built differently (a
        T5 config with the gated feed-forward has no ``DenseReluDense.wi``) fits the mapping only partly. Block
        indices are written ``N`` (``decoder.block.N.ff.w1``). Heads are not included: task classes have some.
        """
        config_model = (find_config_model(model) or ("", model))[1]
        return _unplaced(self._tree, base_model_of(config_model), "")

    def missing_paths(self, model: nn.Module) -> tuple[list[str], list[str]]:
        """Paths of this mapping that do not exist on ``model``: ``(tree paths, head paths)``.

        Tree paths are relative to the base model, with ``$`` expanded over the real children; a model of a listed
        architecture must have them all. Head paths are relative to the config model; task classes have some.
        """
        config_model = (find_config_model(model) or ("", model))[1]
        base = base_model_of(config_model)
        return _missing(self._tree, base, ""), _missing(self._heads, config_model, "")


def _subtree_names(node: _Node, common: str, parent: str) -> list[str]:
    """Every common name ``node`` (named ``common``, under ``parent``) and its descendants would give."""
    if node.fused:
        return [name for _i, name in node.part_names(common)]
    names = [common] if common and node.name else []
    names += [_join(parent, alias) for alias in node.aliases]
    for _key, child in node.children:
        names += _subtree_names(child, _join(common, child.name if child.name != WILDCARD else "N"), common)
    return names


def _present(module: nn.Module, key: tuple[str, ...], child: _Node) -> tuple[str, nn.Module] | None:
    """The first of ``child``'s real paths (its key's, then its ``other_paths``) on ``module``, with the module."""
    for path in child.paths(key):
        dotted = ".".join(path)
        try:
            return dotted, module.get_submodule(dotted)
        except AttributeError:
            continue
    return None


def _unplaced(node: _Node, module: nn.Module, common: str) -> dict[str, str]:
    """Common names under ``node`` whose real module is missing from ``module``, each with the missing real path."""
    found: dict[str, str] = {}
    for key, child in node.children:
        if key == (WILDCARD,):
            for _name, sub in module.named_children():
                found.update(_unplaced(child, sub, _join(common, "N" if child.name == WILDCARD else child.name or "")))
            continue
        own = _join(common, child.name or "")
        present = _present(module, key, child)
        if present is None:
            for name in _subtree_names(child, own, common):
                found.setdefault(name, ".".join(key))
            continue
        found.update(_unplaced(child, present[1], own))
    return found


def _missing(node: _Node, module: nn.Module, prefix: str) -> list[str]:
    missing = []
    for key, child in node.children:
        if key == (WILDCARD,):
            subs = [(name, sub) for name, sub in module.named_children()]
            if not subs:
                missing.append(_join(prefix, WILDCARD))
            for name, sub in subs:
                missing += _missing(child, sub, _join(prefix, name))
            continue
        present = _present(module, key, child)
        if present is None:
            missing.append(_join(prefix, " or ".join(".".join(p) for p in child.paths(key))))
            continue
        missing += _missing(child, present[1], _join(prefix, present[0]))
    return missing


def _relative_name(root: nn.Module, child: nn.Module) -> str:
    if child is root:
        return ""
    for name, module in root.named_modules():
        if module is child:
            return name
    raise ValueError(f"{type(child).__name__} is not a submodule of {type(root).__name__}")


def find_config_model(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The outermost module (and its name) that carries a transformers ``config`` with a ``model_type``.

    This is ``model`` itself for a transformers model, or the wrapped model inside a user's own ``nn.Module``.
    """
    for name, module in model.named_modules():
        if getattr(getattr(module, "config", None), "model_type", None):
            return name, module
    return None


def base_model_of(config_model: nn.Module) -> nn.Module:
    """The base model a mapping's tree is rooted at: ``config_model.base_model``, with one repair.

    A task head whose ``base_model_prefix`` names no child (transformers 4.57's ``Gemma3ForCausalLM`` inherits
    ``"language_model"`` from the multimodal class while its decoder is ``model``) reports itself as its own base
    model. When a model does so although it has an output head, and exactly one child is a transformers model
    sharing its config object, that child is the base model. Base models (no output head: ``OPTModel``, whose
    ``decoder`` shares its config) and models that really are their own base (T5's, whose stacks hold copies of
    the config) are left alone.
    """
    base = getattr(config_model, "base_model", config_model)
    if base is not config_model or not callable(getattr(config_model, "get_output_embeddings", None)):
        return base
    if config_model.get_output_embeddings() is None:
        return base
    config = getattr(config_model, "config", None)
    same = [m for m in config_model.children() if _is_pretrained(m) and getattr(m, "config", None) is config]
    return same[0] if len(same) == 1 else base


def _is_pretrained(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers model (checked by name, so structures needs no transformers import)."""
    return any(cls.__name__ == "PreTrainedModel" for cls in type(module).__mro__)
