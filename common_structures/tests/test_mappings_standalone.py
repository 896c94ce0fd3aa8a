"""Standalone checks of the bundled common-structure mappings.

These tests need only jsonschema, torch, transformers and the tiny-model
helpers of ``opendelta.testing`` (loaded by path when ``opendelta`` is not
installed), so the mappings can be verified against every supported
transformers version without installing the core library. They check that
the JSON Schema itself is valid, that every mapping conforms to it, and that
every path a mapping names exists on tiny models of each class it claims to
have been checked on.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
import transformers
from jsonschema import Draft202012Validator
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from transformers import PreTrainedModel

REPO_ROOT = Path(__file__).resolve().parents[2]
SCHEMA_PATH = REPO_ROOT / "opendelta-core/src/opendelta/schemas/common-structure.schema.json"
MAPPINGS_DIR = REPO_ROOT / "common_structures/src/opendelta_common_structures"
INVALID_DIR = REPO_ROOT / "tests/data/invalid_structures"
TINY_MODELS_PATH = REPO_ROOT / "opendelta-core/src/opendelta/testing/tiny_models.py"

WILDCARD = "$"
# The minimum every mapping must provide: what LoRA/adapters target by default.
REQUIRED_SUFFIXES = ("attn.q", "attn.v", "attn.proj", "ff.w1", "ff.w2")


def _load_tiny_models() -> ModuleType:
    """Import ``opendelta.testing.tiny_models``, by path if opendelta is absent."""
    try:
        return importlib.import_module("opendelta.testing.tiny_models")
    except ImportError:
        name = "_opendelta_tiny_models"
        spec = importlib.util.spec_from_file_location(name, TINY_MODELS_PATH)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module


tiny_models = _load_tiny_models()

MAPPING_FILES = sorted(MAPPINGS_DIR.glob("*.json"))
INVALID_FILES = sorted(INVALID_DIR.glob("*.json"))


def _load(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def validator() -> Draft202012Validator:
    return Draft202012Validator(_load(SCHEMA_PATH))


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def _common_names(children: dict[str, Any], prefix: str = "") -> Iterator[str]:
    """Every common name a mapping can produce, with ``$`` for layer indices."""
    for key, node in children.items():
        if "fused" in node:
            for part in node["fused"]:
                yield _join(prefix, part)
                for alias in node.get("part_aliases", {}).get(part, ()):
                    yield _join(prefix, alias)
            continue
        name = node["name"]
        own = _join(prefix, key if name == WILDCARD else name)
        if name:
            yield own
        for alias in node.get("aliases", ()):
            yield _join(prefix, alias)
        yield from _common_names(node.get("children", {}), own)


def _first_present(module: torch.nn.Module, paths: list[str]) -> list[tuple[str, torch.nn.Module]]:
    """``[(path, submodule)]`` for the first of ``paths`` (a key, then its ``other_paths``) on ``module``, or ``[]``."""
    for path in paths:
        try:
            return [(path, module.get_submodule(path))]
        except AttributeError:
            continue
    return []


def _resolve(
    module: torch.nn.Module, children: dict[str, Any], real: str = "", common: str = ""
) -> Iterator[tuple[str, str, str]]:
    """Walk ``children`` over ``module``, expanding ``$`` to every real child.

    Yields ``(real_path, common_name, error)`` for every node; ``error`` is
    empty when the path resolved with ``get_submodule``. A node for other
    transformers releases (its ``transformers`` specifier does not admit the
    installed one) must be absent, so a wrong specifier fails too.
    """
    for key, node in children.items():
        if not _admits_installed_transformers(node.get("transformers")):
            try:
                module.get_submodule(key)
            except AttributeError:
                continue
            yield _join(real, key), common, f"exists, but is mapped for transformers{node['transformers']} only"
            continue
        if key == WILDCARD:
            matches = [(component, sub) for component, sub in module.named_children()]
            if not matches:
                yield _join(real, key), common, f"{WILDCARD} matched no child of {type(module).__name__}"
                continue
        else:
            matches = _first_present(module, [key, *node.get("other_paths", ())])
            if not matches:
                yield (
                    _join(real, key),
                    common,
                    f"{type(module).__name__} has none of {key!r}, {node.get('other_paths')}",
                )
                continue
        for component, sub in matches:
            path = _join(real, component)
            if "fused" in node:
                for i, part in enumerate(node["fused"]):
                    for name in (part, *node.get("part_aliases", {}).get(part, ())):
                        yield path, f"{_join(common, name)}[{i}/{len(node['fused'])}]", ""
                continue
            name = node["name"]
            own = _join(common, component if name == WILDCARD else name)
            yield path, own if name else "", ""
            for alias in node.get("aliases", ()):
                yield path, _join(common, alias), ""
            yield from _resolve(sub, node.get("children", {}), path, own)


def _admits_installed_transformers(releases: str | None) -> bool:
    """Whether a node's ``transformers`` specifier admits the installed release (pre-release tags dropped)."""
    if releases is None:
        return True
    installed = Version(Version(transformers.__version__).base_version)
    return SpecifierSet(releases).contains(installed, prereleases=True)


def _base_model(model: torch.nn.Module) -> torch.nn.Module:
    """``model.base_model``, repaired as core's ``opendelta.structures.base_model_of`` does: a model with an output
    head that calls itself its base (transformers 4.57's Gemma3ForCausalLM names a missing prefix) is rooted at its
    one child model sharing its config."""
    if model.base_model is not model or model.get_output_embeddings() is None:
        return model.base_model
    same = [m for m in model.children() if isinstance(m, PreTrainedModel) and m.config is model.config]
    return same[0] if len(same) == 1 else model


def _architectures() -> list[tuple[Path, str]]:
    return [(path, cls) for path in MAPPING_FILES for cls in _load(path)["architectures"]]


def test_schema_is_valid_draft_2020_12() -> None:
    Draft202012Validator.check_schema(_load(SCHEMA_PATH))


def test_every_architecture_has_a_mapping() -> None:
    model_types = {_load(path)["model_type"] for path in MAPPING_FILES}
    assert model_types == set(tiny_models.SHIPPED_ARCHITECTURES)


@pytest.mark.parametrize("path", MAPPING_FILES, ids=lambda p: p.stem)
def test_mapping_validates(path: Path, validator: Draft202012Validator) -> None:
    errors = [f"/{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(_load(path))]
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("path", MAPPING_FILES, ids=lambda p: p.stem)
def test_mapping_has_required_common_names(path: Path) -> None:
    names = set(_common_names(_load(path)["tree"]["children"]))
    for suffix in REQUIRED_SUFFIXES:
        assert any(name.endswith(f"block.{WILDCARD}.{suffix}") for name in names), f"no *.block.$.{suffix}"


@pytest.mark.parametrize(("path", "cls_name"), _architectures(), ids=lambda x: getattr(x, "stem", x))
def test_tree_resolves_on_base_model(path: Path, cls_name: str) -> None:
    doc = _load(path)
    model = tiny_models.tiny_model(doc["model_type"], cls_name)
    assert model.config.model_type == doc["model_type"]
    resolved = list(_resolve(_base_model(model), doc["tree"]["children"]))
    errors = [f"{real}: {error}" for real, _, error in resolved if error]
    assert not errors, "\n".join(errors)
    # Two real modules under one common name would make the common name ambiguous.
    owners: dict[str, str] = {}
    for real, common, _ in resolved:
        if common:
            assert owners.setdefault(common, real) == real, f"{common!r} names {owners[common]} and {real}"


def _fused_modules(
    module: torch.nn.Module, children: dict[str, Any], real: str = ""
) -> Iterator[tuple[str, dict[str, Any], torch.nn.Module]]:
    """Every fused node of ``children`` with its real path and module on ``module`` (``$`` expanded; nodes of other
    transformers releases skipped, a key's ``other_paths`` tried after it)."""
    for key, node in children.items():
        if not _admits_installed_transformers(node.get("transformers")):
            continue
        subs = (
            module.named_children() if key == WILDCARD else _first_present(module, [key, *node.get("other_paths", ())])
        )
        assert key == WILDCARD or subs, f"{type(module).__name__} has none of {key!r}, {node.get('other_paths')}"
        for component, sub in subs:
            if "fused" in node:
                yield _join(real, component), node, sub
            else:
                yield from _fused_modules(sub, node.get("children", {}), _join(real, component))


def _split_variant(split: Any, config: Any) -> dict[str, Any]:
    """The variant of a fused node's split that ``config`` selects (first whose ``when`` all match)."""
    variants = split if isinstance(split, list) else [split]
    matching = [v for v in variants if all(getattr(config, k, None) == w for k, w in v.get("when", {}).items())]
    assert matching, f"no variant of {split!r} fits {type(config).__name__}"
    return matching[0]


@pytest.mark.parametrize(("path", "cls_name"), _architectures(), ids=lambda x: getattr(x, "stem", x))
def test_fused_splits_fit_the_tiny_model(path: Path, cls_name: str) -> None:
    """A fused node's split names config counts the model has, and its output divides into them."""
    doc = _load(path)
    model = tiny_models.tiny_model(doc["model_type"], cls_name)
    for real, node, module in _fused_modules(_base_model(model), doc["tree"]["children"]):
        variant = _split_variant(node.get("split", {}), model.config)
        if "refuse" in variant:
            continue
        counts = [variant.get("groups", 1), *variant.get("sizes", [1] * len(node["fused"]))]
        values = [c if isinstance(c, int) else getattr(model.config, c, None) for c in counts]
        assert all(isinstance(v, int) and v > 0 for v in values), f"{real}: {counts} on the config gives {values}"
        assert len(values) == len(node["fused"]) + 1, f"{real}: one size per part of {node['fused']}"
        out_features = module.weight.shape[0] if isinstance(module, torch.nn.Linear) else module.weight.shape[1]
        assert out_features % (values[0] * sum(values[1:])) == 0, f"{real}: {out_features} features, split {values}"


@pytest.mark.parametrize("path", [p for p in MAPPING_FILES if "heads" in _load(p)], ids=lambda p: p.stem)
def test_heads_resolve_on_some_architecture(path: Path) -> None:
    """Every head exists on some listed class; heads of one common name are one head renamed between transformers
    lines (GPT-NeoX's ``embed_out`` on 4.57 is ``lm_head`` on 5), so one of them must exist, never two at once."""
    doc = _load(path)
    models = [tiny_models.tiny_model(doc["model_type"], cls) for cls in doc["architectures"]]
    by_name: dict[str, list[str]] = {}
    for head, node in doc["heads"].items():
        by_name.setdefault(node.get("name", head), []).append(head)
    for common, heads in by_name.items():
        found = []
        for head in heads:
            node = doc["heads"][head]
            for model in models:
                try:
                    carrier = model.get_submodule(head)
                except AttributeError:
                    continue
                found.append((head, model))
                errors = [f"{head}.{real}: {e}" for real, _, e in _resolve(carrier, node.get("children", {})) if e]
                assert not errors, "\n".join(errors)
        assert found, f"heads {heads} ({common!r}) exist on none of {doc['architectures']}"
        assert len({h for h, _ in found}) == 1, f"{common!r} names several heads of one model: {sorted(found)}"


def test_invalid_documents_exist() -> None:
    assert len(INVALID_FILES) >= 4


@pytest.mark.parametrize("path", INVALID_FILES, ids=lambda p: p.stem)
def test_invalid_document_fails_once(path: Path, validator: Draft202012Validator) -> None:
    errors = list(validator.iter_errors(_load(path)))
    assert len(errors) == 1, [e.message for e in errors]
