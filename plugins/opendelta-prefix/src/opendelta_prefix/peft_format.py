"""PEFT's PREFIX_TUNING adapter folders: read into a :class:`PrefixModel` (``read_checkpoint``), and written.

``PeftModel.save_pretrained`` writes ``adapter_config.json`` (``peft_type: "PREFIX_TUNING"``, ``num_virtual_tokens``,
``num_layers``, ``token_dim``, ``num_attention_heads``, ``prefix_projection``...) and ``adapter_model.safetensors``
with ``prompt_embeddings`` ``[P, num_layers * 2 * token_dim]``: layer ``i``'s keys in columns
``2i * token_dim ...``, its values after them (``token_dim`` is the key/value width, the key/value heads under
grouped-query attention). With ``prefix_projection`` the file still holds what the projection computed, so every
folder is plain per-layer prefixes: ``PrefixModel`` with ``reparameterize=False``. PEFT hands the model a cache that
holds the prefix, so the real tokens' positions start at ``P``: ``peft_positions=True`` does that.

PEFT places its prefix otherwise on encoder-decoders (the decoder's self-attention only, with T5's relative
position bias on the prefix keys): their folders are refused, as are architectures whose positions were not checked
against PEFT (RoBERTa's padding-aware positions, Mistral's sliding window, Gemma's hybrid cache...).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from opendelta.plugin_api import (
    CheckpointError,
    CheckpointRecord,
    DeltaModel,
    contained_file,
    read_config_dict,
    read_safetensors,
    refuse_task_heads,
    write_peft_folder,
)
from opendelta_prefix.config import PrefixConfig
from opendelta_prefix.model import PrefixModel

__all__ = ["PEFT_PREFIX_ARCHITECTURES", "read_peft_prefix_tuning", "save_peft_prefix_tuning"]

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_TYPE = "PREFIX_TUNING"
TENSOR_NAME = "prompt_embeddings"
HEAD_PREFIX = "base_model."
PEFT_PREFIX_ARCHITECTURES = frozenset({"bert", "gpt2", "llama", "qwen2", "qwen3"})
"""Where this prefix with ``peft_positions`` computes PEFT's outputs (checked against PEFT 0.21.2)."""
_READ = frozenset({"num_virtual_tokens", "num_layers", "token_dim", "modules_to_save"})
_INERT = frozenset(
    {
        "peft_type",
        "task_type",
        "num_attention_heads",
        "num_transformer_submodules",
        "prefix_projection",  # the file holds what the projection computed
        "encoder_hidden_size",
        "inference_mode",
        "init_weights",
        "base_model_name_or_path",
        "revision",
        "auto_mapping",
        "peft_version",
    }
)
TASK_TYPES = frozenset({"SEQ_CLS", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION"})
SEQ_CLS_HEADS = ("classifier", "score")


def _is_off(value: Any) -> bool:
    return value is None or (isinstance(value, (bool, list, dict, str)) and not value)


def _model_type(backbone: nn.Module) -> Any:
    return getattr(getattr(backbone, "config", None), "model_type", None)


def _check(config: Mapping[str, Any], backbone: nn.Module, source: str) -> int:
    for field, value in config.items():
        if field in _READ or field in _INERT or _is_off(value):
            continue
        raise CheckpointError(
            f"{source}: {field}={repr(value)[:200]} is a PEFT option PrefixModel does not support (it may change what "
            f"the adapter computes); it loads num_virtual_tokens, num_layers, token_dim and modules_to_save."
        )
    task = config.get("task_type")
    if task is not None and task not in TASK_TYPES:
        raise CheckpointError(
            f"{source}: task_type={task!r:.100} is not supported: PrefixModel computes PEFT's prefix on decoder-only "
            f"and encoder models only ({sorted(TASK_TYPES)}); on an encoder-decoder PEFT prefixes the decoder's "
            f"self-attention alone, with the relative position bias on its prefix keys"
        )
    model_type = _model_type(backbone)
    if bool(getattr(getattr(backbone, "config", None), "is_encoder_decoder", False)) or (
        model_type not in PEFT_PREFIX_ARCHITECTURES
    ):
        raise CheckpointError(
            f"{source}: a PEFT PREFIX_TUNING adapter loads on {sorted(PEFT_PREFIX_ARCHITECTURES)} only, where "
            f"PrefixModel (peft_positions=True) was checked to compute PEFT's outputs; on {model_type!r} PEFT's "
            f"prefix takes positions or a cache layout this prefix does not reproduce. Use PEFT for this adapter."
        )
    count = config.get("num_virtual_tokens")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise CheckpointError(f"{source}: num_virtual_tokens must be an int >= 1, got {count!r:.100}")
    return count


def _head_tensors(tensors: Mapping[str, torch.Tensor], saved: Any, backbone: nn.Module, source: str) -> dict:
    """The task head's tensors under the backbone's names; each must lie in a ``modules_to_save`` module."""
    entries = [e for e in saved or () if isinstance(e, str)]
    own = set(backbone.state_dict())
    heads = {}
    for name, tensor in tensors.items():
        if name == TENSOR_NAME:
            continue
        ours = name[len(HEAD_PREFIX) :] if name.startswith(HEAD_PREFIX) else None
        if ours is None or ours not in own or not any(f".{ours}".find(f".{e}.") >= 0 for e in entries):
            raise CheckpointError(
                f"{source}: {name!r:.200} is neither '{TENSOR_NAME}' nor a parameter of a modules_to_save module "
                f"({entries[:4]}) of this {type(backbone).__name__}"
            )
        heads[ours] = tensor
    return heads


def _per_layer(delta_model: DeltaModel, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``prompt_embeddings`` -> each block's ``past_key``/``past_value``, in the blocks' order (PEFT's layers)."""
    table = tensors[TENSOR_NAME]
    layers = list(delta_model.deltas)
    width = table.shape[1] // (2 * len(layers)) if layers else 0
    if table.shape[1] != 2 * len(layers) * width or any(
        (layer.key_features, layer.value_features) != (width, width) for layer in layers
    ):
        sizes = sorted({(layer.key_features, layer.value_features) for layer in layers})
        raise CheckpointError(
            f"'{TENSOR_NAME}' {list(table.shape)} does not split into {len(layers)} layers of keys and values of "
            f"this model's sizes {sizes}"
        )
    out = {n: t for n, t in tensors.items() if n != TENSOR_NAME}
    for index, target in enumerate(delta_model.targets):
        base = f"{target.name}.{delta_model.delta_name}"
        out[f"{base}.past_key"] = table[:, 2 * index * width : (2 * index + 1) * width]
        out[f"{base}.past_value"] = table[:, (2 * index + 1) * width : (2 * index + 2) * width]
    return out


def read_peft_prefix_tuning(
    folder: Path, backbone_model: nn.Module, delta_cls: type[DeltaModel]
) -> CheckpointRecord | None:
    """Read a PEFT PREFIX_TUNING adapter folder into a record for core's apply step; ``None`` for any other folder.

    Raises:
        CheckpointError: a PEFT PREFIX_TUNING folder that cannot be loaded faithfully (an encoder-decoder, an
            architecture not checked, an unsupported option: named), or ``delta_cls`` is another method.
    """
    folder = Path(folder)
    if not (folder / ADAPTER_CONFIG_NAME).is_file():
        return None
    config = read_config_dict(contained_file(folder, ADAPTER_CONFIG_NAME, "the PEFT config"))
    peft_type = config.get("peft_type")
    if not isinstance(peft_type, str) or peft_type.upper() != PEFT_TYPE:
        return None
    if delta_cls.delta_type not in ("", None) and not issubclass(delta_cls, PrefixModel):
        raise CheckpointError(
            f"{folder} is a PEFT {PEFT_TYPE!r} adapter, and {delta_cls.__name__} cannot read it; load it with "
            f"PrefixModel.from_finetuned or AutoDeltaModel.from_finetuned"
        )
    source = str(folder)
    count = _check(config, backbone_model, source)
    if not (folder / ADAPTER_WEIGHTS_NAME).is_file():
        raise CheckpointError(f"{folder} has {ADAPTER_CONFIG_NAME} but no {ADAPTER_WEIGHTS_NAME}")
    weights = contained_file(folder, ADAPTER_WEIGHTS_NAME, "the PEFT weights file")
    tensors = read_safetensors(weights)
    table = tensors.get(TENSOR_NAME)
    if table is None or table.dim() != 2 or table.shape[0] != count:
        shape = None if table is None else list(table.shape)
        raise CheckpointError(f"{source}: '{TENSOR_NAME}' must be [num_virtual_tokens={count}, ...]; it is {shape}")
    heads = _head_tensors(tensors, config.get("modules_to_save"), backbone_model, source)
    return CheckpointRecord(
        source,
        str(weights),
        PrefixModel,
        PrefixConfig(prefix_token_num=count, reparameterize=False, peft_positions=True),
        {TENSOR_NAME: table, **heads},
        translate=_per_layer,
        describe=f"a PEFT PREFIX_TUNING adapter whose config builds a prefix on this {type(backbone_model).__name__}",
    )


def _head_names(backbone: nn.Module, entries: Sequence[str]) -> list[str]:
    names = [n for n, _ in backbone.named_modules() if n]
    return [n for n in names if any(n == e or n.endswith(f".{e}") for e in entries)]


def _task_type(backbone: nn.Module) -> str:
    name = type(backbone).__name__
    for suffix, task in (
        ("ForCausalLM", "CAUSAL_LM"),
        ("LMHeadModel", "CAUSAL_LM"),
        ("ForSequenceClassification", "SEQ_CLS"),
        ("ForTokenClassification", "TOKEN_CLS"),
        ("ForQuestionAnswering", "QUESTION_ANS"),
    ):
        if name.endswith(suffix):
            return task
    return "FEATURE_EXTRACTION"


def save_peft_prefix_tuning(
    delta_model: PrefixModel,
    path: str | os.PathLike[str],
    *,
    task_type: str | None = None,
    modules_to_save: Sequence[str] | None = None,
) -> Path:
    """Export ``delta_model`` as a PEFT PREFIX_TUNING adapter folder (``PeftModel.from_pretrained`` loads it).

    Only a prefix PEFT computes alike: ``peft_positions=True``, on every self-attention block of a checked
    architecture (:data:`PEFT_PREFIX_ARCHITECTURES`); a reparameterised prefix is written as the prefixes it computes.

    Raises:
        TypeError: ``delta_model`` is not a PrefixModel.
        CheckpointError: PEFT would compute something else (named), or a ``modules_to_save`` entry matches nothing.
    """
    if not isinstance(delta_model, PrefixModel):
        raise TypeError(f"save_peft_prefix_tuning exports a PrefixModel, got {type(delta_model).__name__}")
    backbone = delta_model.backbone_model
    config = delta_model.config
    if not config.peft_positions:
        raise CheckpointError(
            "save_peft needs PrefixModel(peft_positions=True): PEFT's real tokens take positions after the prefix, "
            "this prefix's (peft_positions=False) do not, so PEFT would compute other outputs"
        )
    if _model_type(backbone) not in PEFT_PREFIX_ARCHITECTURES or config.modified_modules is not None:
        raise CheckpointError(
            f"save_peft exports a prefix on every self-attention block of {sorted(PEFT_PREFIX_ARCHITECTURES)} only "
            f"(what PEFT computes alike); this one is on {_model_type(backbone)!r} with "
            f"modified_modules={config.modified_modules!r}"
        )
    layers = list(delta_model.deltas)
    with torch.no_grad():
        pairs = [tuple(t.detach() for t in layer.key_value()) for layer in layers]
    width = pairs[0][0].shape[1]
    table = torch.cat([t for pair in pairs for t in pair], dim=1)
    task = task_type or _task_type(backbone)
    if task not in TASK_TYPES:
        raise CheckpointError(f"task_type={task!r} is not one PrefixModel exports ({sorted(TASK_TYPES)})")
    entries = list(SEQ_CLS_HEADS if modules_to_save is None and task == "SEQ_CLS" else modules_to_save or ())
    missing = [e for e in entries if not _head_names(backbone, [e])]
    if modules_to_save is not None and missing:
        raise CheckpointError(f"modules_to_save entries {missing} match no module of {type(backbone).__name__}")
    tensors = {
        f"{HEAD_PREFIX}{head}.{name}": param.detach().to("cpu").contiguous().clone()
        for head in _head_names(backbone, entries)
        for name, param in backbone.get_submodule(head).named_parameters()
    }
    tensors[TENSOR_NAME] = table
    model_config = getattr(backbone, "config", None)
    heads = getattr(model_config, "num_key_value_heads", None) or getattr(model_config, "num_attention_heads", None)
    document = {
        "peft_type": PEFT_TYPE,
        "task_type": task,
        "base_model_name_or_path": getattr(model_config, "_name_or_path", None) or None,
        "revision": None,
        "inference_mode": True,
        "num_virtual_tokens": config.prefix_token_num,
        "token_dim": int(width),
        "num_layers": len(layers),
        "num_attention_heads": heads,
        "num_transformer_submodules": 1,
        "encoder_hidden_size": int(width),
        "prefix_projection": False,
        "modules_to_save": entries or None,
    }
    refuse_task_heads(delta_model, "prefix tuning")
    return write_peft_folder(path, document, tensors)
