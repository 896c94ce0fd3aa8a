"""Core's last-resort ``resolve_common_structure``: a mapping inferred from the module tree of a model nobody mapped.

PEFT needs ``target_modules`` for an architecture it does not know; here ``LoraModel(model)`` works on one. Called
after every installed resolver (``trylast``), for a model whose ``model_type`` no mapping covers, it finds:

* the blocks: the model's ``nn.ModuleList`` of layers of one class (one stack; an encoder-decoder's two stacks by
  their ``encoder``/``decoder`` paths);
* inside the first block, by the names transformers and common code use (``q_proj``/``query``/``wq``, ``o_proj``/
  ``out_proj``/``attention.output.dense``, ``gate_proj``/``up_proj``/``down_proj``, ``fc1``/``fc2``, ``wi``/``wo``,
  ``linear1``/``linear2``...) and checked by shape (``ff.w1`` reads the hidden width, ``ff.w2`` writes it): the
  attention projections ``attn.q/k/v/proj``, the feed-forward ``ff.w1/w2`` (or ``ff.gate/up/down`` when gated), the
  norms, cross-attention as ``crossattn``; every path is then required in every block;
* the input embeddings, the final norm beside the blocks, and the output head (``lm_head.proj``).

What it infers is logged (a WARNING of the ``opendelta.structure_inference`` logger) once per model, with what it
left unmapped (a fused ``qkv`` projection cannot be split safely: GPT-NeoX interleaves heads). Two modules claiming
one role, or several unrelated layer stacks, are ambiguous: the model is refused with a
:class:`~opendelta.errors.StructureNotFoundError` naming them, never guessed.
"""

from __future__ import annotations

import logging
import re
import weakref
from collections.abc import Iterable
from typing import Any

from torch import nn

from opendelta.errors import StructureNotFoundError
from opendelta.hookspecs import hookimpl
from opendelta.shapes import linear_types
from opendelta.structures import base_model_of, find_config_model

__all__ = ["infer_structure", "layer_stacks", "resolve_common_structure"]

logger = logging.getLogger(__name__)

_ROLES: dict[str, frozenset[str]] = {
    "q": frozenset({"q_proj", "query", "q", "wq", "q_lin", "to_q", "query_proj"}),
    "k": frozenset({"k_proj", "key", "k", "wk", "k_lin", "to_k", "key_proj"}),
    "v": frozenset({"v_proj", "value", "v", "wv", "v_lin", "to_v", "value_proj"}),
    "proj": frozenset({"o_proj", "out_proj", "o", "wo", "out_lin", "to_out", "dense", "c_proj", "proj", "out"}),
}
"""Attention roles by the projection's own name (inside an attention module)."""

_FUSED_QKV = frozenset({"qkv_proj", "wqkv", "query_key_value", "c_attn", "qkv", "in_proj", "w_pack"})
_GATED = {
    "gate": ("gate_proj", "wi_0", "w1", "gate"),
    "up": ("up_proj", "wi_1", "w3", "up"),
    "down": ("down_proj", "wo", "w2", "down"),
}
"""A gated feed-forward's roles; ``w1``/``w3``/``w2`` is LLaMA's original naming (gate, up, down)."""
_FF_IN = frozenset({"fc1", "fc_in", "c_fc", "dense_h_to_4h", "wi", "lin1", "linear1", "w1", "up_proj", "dense", "fc"})
_FF_OUT = frozenset({"fc2", "fc_out", "c_proj", "dense_4h_to_h", "wo", "lin2", "linear2", "w2", "down_proj", "dense"})
_ATTN_WORDS = ("attn", "attention")
_CROSS_WORDS = ("cross", "encdec", "encoder_attn")
_FF_WORDS = ("mlp", "ffn", "feed_forward", "feedforward", "ff", "intermediate", "densereludense", "output")
_QK_NORMS = frozenset({"q_norm", "k_norm", "q_layernorm", "k_layernorm", "query_layernorm", "key_layernorm"})

_inferred: weakref.WeakKeyDictionary[nn.Module, dict[str, Any]] = weakref.WeakKeyDictionary()


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or "norm" in type(module).__name__.lower()


def _context(path: str) -> str:
    """``"cross"``, ``"attn"``, ``"ff"`` or ``""``: what the ancestors of a block-relative path say it belongs to."""
    parents = [p.lower() for p in path.split(".")[:-1]]
    if any(w in p for p in parents for w in _CROSS_WORDS):
        return "cross"
    if any(w in p for p in parents for w in _ATTN_WORDS):
        return "attn"
    if any(p == w or p.startswith(w) for p in parents for w in _FF_WORDS):
        return "ff"
    return ""


def _common_parent(paths: Iterable[str]) -> str:
    split = [p.split(".")[:-1] for p in paths]
    common = []
    for parts in zip(*split, strict=False):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    return ".".join(common)


class _Block:
    """The roles found in one block, by block-relative path."""

    def __init__(self, block: nn.Module, where: str) -> None:
        self.where = where
        self.roles: dict[str, list[str]] = {}
        self.skipped: list[str] = []
        types = linear_types()
        linears = [(p, m) for p, m in block.named_modules() if p and isinstance(m, types) and "expert" not in p]
        leaves = {p.rsplit(".", 1)[-1].lower() for p, _ in linears if _context(p) != "attn"}
        gated = leaves & {"gate_proj", "wi_0", "gate"} or {"w1", "w2", "w3"} <= leaves
        for path, module in linears:
            self._classify(path, module, gated=bool(gated))
        self._classify_norms(block)

    def _add(self, role: str, path: str) -> None:
        self.roles.setdefault(role, []).append(path)

    def _classify(self, path: str, module: nn.Module, *, gated: bool) -> None:
        leaf, context = path.rsplit(".", 1)[-1].lower(), _context(path)
        if leaf in _FUSED_QKV:
            self.skipped.append(f"{path} (a fused q/k/v projection, not split)")
            return
        if context in ("attn", "cross"):
            prefix = "crossattn" if context == "cross" else "attn"
            role = next((r for r, names in _ROLES.items() if leaf in names), None)
            parent = path.rsplit(".", 2)[-2].lower() if "." in path else ""
            if role is not None and not (leaf == "dense" and parent == "self"):  # BERT's dense is in attention.output
                self._add(f"{prefix}.{role}", path)
            return
        if gated:
            role = next((r for r, names in _GATED.items() if leaf in names), None)
            if role is not None:
                self._add(f"ff.{role}", path)
            return
        parent = path.rsplit(".", 2)[-2].lower() if "." in path else ""
        if leaf in _FF_IN and not (leaf == "dense" and parent == "output"):
            self._add("ff.w1", path)
        elif leaf in _FF_OUT:
            self._add("ff.w2", path)
        elif leaf in _ROLES["q"] | _ROLES["k"] | _ROLES["v"]:  # q/k/v straight in the block (a plain transformer)
            self._add(f"attn.{next(r for r, names in _ROLES.items() if leaf in names)}", path)

    def _classify_norms(self, block: nn.Module) -> None:
        for path, module in block.named_modules():
            if not path or not _is_norm(module) or path.rsplit(".", 1)[-1].lower() in _QK_NORMS:
                continue
            leaf, context = path.rsplit(".", 1)[-1].lower(), _context(path)
            if any(w in leaf for w in _CROSS_WORDS):
                context = "cross"
            if context in ("attn", "cross"):
                self._add(f"{'crossattn' if context == 'cross' else 'attn'}.layer_norm", path)
            elif context == "ff" or any(
                w in leaf for w in ("post_attention", "pre_feedforward", "ffn", "mlp", "ln_2", "norm2", "final")
            ):
                self._add("ff.layer_norm", path)
            elif any(w in leaf for w in ("input", "attn", "attention", "ln_1", "norm1")):
                self._add("attn.layer_norm", path)

    def checked(self, hidden: int | None, modules: dict[str, nn.Module]) -> dict[str, str]:
        """One path per role: ambiguous projections refuse the model, ambiguous norms and bad shapes are dropped."""
        chosen: dict[str, str] = {}
        for role, paths in self.roles.items():
            if len(paths) > 1 and role.endswith("layer_norm"):
                self.skipped += [f"{p} (one of {len(paths)} candidates for {role})" for p in paths]
                continue
            if len(paths) > 1:
                raise StructureNotFoundError(
                    f"cannot infer a common structure: in {self.where}, {', '.join(paths)} all look like {role}; pass "
                    f"modified_modules=[...] with real module names"
                )
            chosen[role] = paths[0]
        if hidden is not None:
            for role, path in list(chosen.items()):
                module = modules[path]
                features = (getattr(module, "in_features", None), getattr(module, "out_features", None))
                reads = role in ("ff.w1", "ff.gate", "ff.up", "attn.q", "attn.k", "attn.v")
                writes = role in ("ff.w2", "ff.down", "attn.proj")
                if (reads and features[0] not in (None, hidden)) or (writes and features[1] not in (None, hidden)):
                    self.skipped.append(f"{path} ({role} by its name, but {features[0]} -> {features[1]} features)")
                    del chosen[role]
        return chosen


def layer_stacks(base: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """The outermost ``nn.ModuleList``s whose entries share one class: the layer stacks of any transformer.

    Also what ``modified_modules="all-linear"`` takes as the blocks of a model no mapping names.
    """
    found: list[tuple[str, nn.ModuleList]] = []
    for path, module in base.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0 or len({type(m) for m in module}) != 1:
            continue
        if any(path.startswith(f"{outer}.") for outer, _ in found):
            continue
        found.append((path, module))
    return found


def _side(path: str, config: Any, encoder_decoder: bool) -> str:
    if encoder_decoder:
        return "decoder" if "decoder" in path.lower() else "encoder"
    if getattr(config, "is_decoder", False):
        return "decoder"
    try:
        from transformers.models.auto.modeling_auto import (
            MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
            MODEL_FOR_MASKED_LM_MAPPING_NAMES,
        )
    except ImportError:  # pragma: no cover - transformers is a dependency
        return "encoder"
    model_type = getattr(config, "model_type", None)
    causal = model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
    return "decoder" if causal or "decoder" in path.lower() else "encoder"


def _relative(root: nn.Module, target: nn.Module | None) -> str | None:
    if target is None:
        return None
    return next((name for name, module in root.named_modules() if module is target and name), None)


def _block_children(chosen: dict[str, str]) -> dict[str, Any]:
    """The block's tree: an ``attn``/``crossattn``/``ff`` node at the projections' common parent when there is one."""
    children: dict[str, Any] = {}
    groups: dict[str, dict[str, str]] = {}
    for role, path in chosen.items():
        groups.setdefault(role.split(".", 1)[0], {})[role.split(".", 1)[1]] = path
    for group, roles in groups.items():
        projections = {r: p for r, p in roles.items() if r != "layer_norm"}
        parent = _common_parent(projections.values()) if len(projections) > 1 else ""
        inside = {r: p for r, p in roles.items() if parent and p.startswith(f"{parent}.")}
        if parent and inside:
            node: dict[str, Any] = {}
            for role, path in inside.items():
                node[path[len(parent) + 1 :]] = _leaf(role)
            children[parent] = {"name": group, "children": node}
        for role, path in roles.items():
            if role not in inside:
                children[path] = {"name": f"{group}.{role}"} if role not in ("up", "down") else _leaf(role, group)
    return children


def _leaf(role: str, group: str = "") -> dict[str, Any]:
    """A node named ``role``; a gated feed-forward's ``up``/``down`` are also ``w1``/``w2``."""
    name = f"{group}.{role}" if group else role
    alias = {"up": "w1", "down": "w2"}.get(role)
    node: dict[str, Any] = {"name": name}
    if alias:
        node["aliases"] = [f"{group}.{alias}" if group else alias]
    return node


def infer_structure(model: nn.Module, model_type: str | None = None) -> dict[str, Any]:
    """The common-structure document inferred for ``model`` (see the module docstring).

    Raises:
        StructureNotFoundError: no layer stack, several unrelated ones, nothing recognisable in the blocks, or two
            modules that claim one role; the message names them.
    """
    located = find_config_model(model)
    config_model = located[1] if located else model
    base = base_model_of(config_model) if located else model
    config = getattr(config_model, "config", None)
    what = type(config_model).__name__
    stacks = layer_stacks(base)
    encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
    stacks = [(p, m) for p, m in stacks if p]  # a model that is itself the list has no path to map it by
    if not stacks:
        raise StructureNotFoundError(f"cannot infer a common structure for {what}: it has no nn.ModuleList of layers")
    if len(stacks) > 1 and not (encoder_decoder and len(stacks) == 2):
        listed = ", ".join(f"{p or '<root>'} ({len(m)} x {type(m[0]).__name__})" for p, m in stacks)
        raise StructureNotFoundError(
            f"cannot infer a common structure for {what}: several layer stacks ({listed}); pass modified_modules=[...]"
        )
    hidden = getattr(config, "hidden_size", None) or getattr(config, "d_model", None) or getattr(config, "n_embd", None)
    tree: dict[str, Any] = {}
    report: list[str] = []
    skipped: list[str] = []
    for path, stack in stacks:
        side = _side(path, config, encoder_decoder)
        block = _Block(stack[0], f"{path}.0" if path else "0")
        modules = dict(stack[0].named_modules())
        chosen = block.checked(hidden, modules)
        missing = {role: p for role, p in chosen.items() for other in stack[1:] if not _has(other, p)}
        skipped += block.skipped + [f"{path}.N.{p} (absent from some blocks)" for p in missing.values()]
        chosen = {role: p for role, p in chosen.items() if role not in missing}
        if not chosen:
            raise StructureNotFoundError(
                f"cannot infer a common structure for {what}: no attention or feed-forward projection recognised in "
                f"{path}.0 ({type(stack[0]).__name__}); pass modified_modules=[...] with real module names"
            )
        tree[path] = {"name": f"{side}.block", "children": {"$": {"name": "$", "children": _block_children(chosen)}}}
        report.append(
            f"{side}.block = {path} ({len(stack)} x {type(stack[0]).__name__}): "
            + ", ".join(f"{r}={p}" for r, p in chosen.items())
        )
        final = [n for n, m in _parent(base, path).named_children() if _is_norm(m) and "emb" not in n.lower()]
        if len(final) == 1:
            parent_path = path.rpartition(".")[0]
            tree[f"{parent_path}.{final[0]}" if parent_path else final[0]] = {"name": f"{side}.layer_norm"}
    embeddings = _relative(base, _call(config_model, "get_input_embeddings"))
    if embeddings and not any(embeddings == p or embeddings.startswith(f"{p}.") for p in tree):
        tree[embeddings] = {"name": "embeddings"}
    document: dict[str, Any] = {
        "schema_version": 1,
        "model_type": _model_type(model_type, config_model),
        "architectures": [what],
        "description": f"Inferred by opendelta.structure_inference from {what}'s module tree.",
        "tree": {"children": tree},
    }
    head = _relative(config_model, _call(config_model, "get_output_embeddings"))
    if head:
        document["heads"] = {head: {"name": "lm_head.proj"}}
    unmapped = f"; not mapped: {'; '.join(skipped)}" if skipped else ""
    logger.warning(f"inferred a common structure for {what} (no mapping covers it): {' | '.join(report)}{unmapped}")
    return document


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


def _parent(base: nn.Module, path: str) -> nn.Module:
    parent = path.rpartition(".")[0]
    return base.get_submodule(parent) if parent else base


def _call(module: nn.Module, method: str) -> nn.Module | None:
    function = getattr(module, method, None)
    try:
        result = function() if callable(function) else None
    except (NotImplementedError, AttributeError):
        return None
    return result if isinstance(result, nn.Module) else None


def _model_type(model_type: str | None, model: nn.Module) -> str:
    name = model_type or f"inferred-{type(model).__name__}"
    return re.sub(r"[^a-z0-9_-]+", "-", name.lower())


@hookimpl(trylast=True)
def resolve_common_structure(model: nn.Module, model_type: str | None) -> dict[str, Any] | None:
    """Infer a mapping once per model (logged then), after every installed resolver had its turn."""
    if model not in _inferred:
        _inferred[model] = infer_structure(model, model_type)
    return _inferred[model]
