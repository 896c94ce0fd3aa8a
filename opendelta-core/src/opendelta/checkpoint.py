"""Saving a delta model to a checkpoint and rebuilding it from one, with every check done before any change.

What a checkpoint holds: the delta's tensors under stable names (``DeltaModel.delta_state_dict``), plus every
trainable backbone parameter that is not a delta (a fine-tuned task head), under its backbone name; and
``config.json`` with the hyper-parameters, the backbone's class, checkpoint name and hashes, the backbone tensors the
weights file holds, and the versions. What a load checks of the backbone is in ``opendelta.backbone_check``.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from opendelta.backbone_check import (
    backbone_matches,
    backbone_record,
    check_backbone,
    check_declared_tensors,
    check_not_loaded,
    mark_loaded,
)
from opendelta.compat import CORE_DISTRIBUTION, check_requirements, installed_version, method_for, version_record
from opendelta.config import CONFIG_NAME, DeltaConfig
from opendelta.errors import CheckpointError, DeltaStateError, UnknownArgumentError
from opendelta.insertion import delta_parameter_names
from opendelta.legacy import (
    LEGACY_WEIGHTS_NAME,
    is_legacy_checkpoint,
    legacy_config,
    legacy_size_limit,
    legacy_state_dict,
    read_legacy_weights,
)
from opendelta.saving import (
    checkpoint_lock,
    contained_file,
    load_weights,
    read_config_dict,
    resolve_checkpoint,
    weights_name,
    write_checkpoint,
)
from opendelta.tensor_checks import checked_tensors, plain_tensors

if TYPE_CHECKING:
    from opendelta.base import DeltaModel
    from opendelta.save_options import CardExtras

__all__ = ["config_document", "load_delta", "save_delta", "versions"]


def versions() -> dict[str, str]:
    """The library versions a checkpoint records."""
    out = {"torch_version": torch.__version__}
    for key, dist in (("opendelta_version", CORE_DISTRIBUTION), ("transformers_version", "transformers")):
        out[key] = installed_version(dist) or "unknown"
    return out


def config_document(config: DeltaConfig, record: dict[str, Any] | None = None) -> dict[str, Any]:
    """What ``config.json`` holds: the hyper-parameters, the library versions, and what reading it requires.

    ``record`` is the :func:`~opendelta.backbone_check.backbone_record` of the save; its hash goes into ``config``.
    """
    if record is not None:
        config.backbone_hash = record["backbone_hash"]
    return {**config.to_dict(), **(record or {}), **versions(), **version_record(config)}


def _trainable_backbone_tensors(backbone: nn.Module) -> dict[str, torch.Tensor]:
    deltas = delta_parameter_names(backbone)
    return {n: p for n, p in backbone.named_parameters() if p.requires_grad and n not in deltas}


def _warn_if_most_of_the_backbone(backbone: nn.Module, trainable: dict[str, torch.Tensor]) -> None:
    saved = sum(t.numel() for t in trainable.values())
    total = sum(p.numel() for p in backbone.parameters())
    if total and saved > total / 2:
        warnings.warn(
            f"saving {saved:,} trainable backbone parameters ({saved / total:.0%} of the model) with the delta, "
            f"because they require grad; call delta_model.freeze_module(exclude=['deltas', ...]) first to save only "
            f"the delta (and what you list, such as a task head)",
            stacklevel=3,
        )


def _refuse_merged_backbone_tensors(delta_model: DeltaModel, tensors: dict[str, torch.Tensor]) -> None:
    """Refuse to save backbone parameters that hold a merged delta: loading them would apply the delta twice.

    Merged, a trainable parameter of a modified module (LoRA's ``weight`` left unfrozen, BitFit's ``bias``) holds
    ``W + delta``; saved beside the delta, it would be loaded as the backbone's value and the delta added again on
    top, and its hash would not be the backbone's. The names are those merging changed (see ``premerge_samples``).

    Raises:
        DeltaStateError: naming the parameters and the two fixes; nothing is written then.
    """
    folded = sorted(set(delta_model.premerge_samples()) & set(tensors))
    if delta_model.merged and folded:
        shown = ", ".join(folded[:5]) + (f" and {len(folded) - 5} more" if len(folded) > 5 else "")
        raise DeltaStateError(
            f"{type(delta_model).__name__} is merged into the weights, and the save would record {shown} (backbone "
            f"parameters that require grad) with the delta folded in: loading that checkpoint would apply the delta "
            f"twice. Call delta_model.unmerge() before saving (and merge() again after), or freeze those parameters "
            f"(delta_model.freeze_module(exclude=['deltas', ...]) without them). Nothing was saved."
        )


def save_delta(
    delta_model: DeltaModel,
    path: str | os.PathLike[str],
    state_dict: dict[str, torch.Tensor] | None = None,
    *,
    push_to_hub: bool = False,
    repo_id: str | None = None,
    card: CardExtras | None = None,
    **options: Any,
) -> Path:
    """Write ``delta_model``'s checkpoint and model card to ``path`` (see ``DeltaModel.save_finetuned``).

    ``card`` adds OpenDelta 0.3.2's tags and results to the model card; ``options`` are the Hub upload's
    (``private``, ``token``, ``commit_message``), any other is refused before anything is written.
    """
    from opendelta.hub import check_repo_id, hub_upload_options, model_card, push_folder, write_model_card

    upload = hub_upload_options(options)
    if options:
        raise UnknownArgumentError(
            f"save_delta() got unexpected keyword argument(s) {sorted(options)!r}; accepted: private, token, "
            f"commit_message. Nothing was saved"
        )
    if push_to_hub:
        if not repo_id:
            raise ValueError("push_to_hub=True needs repo_id='user/name'; nothing was saved")
        check_repo_id(repo_id)
    backbone = delta_model.backbone_model
    trainable = None
    if state_dict is None:
        trainable = _trainable_backbone_tensors(backbone)
        state_dict = {**trainable, **delta_model.delta_state_dict()}
    _refuse_merged_backbone_tensors(delta_model, state_dict)
    if trainable is not None:
        _warn_if_most_of_the_backbone(backbone, trainable)
    record = backbone_record(backbone, state_dict, samples=delta_model.premerge_samples())
    document = config_document(delta_model.config, record)
    folder = Path(path)
    with checkpoint_lock(folder):  # the weights, the config and the card come from one save, never two
        write_checkpoint(folder, document, state_dict)
        text = model_card(delta_model, state_dict, repo_id=repo_id)
        if not write_model_card(folder, card.apply(text) if card else text) and card:
            card.warn_not_written(folder)
    if push_to_hub:
        push_folder(folder, repo_id, **upload)
    return folder


def _check_backbone_tensors(backbone: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    params = dict(backbone.named_parameters())
    wrong = [
        f"{n}: checkpoint {tuple(t.shape)} vs backbone {tuple(params[n].shape)}"
        for n, t in tensors.items()
        if t.shape != params[n].shape
    ]
    if wrong:
        raise CheckpointError(f"{source} does not fit this backbone; shape mismatch for {'; '.join(wrong[:5])}")


def load_delta(
    cls: type[DeltaModel],
    path: str | os.PathLike[str],
    backbone: nn.Module,
    *,
    delta_config: DeltaConfig | None,
    state_dict: dict[str, torch.Tensor] | None,
    check_hash: bool,
    hub_kwargs: dict[str, Any],
    **overrides: Any,
) -> DeltaModel:
    """Rebuild and load a delta (see ``DeltaModel.from_finetuned``); ``cls`` may be ``DeltaModel`` itself."""
    from opendelta.registry import list_methods, registered_name

    hub_kwargs = {k: v for k, v in hub_kwargs.items() if v}
    dummy_inputs = overrides.pop("dummy_inputs", None)  # a constructor option for the pseudo pass, not a field
    local, peft_config = Path(path), "adapter_config.json"
    if (local / peft_config).is_file() and not (local / CONFIG_NAME).is_file():  # a PEFT adapter folder
        peft_type = str(read_config_dict(contained_file(local, peft_config, "the PEFT config")).get("peft_type"))
        spec = next((s for s in list_methods() if s.name == peft_type.lower()), None)
        reader_cls = cls if cls.delta_type not in ("", None) else (spec.model_cls if spec else None)
        reader = getattr(reader_cls, "from_peft", None)  # the method that reads PEFT's format of itself, if any
        if reader is None or spec is None or getattr(reader_cls, "delta_type", None) != spec.name:
            who = f"{reader_cls.__name__} cannot read it" if reader_cls else "no installed delta method reads that type"
            raise CheckpointError(
                f"{local} is a PEFT {peft_type!r} adapter ({peft_config}), and {who}; a PEFT LoRA adapter loads with "
                f"opendelta_lora.load_peft_adapter(path, model)"
            )
        if delta_config is not None or state_dict is not None or overrides:
            raise CheckpointError(f"{local} is a PEFT adapter: its config and weights are its own; pass no options")
        loaded: DeltaModel = reader(local, backbone)
        return loaded
    folder = resolve_checkpoint(path, **hub_kwargs)
    with checkpoint_lock(folder, shared=True):  # a save running beside us finishes first (see opendelta.saving)
        raw = read_config_dict(folder)
        legacy = is_legacy_checkpoint(folder, raw)  # saved by OpenDelta 0.3.x: see opendelta.legacy
        if legacy:
            raw = legacy_config(raw, cls, overrides, fields=delta_config is None)
        delta_type = raw.get("delta_type")
        if not isinstance(delta_type, str):
            raise CheckpointError(f"{folder}/config.json has no delta_type: not an OpenDelta checkpoint")
        model_cls = method_for(raw).model_cls if cls.delta_type in ("", None) else cls  # a missing plugin first
        check_requirements(raw, str(folder))
        if model_cls.delta_type != registered_name(delta_type):  # an alias an earlier release wrote is the same
            raise CheckpointError(f"{folder} holds a {delta_type!r} delta, not one for {cls.__name__}")
        config = delta_config or model_cls.config_class.from_saved(raw, str(folder / CONFIG_NAME), **overrides)
        if delta_config is None:  # its patterns are the file's: checked now, matched with bounds
            config.mark_read_from(folder / CONFIG_NAME, overridden=overrides)
        if state_dict is not None:
            tensors = state_dict
        elif legacy:
            tensors = read_legacy_weights(folder, max_bytes=legacy_size_limit(backbone))
        else:
            tensors = load_weights(folder, raw)
    weights = LEGACY_WEIGHTS_NAME if legacy else weights_name(raw)
    source = str(folder if state_dict is not None else folder / weights)  # what the tensor messages name
    if legacy:  # a legacy file also holds buffers (GPT-2's boolean mask) that legacy_state_dict drops
        tensors = plain_tensors(tensors, source)
    else:
        tensors = checked_tensors(tensors, source, targets=dict(backbone.named_parameters()))

    backbone_params = {n for n, _ in backbone.named_parameters()} - delta_parameter_names(backbone)
    backbone_part = {n: t for n, t in tensors.items() if n in backbone_params}
    if not legacy:  # a legacy checkpoint's names are known once its delta is built (below); it has no hash
        _check_backbone_tensors(backbone, backbone_part, str(folder))
        if state_dict is None:  # tensors the caller passes are the caller's; a file's must be declared
            check_declared_tensors(raw, backbone_part, str(folder))
        check_backbone(raw, backbone, backbone_part, check_hash=check_hash, source=str(folder))
    if state_dict is None:
        check_not_loaded(raw, backbone, str(folder))
    expected = raw.get("backbone_hash")

    options = {} if dummy_inputs is None else {"dummy_inputs": dummy_inputs}
    delta_model = model_cls.from_config(config, backbone, **options)  # a 0.3.2-style DeltaBase builds its own way
    try:
        if legacy:
            tensors = legacy_state_dict(delta_model, tensors, str(folder))
            backbone_part = {n: t for n, t in tensors.items() if n in backbone_params}
            _check_backbone_tensors(backbone, backbone_part, str(folder))
        own = delta_model.delta_state_dict()
        delta_part = {n: t for n, t in tensors.items() if n not in backbone_part}
        missing, unexpected = sorted(set(own) - set(delta_part)), sorted(set(delta_part) - set(own))
        misshaped = [
            f"{n}: {tuple(delta_part[n].shape)} vs {tuple(own[n].shape)}"
            for n in own
            if n in delta_part and delta_part[n].shape != own[n].shape
        ]
        if missing or unexpected or misshaped:
            raise CheckpointError(
                f"{folder} does not fit the {delta_type!r} delta built from its own config on this backbone: "
                f"missing {missing[:5]}, unexpected {unexpected[:5]}, shape mismatch {misshaped[:5]}"
            )
        # checked here too, once the names are known to fit (a legacy file's wrong ones are named better), and
        # against the dtype of the delta's own parameters, known now: 1e300 in float64 is inf in a float32 delta
        params = dict(backbone.named_parameters())
        delta_part = checked_tensors(delta_part, source, targets=own)
        backbone_part = checked_tensors(backbone_part, source, targets=params)
        with torch.no_grad():
            for name, tensor in delta_part.items():
                own[name].copy_(tensor)
            for name, tensor in backbone_part.items():
                params[name].copy_(tensor)
    except BaseException:
        delta_model.detach()
        raise
    if expected and not check_hash and not backbone_matches(raw, backbone, {}, str(folder)):
        warnings.warn(
            f"the delta in {folder} was trained on another backbone (hash differs); loaded anyway (check_hash=False)",
            stacklevel=3,
        )
    config.backbone_hash = expected
    if state_dict is None:
        mark_loaded(raw, backbone, str(folder), delta_model)
    backbone.eval()
    return delta_model
