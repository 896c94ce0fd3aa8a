"""PEFT's LoRA adapter format: load what PEFT saved into a :class:`LoraModel`, and export a ``LoraModel`` to it.

The format is what ``PeftModel.save_pretrained`` writes (vLLM and TGI serve some of it: see ``serving``): a folder with
``adapter_config.json`` (``peft_type: "LORA"``, ``r``, ``lora_alpha``, ``target_modules``...) and
``adapter_model.safetensors``, whose keys are ``base_model.model.<module>.lora_A.weight`` (``[r, in]``) and
``.lora_B.weight`` (``[out, r]``) for each modified module, and ``base_model.model.<module>.<param>`` for each
parameter of the ``modules_to_save`` (a task head trained with the adapter). The math is the same as
:class:`~opendelta_lora.LoraLayer`'s: ``W x + s * B A dropout(x)`` with ``s = lora_alpha / r`` (``lora_alpha /
sqrt(r)`` with ``use_rslora``), for ``nn.Linear`` and GPT-2's ``Conv1D`` alike (PEFT's ``fan_in_fan_out`` only says
how ``W`` is stored). Reading and writing need only ``json`` and ``safetensors``, not ``peft``.

PEFT features that change the computation and that ``LoraModel`` does not have (per-module ranks, LoRA on
embeddings...) are refused by name rather than loaded into something that computes differently. DoRA
(``use_dora: true``) loads: its magnitude is ``base_model.model.<module>.lora_magnitude_vector`` (``[out]``), read
into (and written from) the layer's ``lora_magnitude_vector``.

An adapter initialised with PiSSA or OLoRA and saved without PEFT's conversion (``save_pretrained(...,
path_initial_model_for_weight_conversion=...)``) holds ``A`` and ``B`` for the *residual* base ``W - s B0 A0``.
PEFT loads such a folder by decomposing the base weight again, so it must be loaded onto the original model; so does
``LoraModel`` (the rebuilt ``B0 A0`` is subtracted, the stored weight left alone). ``"pissa_niter_N"`` (a random
decomposition that cannot be made again) and PEFT's other base-rewriting initialisations (CorDA, LoftQ, LoRA-GA) are
refused by name. A ``LoraModel`` with PiSSA or OLoRA is exported converted, as PEFT's conversion writes it: a plain
LoRA of rank ``2r``, ``A' = [A; A0]`` and ``B' = [B, -B0]``, which applies to the original weights.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save
from torch import nn

from opendelta.plugin_api import (
    TASK_HEAD_NAME,
    AddressingError,
    CheckpointError,
    CheckpointRecord,
    DeltaModel,
    apply_checkpoint,
    backbone_module_names,
    contained_file,
    delta_parameter_names,
    file_patterns,
    head_module_names,
    is_linear,
    legacy_size_limit,
    read_config_dict,
    read_pickled_tensors,
    read_safetensors,
    write_atomically,
)
from opendelta_lora.config import LoraConfig
from opendelta_lora.dora import DoraLayer, host_weight
from opendelta_lora.model import LoraModel
from opendelta_lora.peft_fields import check_peft_fields
from opendelta_lora.serving import warn_if_unservable

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "load_peft_adapter",
    "lora_config_from_peft",
    "peft_target_names",
    "read_peft_checkpoint",
    "save_peft_adapter",
]

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
_PICKLED_WEIGHTS_NAME = "adapter_model.bin"  # what PEFT wrote before safetensors
_PREFIX = "base_model.model."
_SEQ_CLS_HEADS = ("score", "classifier")  # PEFT's SEQ_CLS_HEAD_NAMES

_UNSUPPORTED = frozenset(
    {
        "lora_bias",
        "rank_pattern",
        "alpha_pattern",
        "layer_replication",
        "target_parameters",
        "trainable_token_indices",
        "use_qalora",
        "alora_invocation_tokens",
        "use_bdlora",
        "arrow_config",
        "velora_config",
        "monteclora_config",
        "kasa_config",
        "megatron_config",
    }
)
"""PEFT fields that change what the adapter computes and that LoraModel does not have; refused unless unset."""

_READ = frozenset(
    {
        "peft_type",
        "r",
        "lora_alpha",
        "lora_dropout",
        "use_rslora",
        "target_modules",
        "exclude_modules",
        "layers_to_transform",
        "layers_pattern",
        "modules_to_save",
        "bias",
        "fan_in_fan_out",
        "task_type",
        "init_lora_weights",
        "use_dora",
    }
)
_INERT = frozenset(
    {
        "base_model_name_or_path",
        "revision",
        "inference_mode",
        "auto_mapping",
        "peft_version",
        "loftq_config",
        "eva_config",
        "corda_config",
        "lora_ga_config",
        "runtime_config",
        "ensure_weight_tying",
        "megatron_core",
        "qalora_group_size",
    }
)
"""PEFT fields that only concern initialisation, training or bookkeeping: a trained adapter computes the same."""


def _is_off(value: Any) -> bool:
    """Whether a PEFT option is unset: ``None``, ``False`` or empty (``{}`` is how PEFT writes no rank pattern)."""
    return value is None or (isinstance(value, (bool, list, dict, str)) and not value)


def _adapter_folder(path: str | os.PathLike[str]) -> Path:
    folder = Path(path)
    folder = folder.parent if folder.is_file() else folder
    if not (folder / ADAPTER_CONFIG_NAME).is_file():
        raise CheckpointError(
            f"no {ADAPTER_CONFIG_NAME} in {folder}: not a PEFT adapter folder (for a Hub repo, download it first: "
            f"huggingface_hub.snapshot_download(repo_id))"
        )
    return folder


def _read_config(folder: Path) -> dict[str, Any]:
    """The adapter's config, read as a checkpoint's ``config.json`` is (size-capped JSON object), fields checked.

    A config that is a link out of ``folder`` is refused, as in OpenDelta's own format.
    """
    config = read_config_dict(contained_file(folder, ADAPTER_CONFIG_NAME, "the PEFT config"))
    check_peft_fields(config, str(folder / ADAPTER_CONFIG_NAME))
    return config


def _read_weights(folder: Path, backbone_model: nn.Module) -> tuple[Path, dict[str, torch.Tensor]]:
    """The weights file and its tensors, read as this library reads its own and legacy files (same checks).

    A weights file that is a link out of ``folder`` is refused, as in OpenDelta's own format.
    """
    if (folder / ADAPTER_WEIGHTS_NAME).is_file():
        path = contained_file(folder, ADAPTER_WEIGHTS_NAME, "the PEFT weights file")
        return path, read_safetensors(path)
    if (folder / _PICKLED_WEIGHTS_NAME).is_file():
        path = contained_file(folder, _PICKLED_WEIGHTS_NAME, "the PEFT weights file")
        return path, read_pickled_tensors(path, max_bytes=legacy_size_limit(backbone_model))
    raise CheckpointError(f"{folder} has {ADAPTER_CONFIG_NAME} but no {ADAPTER_WEIGHTS_NAME}")


def _check_supported(config: Mapping[str, Any], source: str) -> None:
    """Refuse, naming the field, what LoraModel cannot compute."""
    if config.get("peft_type") != "LORA":
        raise CheckpointError(
            f"{source} holds a PEFT {config.get('peft_type')!r} adapter (peft_type); only LoRA adapters "
            f"(peft_type 'LORA') load into a LoraModel"
        )
    if config.get("bias", "none") != "none":
        raise CheckpointError(
            f"{source} was trained with bias={config['bias']!r}, which also trains the backbone's own biases; only "
            f"bias='none' adapters load into a LoraModel (the deltas must leave the backbone untouched)"
        )
    for field, value in config.items():
        if field in _READ or field in _INERT or _is_off(value):
            continue
        what = (
            "is a PEFT option that changes what the adapter computes, which LoraModel does not support"
            if field in _UNSUPPORTED
            else "is a PEFT option unknown here (it may change what the adapter computes)"
        )
        raise CheckpointError(
            f"{source}: {field}={value!r} {what}; LoraModel loads plain LoRA (r, lora_alpha, lora_dropout, "
            f"use_rslora, target_modules, exclude_modules, layers_to_transform, modules_to_save). Use PEFT for this "
            f"adapter, or retrain without {field}."
        )


_INERT_INITS = (True, False, "gaussian", "eva", "orthogonal")
"""``init_lora_weights`` values after which a trained adapter computes ``W x + s B A x`` on the untouched base."""
_REBUILT_INITS = ("pissa", "olora")
"""Values whose residual base PEFT rebuilds, deterministically, from the original weights when it loads the folder."""
_CONVERSION = (
    "PEFT can save such an adapter as a plain LoRA, which loads here: save_pretrained(folder, "
    "path_initial_model_for_weight_conversion=<the adapter saved right after initialisation>), as PEFT's PiSSA/OLoRA "
    "documentation shows"
)


def _init_lora_weights(config: Mapping[str, Any], source: str) -> bool | str:
    """Our ``init_lora_weights`` for a PEFT folder's: ``True`` when it does not matter, else PiSSA's or OLoRA's.

    Raises:
        CheckpointError: an initialisation whose residual base cannot be rebuilt (named, with PEFT's conversion).
    """
    value = config.get("init_lora_weights", True)
    if value in _INERT_INITS:  # (an adapter whose base PEFT would not rewrite: only its trained A, B matter)
        return True
    if isinstance(value, str) and value.lower() in _REBUILT_INITS:
        return value.lower()
    if isinstance(value, str) and value.startswith("pissa_niter_"):
        why = (
            "its A and B assume the base weight minus a randomised SVD (torch.svd_lowrank) of it, which cannot be made "
            "again: even PEFT, loading this folder, subtracts a different decomposition"
        )
    elif isinstance(value, str) and value.lower() in ("corda", "lora_ga", "loftq"):
        why = "its A and B assume a base weight that PEFT rewrote from data or quantization, which this folder lacks"
    else:
        why = "an initialisation unknown here; it may assume a rewritten base weight"
    raise CheckpointError(
        f"{source}: init_lora_weights={value!r}: {why}, so loading it would compute something else. {_CONVERSION}."
    )


def _all_linear(model: nn.Module, task_type: str | None) -> set[str]:
    """PEFT's ``target_modules="all-linear"``: every linear layer but the output layer (or classification head)."""
    names = {n for n, m in model.named_modules() if is_linear(m)}
    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    if head is None and task_type == "SEQ_CLS":
        head = next((getattr(model, n) for n in _SEQ_CLS_HEADS if getattr(model, n, None) is not None), None)
    if head is not None:
        names -= {n for n, m in model.named_modules() if m is head}
    return names


def _in_layers(key: str, layers: int | set[int], pattern: str | list[str] | None) -> bool:
    """PEFT's ``layers_to_transform``: the first numbered segment (after ``layers_pattern``) is one of ``layers``.

    ``layers_pattern`` names the layer list (``"layers"``, ``"h"``): it is read as a name, so a ``.`` or ``*`` in
    it from a crafted file is matched literally.
    """
    if not pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        match = None
        for p in [pattern] if isinstance(pattern, str) else pattern:
            match = re.match(rf"(?:^|.*?\.){re.escape(p)}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    if match is None:
        return False
    index = int(match.group("idx"))
    return index == layers if isinstance(layers, int) else index in layers


_PATTERN_KEYS = ("target_modules", "exclude_modules", "layers_pattern", "modules_to_save", "layers_to_transform")
"""The fields of an adapter_config.json that designate modules: untrusted, checked by ``check_limits`` first."""


def _under(key: str, name: str) -> bool:
    r"""Whether ``name`` (literal, whole components) is ``key`` or one of its ancestors or their suffixes.

    PEFT's ``re.match(rf"(^|.*\.){name}($|\..*)", key)`` for ``modules_to_save``, with ``name`` escaped.
    """
    return f".{name}." in f".{key}."


def peft_target_names(config: Mapping[str, Any], model: nn.Module, *, source: str = "the PEFT adapter") -> list[str]:
    """The modules PEFT puts LoRA on for ``config``, by PEFT's own rules, in module order.

    ``target_modules`` is a list of names (a module matches its full name or a ``.``-suffix), a regular expression
    (a full match of the name) or ``"all-linear"``; ``exclude_modules`` likewise; ``layers_to_transform`` (with
    ``layers_pattern``) keeps the layers of the given indices; modules under ``modules_to_save`` are never targets.

    The config comes from a file (``source``): its pattern fields are checked against the limits of
    :mod:`opendelta.file_patterns` first, its regular expressions matched under a time budget, and its names
    (lists, ``layers_pattern``, ``modules_to_save``) matched literally.

    Raises:
        CheckpointError: too many or too long patterns, a regex too slow to match (each named).
    """
    for key in _PATTERN_KEYS:
        file_patterns.check_limits(key, config.get(key), source)
    targets = config.get("target_modules")
    task_type = config.get("task_type")
    if isinstance(targets, str) and targets.lower() == "all-linear":
        targets = _all_linear(model, task_type)
    exclude = config.get("exclude_modules")
    saved = config.get("modules_to_save") or []
    layers = config.get("layers_to_transform")
    use_layers = layers is not None and (layers != [] if isinstance(layers, list) else True)
    layers = set(layers) if isinstance(layers, list) else layers
    target_regex = _file_regex("target_modules", targets, source)
    exclude_regex = _file_regex("exclude_modules", exclude, source)
    found = []
    for key in backbone_module_names(model):
        if exclude_regex is not None and exclude_regex.fullmatch(key):
            continue
        if isinstance(exclude, (list, tuple)) and (key in exclude or any(key.endswith(f".{e}") for e in exclude)):
            continue
        if any(_under(key, m) for m in saved):
            continue
        if target_regex is not None:
            hit = target_regex.fullmatch(key) is not None
        elif key in targets:
            hit = True
        else:
            hit = any(key.endswith(f".{t}") for t in targets)
            hit = hit and (not use_layers or _in_layers(key, layers, config.get("layers_pattern")))
        if hit:
            found.append(key)
    return found


def _file_regex(field: str, value: Any, source: str) -> file_patterns.BoundedRegex | None:
    """PEFT's string form of ``field`` (a regex fully matching a module name), compiled with bounds; else ``None``."""
    if not isinstance(value, str):
        return None
    budget = file_patterns.MatchBudget(field, source)
    try:
        return file_patterns.compile_file_regex(value, value, budget)
    except AddressingError as exc:  # what PEFT itself would fail on, with re.error
        raise CheckpointError(str(exc)) from exc


def lora_config_from_peft(config: Mapping[str, Any], model: nn.Module, source: str = "the PEFT adapter") -> LoraConfig:
    """The :class:`LoraConfig` that computes what the PEFT LoRA ``config`` computes on ``model``.

    Raises:
        CheckpointError: a field of the wrong type or range (named), an unsupported PEFT feature (named), no
            ``target_modules``, targets that match nothing or that are not linear layers.
    """
    check_peft_fields(config, source)  # (load_peft_adapter has checked them already, naming the file)
    _check_supported(config, source)
    if not config.get("target_modules"):
        raise CheckpointError(f"{source} has no target_modules: PEFT records the modules it modified there")
    names = peft_target_names(config, model, source=source)
    if not names:
        listed = config["target_modules"]
        listed = file_patterns.shown(listed) if isinstance(listed, list) else repr(listed)  # a file's: maybe long
        raise CheckpointError(
            f"{source}: target_modules={listed} matches no module of this "
            f"{type(model).__name__}; the adapter was made for another architecture"
        )
    modules = dict(model.named_modules())
    wrong = [f"{n} ({type(modules[n]).__name__})" for n in names if not is_linear(modules[n])]
    if wrong:
        raise CheckpointError(
            f"{source} puts LoRA on {', '.join(wrong[:5])}: LoraModel modifies linear layers (nn.Linear, Conv1D) only"
        )
    init = _init_lora_weights(config, source)
    r, alpha = int(config.get("r", 8)), float(config.get("lora_alpha", 8))
    if config.get("use_rslora"):
        alpha = alpha * math.sqrt(r)  # PEFT scales by alpha / sqrt(r); LoraLayer by alpha / r: the same scale
    return LoraConfig(
        lora_r=r,
        lora_alpha=alpha,
        lora_dropout=float(config.get("lora_dropout") or 0.0),
        init_lora_weights=init,
        use_dora=bool(config.get("use_dora")),
        modified_modules=_as_patterns(config["target_modules"], names, model),
        common_structure=False,
    )


def _as_patterns(listed: Any, names: list[str], model: nn.Module) -> list[str]:
    """PEFT's own list of names when, read as OpenDelta patterns, it designates exactly ``names``; else ``names``.

    The rules agree (a name or a ``.``-suffix), but OpenDelta wants every pattern to match, and PEFT also skips
    ``exclude_modules``, other layers and ``modules_to_save``. A name starting with ``[r]`` (PEFT's, or a module's
    own) would be read by OpenDelta as a regular expression: it becomes ``[r]`` and the escaped name.
    """
    literal = [f"[r]{re.escape(n)}" if n.startswith("[r]") else n for n in names]
    if not isinstance(listed, list) or not all(isinstance(t, str) for t in listed):
        return literal
    if any(t.startswith("[r]") for t in listed):
        return literal
    hits = {t: [n for n in backbone_module_names(model) if n == t or n.endswith(f".{t}")] for t in listed}
    chosen = {n for found in hits.values() for n in found}
    return list(listed) if all(hits.values()) and chosen == set(names) else literal


def read_peft_checkpoint(
    folder: Path, backbone_model: nn.Module, delta_cls: type[DeltaModel] = LoraModel, *, others: bool = False
) -> CheckpointRecord | None:
    """Read a PEFT LoRA adapter folder into a record for core's apply step; ``None`` when it is no PEFT LoRA folder.

    This is the ``read_checkpoint`` hook's implementation (see ``plugin``): ``from_finetuned`` on such a folder comes
    here. The config is translated (features this LoRA does not compute are refused by name), the weights are read
    as OpenDelta's own are, and their names become ``delta_state_dict``'s (``<module>.lora.lora_A``..., and
    ``<module>.task_head.<param>`` for the ``modules_to_save``: see ``_as_task_heads``).

    ``others``: refuse another PEFT method's folder by name (``load_peft_adapter``) instead of returning ``None``
    (the hook: another plugin may read it).

    Raises:
        CheckpointError: a PEFT LoRA folder that cannot be loaded faithfully, or ``delta_cls`` is another method.
    """
    folder = Path(folder)
    if not (folder / ADAPTER_CONFIG_NAME).is_file():
        return None
    raw = read_config_dict(contained_file(folder, ADAPTER_CONFIG_NAME, "the PEFT config"))
    peft_type = raw.get("peft_type")
    if isinstance(peft_type, str) and peft_type.upper() != "LORA" and not others:
        return None  # another PEFT method: another plugin may read it
    if delta_cls.delta_type not in ("", None) and not issubclass(delta_cls, LoraModel):
        raise CheckpointError(
            f"{folder} is a PEFT {peft_type!r} adapter ({ADAPTER_CONFIG_NAME}), and {delta_cls.__name__} cannot read "
            f"it; load it with LoraModel.from_finetuned or AutoDeltaModel.from_finetuned"
        )
    source = str(folder)
    config = _read_config(folder)
    lora_config = lora_config_from_peft(config, backbone_model, source)
    weights_file, tensors = _read_weights(folder, backbone_model)
    if not all(name.startswith(_PREFIX) for name in tensors):
        odd = [n for n in tensors if not n.startswith(_PREFIX)]
        raise CheckpointError(f"{source}: PEFT names every tensor '{_PREFIX}...', but the file holds {odd[:3]}")
    ours = {_our_name(name[len(_PREFIX) :], LoraModel.delta_name): t for name, t in tensors.items()}
    ours = _as_task_heads(config, backbone_model, lora_config, ours)
    _check_magnitudes(ours, lora_config, source)
    return CheckpointRecord(
        source,
        str(weights_file),
        LoraModel,
        lora_config,
        ours,
        translate=_with_initial_update if lora_config.rewrites_base else None,
        describe=f"a PEFT LoRA adapter whose own config builds LoRA on this {type(backbone_model).__name__}",
    )


def _as_task_heads(
    config: Mapping[str, Any], model: nn.Module, lora_config: LoraConfig, tensors: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Load PEFT's ``modules_to_save`` as the delta model's own task heads, as PEFT keeps them beside the originals.

    A head is a module PEFT's rule designates (its name ends with an entry: PEFT's sequence classification adds
    ``classifier`` and ``score``, of which a model has one) whose tensors the file holds; the outermost one where
    two are nested. Its tensors are renamed to the head copy's (``classifier.weight`` ->
    ``classifier.task_head.weight``), and ``lora_config.modules_to_save`` names it exactly.
    """
    entries = [e for e in config.get("modules_to_save") or [] if isinstance(e, str)]
    names = head_module_names(model)
    held = [n for n in names if any(n.endswith(e) for e in entries) and any(t.startswith(f"{n}.") for t in tensors)]
    heads = [n for n in held if not any(n.startswith(f"{h}.") for h in held)]
    if not heads:
        return tensors
    lora_config.modules_to_save = [h if _designates_alone(h, names) else f"[r]{re.escape(h)}" for h in heads]
    renamed = {}
    for name, tensor in tensors.items():
        head = next((h for h in heads if name.startswith(f"{h}.")), None)
        renamed[f"{head}.{TASK_HEAD_NAME}.{name[len(head) + 1 :]}" if head else name] = tensor
    return renamed


def _designates_alone(name: str, names: Sequence[str]) -> bool:
    """Whether ``name`` read as an OpenDelta pattern (end-matched) designates the module ``name`` only."""
    return [n for n in names if n == name or n.endswith(f".{name}")] == [name]


def _check_magnitudes(tensors: Mapping[str, torch.Tensor], config: LoraConfig, source: str) -> None:
    """DoRA's magnitude for every module with ``use_dora``, and none without: else the folder computes otherwise."""
    suffix = f".{LoraModel.delta_name}.lora_magnitude_vector"
    down = f".{LoraModel.delta_name}.lora_A"
    modules = {n[: -len(down)] for n in tensors if n.endswith(down)}
    magnitudes = {n[: -len(suffix)] for n in tensors if n.endswith(suffix)}
    if config.use_dora and modules - magnitudes:
        missing = sorted(modules - magnitudes)
        raise CheckpointError(
            f"{source}: use_dora=True but the weights hold no lora_magnitude_vector for {', '.join(missing[:3])}"
            f"{'...' if len(missing) > 3 else ''}: a DoRA adapter needs one per module (PEFT saves it)"
        )
    if not config.use_dora and magnitudes:
        raise CheckpointError(
            f"{source}: the weights hold DoRA magnitudes (lora_magnitude_vector, {sorted(magnitudes)[0]}...) but "
            f"use_dora is not set: the folder is inconsistent; set use_dora=true in {ADAPTER_CONFIG_NAME} if it is a "
            f"DoRA adapter"
        )


def _with_initial_update(delta_model: DeltaModel, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A PiSSA/OLoRA folder's tensors plus the initial ``A0``, ``B0`` just rebuilt from the base, as PEFT does."""
    initial = {n: t for n, t in delta_model.delta_state_dict().items() if n.endswith((".lora_A0", ".lora_B0"))}
    return {**tensors, **initial}


def load_peft_adapter(path: str | os.PathLike[str], backbone_model: nn.Module) -> LoraModel:
    """Load a LoRA adapter saved by PEFT (``PeftModel.save_pretrained``) into a new :class:`LoraModel`.

    The backbone gets the adapter's LoRA layers with its weights, and its ``modules_to_save`` (a task head) become
    the delta model's own head copies, as PEFT keeps them beside the originals; outputs equal the PEFT model's.
    Everything is checked before the backbone changes; on an error it is left as it was (core's apply step, as for
    every format). The backbone is put in eval mode, as ``from_finetuned``
    does.

    Args:
        path: the adapter folder (or a file in it).
        backbone_model: the model the adapter was trained on.

    Returns:
        The attached delta model (``save_finetuned`` saves it in OpenDelta's format, :func:`save_peft_adapter` in
        PEFT's).

    Raises:
        CheckpointError: not a PEFT LoRA folder, an unsupported feature, or weights that do not fit the backbone.
    """
    record = read_peft_checkpoint(_adapter_folder(path), backbone_model, others=True)
    assert record is not None  # the folder has the config (_adapter_folder), and any type is checked by name
    delta_model = apply_checkpoint(record, backbone_model)
    assert isinstance(delta_model, LoraModel)
    return delta_model


def _our_name(name: str, delta_name: str) -> str:
    """``<module>.lora_A.weight`` -> ``<module>.<delta_name>.lora_A`` (delta_state_dict's name); others unchanged."""
    for part in ("lora_A", "lora_B"):
        if name.endswith(f".{part}.weight"):
            return f"{name[: -len(f'.{part}.weight')]}.{delta_name}.{part}"
    if name.endswith(".lora_magnitude_vector"):  # DoRA's magnitude: PEFT saves it without ".weight"
        return f"{name[: -len('.lora_magnitude_vector')]}.{delta_name}.lora_magnitude_vector"
    return name


def _short_names(targets: list[str], model: nn.Module) -> list[str]:
    """The modules' last name components when, by PEFT's rule, they designate exactly ``targets``; else the names."""
    leaves = sorted({t.rpartition(".")[2] for t in targets})
    chosen = [n for n in backbone_module_names(model) if any(n == leaf or n.endswith(f".{leaf}") for leaf in leaves)]
    return leaves if sorted(chosen) == sorted(targets) else targets


def _resolve_modules(patterns: Sequence[str], model: nn.Module, targets: list[str]) -> list[str]:
    names = backbone_module_names(model)
    resolved = []
    for pattern in patterns:
        hits = [n for n in names if n == pattern or n.endswith(f".{pattern}")]
        if not hits:
            raise CheckpointError(f"modules_to_save entry {pattern!r} matches no module of {type(model).__name__}")
        inside = [t for t in targets for h in hits if t == h or t.startswith(f"{h}.")]
        if inside:
            raise CheckpointError(
                f"modules_to_save entry {pattern!r} contains LoRA targets ({inside[:3]}); PEFT saves whole copies of "
                f"these modules and cannot also put LoRA inside them"
            )
        resolved += [h for h in hits if h not in resolved]
    return resolved


def save_peft_adapter(
    delta_model: LoraModel,
    path: str | os.PathLike[str],
    *,
    modules_to_save: Sequence[str] = (),
    task_type: str | None = None,
) -> Path:
    """Export ``delta_model`` as a PEFT LoRA adapter folder that PEFT loads (and vLLM/TGI, see ``serving``).

    A LoRA on some slices of a fused layer (GPT-2's ``c_attn`` with the default ``attn.q``/``attn.v``) becomes a
    LoRA on the whole layer whose ``B`` rows for the other slices are zero: the same outputs.

    Args:
        delta_model: the LoRA delta model to export.
        path: the folder to write ``adapter_config.json`` and ``adapter_model.safetensors`` into (created if needed).
        modules_to_save: backbone modules to ship whole with the adapter (a task head trained with it, such as
            ``["classifier"]``); patterns like ``modified_modules``' real names. The delta model's own task heads
            (its ``modules_to_save``) are always shipped, from its copies, and need not be listed.
        task_type: PEFT's ``task_type`` to record (``"SEQ_CLS"``, ``"CAUSAL_LM"``...); ``None`` loads as a plain
            ``PeftModel``.

    Returns:
        The folder.

    Raises:
        TypeError: ``delta_model`` is not a LoraModel.
        CheckpointError: a ``modules_to_save`` entry matches nothing or contains a LoRA target; or the delta model
            updates stacked expert weights (PEFT's ``target_parameters`` layout is not written).

    Warns:
        OpenDeltaServingWarning: the folder has ``modules_to_save`` or the backbone is not a decoder-only causal
            LM, so vLLM and TGI will refuse it (PEFT still loads it).
    """
    if not isinstance(delta_model, LoraModel):
        raise TypeError(f"save_peft_adapter exports a LoraModel, got {type(delta_model).__name__}")
    backbone = delta_model.backbone_model
    stacked = [f"{t.name}.{t.parameter}" for t in delta_model.targets if t.parameter is not None]
    if stacked:
        raise CheckpointError(
            f"save_peft does not export LoRA on stacked expert weights ({', '.join(stacked[:2])}"
            f"{'...' if len(stacked) > 2 else ''}): PEFT's target_parameters layout is not written; save it with "
            f"save_finetuned(), or put the LoRA on modules PEFT's target_modules names"
        )
    tensors: dict[str, torch.Tensor] = {}
    targets = []
    for target, insertion in delta_model.placements():
        layer = insertion.delta
        rank = delta_model.config.lora_r  # allocated at max_rank, the rest zero: PEFT gets the rank used
        down, up = layer.lora_A.detach()[:rank], layer.lora_B.detach()[:, :rank]  # (r, in), (rows, r)
        if layer.lora_A0 is not None and layer.lora_B0 is not None:  # PEFT's conversion: [A; A0], [B, -B0]
            down, up = torch.cat([down, layer.lora_A0]), torch.cat([up, -layer.lora_B0], dim=1)
        if layer.out_index is not None:  # some slices of a fused layer: zero rows for the others
            up = up.new_zeros(layer.out_features, up.shape[1]).index_copy(0, layer.out_index, up)
        tensors[f"{_PREFIX}{target.name}.lora_A.weight"] = down
        tensors[f"{_PREFIX}{target.name}.lora_B.weight"] = up
        if isinstance(layer, DoraLayer):
            tensors[f"{_PREFIX}{target.name}.lora_magnitude_vector"] = _full_magnitude(layer)
        targets.append(target.name)
    own = delta_model.task_heads()  # the delta model's own heads: PEFT's modules_to_save, from the copies
    given = [m for m in modules_to_save if not any(n == m or n.endswith(f".{m}") for n in own)]
    heads = _resolve_modules(given, backbone, targets)
    skip = delta_parameter_names(backbone)
    for head in heads:
        for name, param in backbone.get_submodule(head).named_parameters():
            if f"{head}.{name}" not in skip:
                tensors[f"{_PREFIX}{head}.{name}"] = param.detach()
    for head, module in own.items():
        tensors.update({f"{_PREFIX}{head}.{name}": param.detach() for name, param in module.named_parameters()})
    heads = [*own, *heads]
    modules = dict(backbone.named_modules())
    config = delta_model.config
    r, alpha = config.lora_r, config.lora_alpha
    if config.rewrites_base:  # converted to a plain LoRA of rank 2r (as PEFT's conversion): the same scale
        r, alpha = 2 * r, alpha * (math.sqrt(2) if config.use_rslora else 2)
    document = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": getattr(getattr(backbone, "config", None), "_name_or_path", None) or None,
        "revision": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": config.lora_dropout,
        "target_modules": _short_names(targets, backbone),
        "exclude_modules": None,
        "fan_in_fan_out": all(not isinstance(modules[t], nn.Linear) for t in targets),  # GPT-2's Conv1D: [in, out]
        "bias": "none",
        "use_rslora": config.use_rslora,
        "use_dora": config.use_dora,
        "modules_to_save": heads or None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    _write(folder, document, tensors)
    warn_if_unservable(backbone, heads, folder)
    return folder


def _full_magnitude(layer: DoraLayer) -> torch.Tensor:
    """The magnitude over all output features: on a fused layer's other slices, their row norms (a factor of one)."""
    magnitude = layer.lora_magnitude_vector.detach()
    if layer.out_index is None:
        return magnitude
    with torch.no_grad():
        weight = host_weight(layer._host).detach()
        full = torch.linalg.norm(weight, dim=1).to(weight.dtype).to(magnitude.dtype)
    return full.index_copy(0, layer.out_index.to(full.device), magnitude)


def _write(folder: Path, document: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Write both files atomically and flushed to disk (core's ``write_atomically``), the weights first."""
    write_atomically(folder / ADAPTER_WEIGHTS_NAME, save(_contiguous(tensors), metadata={"format": "pt"}))
    write_atomically(folder / ADAPTER_CONFIG_NAME, (json.dumps(document, indent=2) + "\n").encode())


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
