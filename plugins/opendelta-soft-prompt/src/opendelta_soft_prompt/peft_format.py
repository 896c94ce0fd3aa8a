"""PEFT's PROMPT_TUNING adapter folders: read into a :class:`SoftPromptModel` (``read_checkpoint``), and written.

``PeftModel.save_pretrained`` writes ``adapter_config.json`` (``peft_type: "PROMPT_TUNING"``, ``num_virtual_tokens``,
``token_dim``, ``num_transformer_submodules``, ``prompt_tuning_init``...) and ``adapter_model.safetensors`` with
``prompt_embeddings`` ``[num_virtual_tokens * num_transformer_submodules, token_dim]``. PEFT puts the first
``num_virtual_tokens`` rows in front of the embedded input, extends the attention mask with ones (and, for
``SEQ_CLS``, the token type ids with zeros): what ``SoftPromptModel`` computes with its default ``other_expand_ids``.
The rows after them (a seq2seq LM's second submodule) are never used by PEFT's prompt tuning, and are dropped. A task
head PEFT trained with the prompt (``modules_to_save``: ``classifier``/``score`` for ``SEQ_CLS``) is saved as
``base_model.<module>...`` and loads into the backbone. The initialisation fields say how training started and are
not read; any other option that is set is refused by name.
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
from opendelta_soft_prompt.config import SoftPromptConfig
from opendelta_soft_prompt.model import SoftPromptModel

__all__ = ["ADAPTER_CONFIG_NAME", "ADAPTER_WEIGHTS_NAME", "read_peft_prompt_tuning", "save_peft_prompt_tuning"]

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_TYPE = "PROMPT_TUNING"
TENSOR_NAME = "prompt_embeddings"
HEAD_PREFIX = "base_model."
"""PEFT's prefix of a saved task head's tensors (prompt learning wraps the transformers model directly)."""
_READ = frozenset({"num_virtual_tokens", "num_transformer_submodules", "modules_to_save"})
_INERT = frozenset(
    {
        "peft_type",
        "task_type",
        "token_dim",  # the tensor's width, checked against the model's input embeddings
        "num_attention_heads",
        "num_layers",
        "inference_mode",
        "base_model_name_or_path",
        "revision",
        "auto_mapping",
        "peft_version",
        "prompt_tuning_init",
        "prompt_tuning_init_text",
        "tokenizer_name_or_path",
        "tokenizer_kwargs",
    }
)
"""Fields that say nothing about what the prompt computes (the ``prompt_tuning_init*``: how training started)."""
TASK_TYPES = frozenset({"SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION"})
SEQ_CLS_HEADS = ("classifier", "score")
"""The ``modules_to_save`` PEFT adds itself for ``SEQ_CLS`` (and then expects in the folder)."""
PEFT_EXPAND = {"attention_mask": 1, "token_type_ids": 0}
"""What PEFT extends in front of the prompt: ``SoftPromptModel``'s default ``other_expand_ids``."""


def _is_off(value: Any) -> bool:
    return value is None or (isinstance(value, (bool, list, dict, str)) and not value)


def _check_fields(config: Mapping[str, Any], source: str) -> int:
    """The folder's ``num_virtual_tokens``, once every set field is known and the values are sound."""
    for field, value in config.items():
        if field in _READ or field in _INERT or _is_off(value):
            continue
        raise CheckpointError(
            f"{source}: {field}={repr(value)[:200]} is a PEFT option SoftPromptModel does not support (it may change "
            f"what the adapter computes); it loads num_virtual_tokens and modules_to_save. Use PEFT for this adapter."
        )
    task = config.get("task_type")
    if task is not None and task not in TASK_TYPES:
        raise CheckpointError(f"{source}: task_type={task!r:.100} is not one PEFT prompt learning serves")
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


def _renamed(delta_model: DeltaModel, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``prompt_embeddings`` -> the built prompt's ``...soft_embeds`` (its name depends on the input stack)."""
    (name,) = [n for n in delta_model.delta_state_dict() if n.endswith(".soft_embeds")]
    return {name: tensors[TENSOR_NAME], **{n: t for n, t in tensors.items() if n != TENSOR_NAME}}


def read_peft_prompt_tuning(
    folder: Path, backbone_model: nn.Module, delta_cls: type[DeltaModel]
) -> CheckpointRecord | None:
    """Read a PEFT PROMPT_TUNING adapter folder into a record for core's apply step; ``None`` for any other folder.

    Raises:
        CheckpointError: a PEFT PROMPT_TUNING folder that cannot be loaded faithfully, or ``delta_cls`` is another
            method.
    """
    folder = Path(folder)
    if not (folder / ADAPTER_CONFIG_NAME).is_file():
        return None
    config = read_config_dict(contained_file(folder, ADAPTER_CONFIG_NAME, "the PEFT config"))
    peft_type = config.get("peft_type")
    if not isinstance(peft_type, str) or peft_type.upper() != PEFT_TYPE:
        return None  # another PEFT method: another plugin may read it
    if delta_cls.delta_type not in ("", None) and not issubclass(delta_cls, SoftPromptModel):
        raise CheckpointError(
            f"{folder} is a PEFT {PEFT_TYPE!r} adapter, and {delta_cls.__name__} cannot read it; load it with "
            f"SoftPromptModel.from_finetuned or AutoDeltaModel.from_finetuned"
        )
    source = str(folder)
    count = _check_fields(config, source)
    if not (folder / ADAPTER_WEIGHTS_NAME).is_file():
        raise CheckpointError(f"{folder} has {ADAPTER_CONFIG_NAME} but no {ADAPTER_WEIGHTS_NAME}")
    weights = contained_file(folder, ADAPTER_WEIGHTS_NAME, "the PEFT weights file")
    tensors = read_safetensors(weights)
    prompt = tensors.get(TENSOR_NAME)
    if prompt is None or prompt.dim() != 2 or prompt.shape[0] < count:
        shape = None if prompt is None else list(prompt.shape)
        raise CheckpointError(
            f"{source}: '{TENSOR_NAME}' must be [num_virtual_tokens (* submodules), token_dim] with at least "
            f"num_virtual_tokens={count} rows; the file has {shape}"
        )
    heads = _head_tensors(tensors, config.get("modules_to_save"), backbone_model, source)
    return CheckpointRecord(
        source,
        str(weights),
        SoftPromptModel,
        SoftPromptConfig(soft_token_num=count, token_init=False),
        {TENSOR_NAME: prompt[:count], **heads},  # the rows PEFT puts in front of the input
        translate=_renamed,
        describe=f"a PEFT PROMPT_TUNING adapter whose own config builds a soft prompt on this "
        f"{type(backbone_model).__name__}",
    )


def default_task_type(backbone: nn.Module) -> str:
    """PEFT's task type for a transformers model class, read from its name (a seq2seq LM when encoder-decoder)."""
    name = type(backbone).__name__
    if bool(getattr(getattr(backbone, "config", None), "is_encoder_decoder", False)):
        return "SEQ_2_SEQ_LM"
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


def _head_names(backbone: nn.Module, entries: Sequence[str]) -> list[str]:
    """The backbone modules ``entries`` designate by PEFT's rule (the name, or a ``.``-suffix of it)."""
    names = [n for n, _ in backbone.named_modules() if n]
    return [n for n in names if any(n == e or n.endswith(f".{e}") for e in entries)]


def save_peft_prompt_tuning(
    delta_model: SoftPromptModel,
    path: str | os.PathLike[str],
    *,
    task_type: str | None = None,
    modules_to_save: Sequence[str] | None = None,
) -> Path:
    """Export ``delta_model`` as a PEFT PROMPT_TUNING adapter folder (``PeftModel.from_pretrained`` loads it).

    Args:
        delta_model: the soft prompt model to export.
        path: the folder to write ``adapter_config.json`` and ``adapter_model.safetensors`` into (created if needed).
        task_type: PEFT's ``task_type`` (``"CAUSAL_LM"``, ``"SEQ_CLS"``...), which decides how PEFT places the
            prompt; ``None`` reads it from the backbone's class (see :func:`default_task_type`).
        modules_to_save: backbone modules to ship whole with the prompt (a task head trained with it); ``None``:
            for ``SEQ_CLS`` PEFT's own ``classifier``/``score`` (PEFT expects them in such a folder), else none.

    Raises:
        TypeError: ``delta_model`` is not a SoftPromptModel.
        CheckpointError: PEFT would compute something else: the prompt is not in front of the backbone's token
            embeddings (a ``modified_modules`` or a model without tokens), or ``other_expand_ids`` is not PEFT's;
            ``task_type`` is not a PEFT prompt-learning task; a ``modules_to_save`` entry matches no module.
    """
    if not isinstance(delta_model, SoftPromptModel):
        raise TypeError(f"save_peft_prompt_tuning exports a SoftPromptModel, got {type(delta_model).__name__}")
    backbone = delta_model.backbone_model
    target = delta_model.targets[0]
    if delta_model.config.modified_modules is not None or not callable(
        getattr(target.module, "get_input_embeddings", None)
    ):
        raise CheckpointError(
            f"save_peft cannot export a prompt placed at {target.name!r}: PEFT puts it in front of the model's token "
            f"embeddings only; save it with save_finetuned()"
        )
    if dict(delta_model.config.other_expand_ids) != PEFT_EXPAND:
        raise CheckpointError(
            f"save_peft cannot export other_expand_ids={delta_model.config.other_expand_ids!r}: PEFT extends the "
            f"inputs as {PEFT_EXPAND!r} only; save it with save_finetuned()"
        )
    task = task_type or default_task_type(backbone)
    if task not in TASK_TYPES:
        raise CheckpointError(f"task_type={task!r} is not a PEFT prompt-learning task ({sorted(TASK_TYPES)})")
    entries = list(SEQ_CLS_HEADS if modules_to_save is None and task == "SEQ_CLS" else modules_to_save or ())
    missing = [e for e in entries if not _head_names(backbone, [e])]
    if modules_to_save is not None and missing:
        raise CheckpointError(f"modules_to_save entries {missing} match no module of {type(backbone).__name__}")
    tensors = {
        f"{HEAD_PREFIX}{head}.{name}": param.detach().to("cpu").contiguous().clone()
        for head in _head_names(backbone, entries)
        for name, param in backbone.get_submodule(head).named_parameters()
    }
    prompt = delta_model.deltas[0].prompt().detach()
    tensors[TENSOR_NAME] = prompt.to("cpu").contiguous().clone()
    document = {
        "peft_type": PEFT_TYPE,
        "task_type": task,
        "base_model_name_or_path": getattr(getattr(backbone, "config", None), "_name_or_path", None) or None,
        "revision": None,
        "inference_mode": True,
        "num_virtual_tokens": delta_model.config.soft_token_num,
        "token_dim": int(prompt.shape[1]),
        "num_transformer_submodules": 1,  # PEFT's prompt tuning reads the first P rows only, seq2seq LMs too
        "num_attention_heads": None,  # PEFT reads both from the model's config
        "num_layers": None,
        "modules_to_save": entries or None,
        "prompt_tuning_init": "RANDOM",
        "prompt_tuning_init_text": None,
        "tokenizer_name_or_path": None,
        "tokenizer_kwargs": None,
    }
    refuse_task_heads(delta_model, "prompt tuning")
    return write_peft_folder(path, document, tensors)
