"""PEFT's P_TUNING adapter folders: read into a :class:`PTuningModel` (the ``read_checkpoint`` hook), and written.

``PeftModel.save_pretrained`` writes ``adapter_config.json`` (``peft_type: "P_TUNING"``, ``num_virtual_tokens``,
``token_dim``, ``num_transformer_submodules``, the ``encoder_*`` fields...) and ``adapter_model.safetensors`` with one
tensor, ``prompt_embeddings`` ``[num_virtual_tokens * num_transformer_submodules, token_dim]``: the prompt encoder's
*outputs*, not its weights. PEFT loads it in inference mode, where the prompt is that tensor and there is no
encoder; so does this reader (``inference_mode=True``). A task head PEFT trained with the prompt (``modules_to_save``,
which PEFT sets itself for ``SEQ_CLS``: ``classifier``, ``score``) is saved beside it as ``base_model.<module>...`` and
loads into the backbone's head. Options that would make PEFT compute something else (an unknown field that is set)
are refused by name.
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
from opendelta_p_tuning.config import PTuningConfig
from opendelta_p_tuning.model import PTuningModel

__all__ = ["ADAPTER_CONFIG_NAME", "ADAPTER_WEIGHTS_NAME", "read_peft_p_tuning", "save_peft_p_tuning"]

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_TYPE = "P_TUNING"
TENSOR_NAME = "prompt_embeddings"
_READ = (
    "num_virtual_tokens",
    "num_transformer_submodules",
    "encoder_reparameterization_type",
    "encoder_hidden_size",
    "encoder_num_layers",
    "encoder_dropout",
    "modules_to_save",
)
_INERT = frozenset(
    {
        "peft_type",
        "task_type",
        "token_dim",  # checked against the model's input embeddings with the tensor's shape
        "num_attention_heads",
        "num_layers",
        "inference_mode",
        "base_model_name_or_path",
        "revision",
        "auto_mapping",
        "peft_version",
    }
)
"""Fields that say nothing about what the prompt computes (``token_dim`` is the tensor's width)."""
_HEAD_PREFIX = "base_model."
"""PEFT's prefix of a saved task head's tensors (prompt learning wraps the transformers model directly)."""
TASK_TYPES = frozenset({"SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION"})


def _is_off(value: Any) -> bool:
    return value is None or (isinstance(value, (bool, list, dict, str)) and not value)


def _check_fields(config: Mapping[str, Any], source: str) -> None:
    for field, value in config.items():
        if field in _READ or field in _INERT or _is_off(value):
            continue
        raise CheckpointError(
            f"{source}: {field}={repr(value)[:200]} is a PEFT option PTuningModel does not support (it may change "
            f"what the adapter computes); PTuningModel loads {', '.join(_READ)}. Use PEFT for this adapter."
        )
    task = config.get("task_type")
    if task is not None and task not in TASK_TYPES:
        raise CheckpointError(f"{source}: task_type={task!r:.100} is not one PEFT prompt learning serves")
    count = config.get("num_virtual_tokens")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise CheckpointError(f"{source}: num_virtual_tokens must be an int >= 1, got {count!r:.100}")


def p_tuning_config_from_peft(config: Mapping[str, Any], source: str) -> PTuningConfig:
    """The :class:`PTuningConfig` that gives the prompt the PEFT ``config`` gives (inference mode: no encoder).

    Raises:
        CheckpointError: an unsupported option or a bad value, named.
    """
    _check_fields(config, source)
    kwargs = {name: config[name] for name in _READ if config.get(name) is not None and name != "modules_to_save"}
    try:
        return PTuningConfig(**kwargs, inference_mode=True)
    except (TypeError, ValueError) as exc:  # DeltaConfigError is a ValueError
        raise CheckpointError(f"{source}: {exc}") from exc


def _renamed(delta_model: DeltaModel, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``prompt_embeddings`` -> the built prompt's ``...embedding.weight`` (its name depends on the input stack)."""
    names = [n for n in delta_model.delta_state_dict() if n.endswith(".embedding.weight")]
    if len(names) != 1:  # pragma: no cover - one prompt per model by construction
        raise CheckpointError(f"a PEFT P_TUNING adapter has one prompt; this model built {len(names)}")
    return {names[0]: tensors[TENSOR_NAME], **{n: t for n, t in tensors.items() if n != TENSOR_NAME}}


def _head_tensors(
    tensors: Mapping[str, torch.Tensor], saved: Any, backbone: nn.Module, source: str
) -> dict[str, torch.Tensor]:
    """The task head's tensors under the backbone's names; each must lie in a ``modules_to_save`` module."""
    entries = [e for e in saved or () if isinstance(e, str)]
    own = set(backbone.state_dict())
    heads = {}
    for name, tensor in tensors.items():
        if name == TENSOR_NAME:
            continue
        ours = name[len(_HEAD_PREFIX) :] if name.startswith(_HEAD_PREFIX) else None
        if ours is None or ours not in own or not any(f".{ours}".find(f".{e}.") >= 0 for e in entries):
            raise CheckpointError(
                f"{source}: {name!r:.200} is neither '{TENSOR_NAME}' nor a parameter of a modules_to_save module "
                f"({entries[:4]}) of this {type(backbone).__name__}"
            )
        heads[ours] = tensor
    return heads


def read_peft_p_tuning(folder: Path, backbone_model: nn.Module, delta_cls: type[DeltaModel]) -> CheckpointRecord | None:
    """Read a PEFT P_TUNING adapter folder into a record for core's apply step; ``None`` for any other folder.

    Raises:
        CheckpointError: a PEFT P_TUNING folder that cannot be loaded faithfully, or ``delta_cls`` is another method.
    """
    folder = Path(folder)
    if not (folder / ADAPTER_CONFIG_NAME).is_file():
        return None
    config = read_config_dict(contained_file(folder, ADAPTER_CONFIG_NAME, "the PEFT config"))
    peft_type = config.get("peft_type")
    if not isinstance(peft_type, str) or peft_type.upper() != PEFT_TYPE:
        return None  # another PEFT method: another plugin may read it
    if delta_cls.delta_type not in ("", None) and not issubclass(delta_cls, PTuningModel):
        raise CheckpointError(
            f"{folder} is a PEFT {PEFT_TYPE!r} adapter, and {delta_cls.__name__} cannot read it; load it with "
            f"PTuningModel.from_finetuned or AutoDeltaModel.from_finetuned"
        )
    source = str(folder)
    ours = p_tuning_config_from_peft(config, source)
    if not (folder / ADAPTER_WEIGHTS_NAME).is_file():
        raise CheckpointError(f"{folder} has {ADAPTER_CONFIG_NAME} but no {ADAPTER_WEIGHTS_NAME}")
    weights = contained_file(folder, ADAPTER_WEIGHTS_NAME, "the PEFT weights file")
    tensors = read_safetensors(weights)
    if TENSOR_NAME not in tensors:
        raise CheckpointError(f"{source}: a PEFT P_TUNING adapter holds '{TENSOR_NAME}'; this one does not")
    heads = _head_tensors(tensors, config.get("modules_to_save"), backbone_model, source)
    return CheckpointRecord(
        source,
        str(weights),
        PTuningModel,
        ours,
        {TENSOR_NAME: tensors[TENSOR_NAME], **heads},
        translate=_renamed,
        describe=f"a PEFT P_TUNING adapter whose own config builds p-tuning on this {type(backbone_model).__name__}",
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


SEQ_CLS_HEADS = ("classifier", "score")
"""The ``modules_to_save`` PEFT adds itself for ``SEQ_CLS`` (and then expects in the folder)."""


def _head_names(backbone: nn.Module, entries: Sequence[str]) -> list[str]:
    """The backbone modules ``entries`` designate by PEFT's rule (the name, or a ``.``-suffix of it)."""
    names = [n for n, _ in backbone.named_modules() if n]
    return [n for n in names if any(n == e or n.endswith(f".{e}") for e in entries)]


def save_peft_p_tuning(
    delta_model: PTuningModel,
    path: str | os.PathLike[str],
    *,
    task_type: str | None = None,
    modules_to_save: Sequence[str] | None = None,
) -> Path:
    """Export ``delta_model`` as a PEFT P_TUNING adapter folder (``PeftModel.from_pretrained`` loads it).

    As PEFT itself saves, the folder holds the encoder's outputs (``prompt_embeddings``), not its weights: PEFT
    loads it in inference mode. The model keeps its encoder (save_finetuned saves that).

    Args:
        delta_model: the p-tuning model to export.
        path: the folder to write ``adapter_config.json`` and ``adapter_model.safetensors`` into (created if needed).
        task_type: PEFT's ``task_type`` (``"CAUSAL_LM"``, ``"SEQ_CLS"``...), which decides how PEFT places the
            prompt; ``None`` reads it from the backbone's class (see :func:`default_task_type`).
        modules_to_save: backbone modules to ship whole with the prompt (a task head trained with it); ``None``:
            for ``SEQ_CLS`` PEFT's own ``classifier``/``score`` (PEFT expects them in such a folder), else none.

    Raises:
        TypeError: ``delta_model`` is not a PTuningModel.
        CheckpointError: the prompt is not in front of the backbone's token embeddings (a ``modified_modules`` or a
            model without tokens), which PEFT cannot express; ``task_type`` is not a PEFT prompt-learning task; or a
            ``modules_to_save`` entry matches no module.
    """
    if not isinstance(delta_model, PTuningModel):
        raise TypeError(f"save_peft_p_tuning exports a PTuningModel, got {type(delta_model).__name__}")
    backbone = delta_model.backbone_model
    target = delta_model.targets[0]
    if delta_model.config.modified_modules is not None or not callable(
        getattr(target.module, "get_input_embeddings", None)
    ):
        raise CheckpointError(
            f"save_peft cannot export a prompt placed at {target.name!r}: PEFT puts it in front of the model's token "
            f"embeddings only; save it with save_finetuned()"
        )
    task = task_type or default_task_type(backbone)
    if task not in TASK_TYPES:
        raise CheckpointError(f"task_type={task!r} is not a PEFT prompt-learning task ({sorted(TASK_TYPES)})")
    entries = list(SEQ_CLS_HEADS if modules_to_save is None and task == "SEQ_CLS" else modules_to_save or ())
    heads = _head_names(backbone, entries)
    missing = [e for e in entries if not _head_names(backbone, [e])]
    if modules_to_save is not None and missing:
        raise CheckpointError(f"modules_to_save entries {missing} match no module of {type(backbone).__name__}")
    tensors = {
        f"{_HEAD_PREFIX}{head}.{name}": param.detach().to("cpu").contiguous().clone()
        for head in heads
        for name, param in backbone.get_submodule(head).named_parameters()
    }
    with torch.no_grad():
        table = delta_model.deltas[0].encoded().detach()
    config = delta_model.config
    document = {
        "peft_type": PEFT_TYPE,
        "task_type": task,
        "base_model_name_or_path": getattr(getattr(backbone, "config", None), "_name_or_path", None) or None,
        "revision": None,
        "inference_mode": True,
        "num_virtual_tokens": config.num_virtual_tokens,
        "token_dim": int(table.shape[1]),
        "num_transformer_submodules": delta_model.submodules,
        "num_attention_heads": None,  # PEFT reads both from the model's config
        "num_layers": None,
        "modules_to_save": entries or None,
        "encoder_reparameterization_type": config.encoder_reparameterization_type,
        "encoder_hidden_size": config.encoder_hidden_size,
        "encoder_num_layers": config.encoder_num_layers,
        "encoder_dropout": config.encoder_dropout,
    }
    tensors[TENSOR_NAME] = table
    refuse_task_heads(delta_model, "P-tuning")
    return write_peft_folder(path, document, tensors)
