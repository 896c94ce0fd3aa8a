"""Saving a delta model to a checkpoint and rebuilding it from one, with every check done before any change.

What a checkpoint holds: the delta's tensors under stable names (``DeltaModel.delta_state_dict``), plus every
trainable backbone parameter that is not a delta (a fine-tuned task head), under its backbone name; and
``config.json`` with the hyper-parameters, the backbone's class, checkpoint name and hashes, the backbone tensors the
weights file holds, and the versions. What a load checks of the backbone is in ``opendelta.backbone_check``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from opendelta import plugins
from opendelta.backbone_check import (
    backbone_matches,
    backbone_record,
    check_backbone,
    check_declared_tensors,
    check_not_loaded,
    mark_loaded,
)
from opendelta.checkpoint_record import CheckpointRecord
from opendelta.compat import CORE_DISTRIBUTION, installed_version, method_and_config, version_record
from opendelta.config import DeltaConfig
from opendelta.errors import CheckpointError, DeltaStateError, OpenDeltaError, UnknownArgumentError
from opendelta.legacy import is_legacy_checkpoint, read_legacy_checkpoint
from opendelta.markers import delta_parameter_names
from opendelta.saving import (
    CONFIG_NAME,
    checkpoint_lock,
    load_weights,
    read_config_dict,
    resolve_checkpoint,
    weights_name,
    write_checkpoint,
)
from opendelta.task_heads import shadowed_parameter_names
from opendelta.tensor_checks import checked_tensors

if TYPE_CHECKING:
    from opendelta.base import DeltaModel
    from opendelta.save_options import CardExtras

__all__ = [
    "apply_checkpoint",
    "backbone_parameters_in",
    "config_document",
    "load_delta",
    "read_checkpoint_folder",
    "read_foreign_checkpoint",
    "save_delta",
    "versions",
]


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
    deltas = delta_parameter_names(backbone) | shadowed_parameter_names(backbone)  # a head copy stands in for these
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


def read_foreign_checkpoint(folder: Path, backbone: nn.Module, cls: type[DeltaModel]) -> CheckpointRecord | None:
    """The record the first plugin's ``read_checkpoint`` returns for a folder in another library's format, or ``None``.

    Each implementation is called on its own, in pluggy's order: one that returns ``None`` does not know the
    format; one that raises an :class:`~opendelta.errors.OpenDeltaError` refuses the folder (the user sees why);
    any other exception is reported as a plugin warning naming its distribution, and the next one is tried.
    """
    plugins.load_plugins()
    kwargs = {"folder": folder, "backbone": backbone, "delta_cls": cls}
    impls = [i for i in plugins.pm.hook.read_checkpoint.get_hookimpls() if not (i.hookwrapper or i.wrapper)]
    for impl in reversed(impls):  # pluggy calls the last registered (and tryfirst) first
        try:
            record = impl.function(**{arg: kwargs[arg] for arg in impl.argnames})
        except OpenDeltaError:
            raise
        except plugins.PLUGIN_ERRORS as exc:
            plugins.warn_plugin(impl.plugin_name, f"raised inside read_checkpoint ({type(exc).__name__}: {exc})")
            continue
        if record is None:
            continue
        if not isinstance(record, CheckpointRecord):
            plugins.warn_plugin(
                impl.plugin_name, f"returned {type(record).__name__} from read_checkpoint, not a record"
            )
            continue
        return record
    return None


def _read_native(
    folder: Path,
    raw: dict[str, Any],
    cls: type[DeltaModel],
    backbone: nn.Module,
    *,
    delta_config: DeltaConfig | None,
    state_dict: dict[str, torch.Tensor] | None,
    check_hash: bool,
    overrides: dict[str, Any],
    into: DeltaModel | None = None,
) -> CheckpointRecord:
    """OpenDelta's own format: the config checked field by field, the tensors against the backbone record.

    ``into``: the delta model the tensors go into in place (``load_weights``), which may hold this checkpoint already.
    """
    model_cls, config = method_and_config(folder, raw, cls, delta_config, overrides)
    tensors = state_dict if state_dict is not None else load_weights(folder, raw)
    source = str(folder if state_dict is not None else folder / weights_name(raw))
    tensors = checked_tensors(tensors, source, targets=dict(backbone.named_parameters()))
    backbone_part = backbone_parameters_in(backbone, tensors)
    _check_backbone_tensors(backbone, backbone_part, str(folder))
    if state_dict is None:  # tensors the caller passes are the caller's; a file's must be declared
        check_declared_tensors(raw, backbone_part, str(folder))
    check_backbone(raw, backbone, backbone_part, check_hash=check_hash, source=str(folder))
    if state_dict is None:
        check_not_loaded(raw, backbone, str(folder), into=into)
    return CheckpointRecord(
        str(folder), source, model_cls, config, tensors, saved=raw, checks={"caller_tensors": state_dict is not None}
    )


def backbone_parameters_in(backbone: nn.Module, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors that are backbone parameters (a task head), not deltas."""
    names = {n for n, _ in backbone.named_parameters()} - delta_parameter_names(backbone)
    return {n: t for n, t in tensors.items() if n in names}


def apply_checkpoint(
    record: CheckpointRecord, backbone: nn.Module, *, check_hash: bool = True, dummy_inputs: Any = None
) -> DeltaModel:
    """Build ``record``'s delta on ``backbone`` and load its tensors: the one step every format's reader ends in.

    Every tensor is checked against the built delta (names, shapes, dtypes, finite values) before any is copied;
    on any error the delta is taken out again and the backbone is as it was. The backbone is left in eval mode.

    Raises:
        CheckpointError: the tensors do not fit the delta built from the record's config on this backbone.
    """
    options = {} if dummy_inputs is None else {"dummy_inputs": dummy_inputs}
    delta_model = record.model_cls.from_config(record.config, backbone, **options)  # 0.3.2's DeltaBase builds its way
    tensors = dict(record.tensors)
    try:
        if record.translate is not None:
            tensors = record.translate(delta_model, tensors)
        backbone_part = backbone_parameters_in(backbone, tensors)
        if record.translate is not None:  # names known only now
            _check_backbone_tensors(backbone, backbone_part, record.source)
        own = delta_model.delta_state_dict()
        delta_part = {n: t for n, t in tensors.items() if n not in backbone_part}
        missing, unexpected = sorted(set(own) - set(delta_part)), sorted(set(delta_part) - set(own))
        misshaped = [
            f"{n}: {tuple(delta_part[n].shape)} vs {tuple(own[n].shape)}"
            for n in own
            if n in delta_part and delta_part[n].shape != own[n].shape
        ]
        if missing or unexpected or misshaped:
            what = record.describe or f"the {record.model_cls.delta_type!r} delta built from its own config"
            raise CheckpointError(
                f"{record.source} does not fit {what} on this backbone: "
                f"missing {missing[:5]}, unexpected {unexpected[:5]}, shape mismatch {misshaped[:5]}"
            )
        # checked here too, once the names are known to fit (a legacy file's wrong ones are named better), and
        # against the dtype of the delta's own parameters, known now: 1e300 in float64 is inf in a float32 delta
        params = dict(backbone.named_parameters())
        delta_part = checked_tensors(delta_part, record.tensor_source, targets=own)
        backbone_part = checked_tensors(backbone_part, record.tensor_source, targets=params)
        with torch.no_grad():
            for name, tensor in delta_part.items():
                own[name].copy_(tensor)
            for name, tensor in backbone_part.items():
                params[name].copy_(tensor)
    except BaseException:
        delta_model.detach()
        raise
    saved = record.saved
    if saved is not None:
        expected = saved.get("backbone_hash")
        if expected and not check_hash and not backbone_matches(saved, backbone, {}, record.source):
            warnings.warn(
                f"the delta in {record.source} was trained on another backbone (hash differs); loaded anyway "
                f"(check_hash=False)",
                stacklevel=4,
            )
        record.config.backbone_hash = expected
        if not record.checks.get("caller_tensors", False):
            mark_loaded(saved, backbone, record.source, delta_model)
    backbone.eval()
    return delta_model


def read_checkpoint_folder(
    cls: type[DeltaModel],
    path: str | os.PathLike[str],
    backbone: nn.Module,
    *,
    delta_config: DeltaConfig | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
    check_hash: bool = True,
    hub_kwargs: dict[str, Any] | None = None,
    overrides: dict[str, Any] | None = None,
    into: DeltaModel | None = None,
) -> CheckpointRecord:
    """Read and check the checkpoint at ``path`` for ``backbone``, in whichever format it is; nothing is changed.

    A local folder without OpenDelta's ``config.json`` goes to the plugins' ``read_checkpoint`` hook (PEFT's LoRA
    folders: ``opendelta-lora``); OpenDelta 0.3.x checkpoints to :func:`opendelta.legacy.read_legacy_checkpoint`;
    everything else is this library's own format. ``into``: the delta model the record is loaded into in place
    (``DeltaModel.load_weights``), which may hold this checkpoint already.
    """
    hub_kwargs = {k: v for k, v in (hub_kwargs or {}).items() if v}
    overrides = overrides or {}
    local = Path(path)
    if local.is_dir() and not (local / CONFIG_NAME).is_file():  # perhaps another library's format
        record = read_foreign_checkpoint(local, backbone, cls)
        if record is not None:
            if delta_config is not None or state_dict is not None or overrides:
                raise CheckpointError(
                    f"{local} is {record.describe or 'not an OpenDelta checkpoint'}: its config and weights are its "
                    f"own; pass no options"
                )
            return record
    folder = resolve_checkpoint(path, **hub_kwargs)
    with checkpoint_lock(folder, shared=True):  # a save running beside us finishes first (see opendelta.saving)
        raw = read_config_dict(folder)
        options = {"delta_config": delta_config, "state_dict": state_dict, "overrides": overrides}
        if is_legacy_checkpoint(folder, raw):  # saved by OpenDelta 0.3.x: see opendelta.legacy
            return read_legacy_checkpoint(folder, raw, cls, backbone, into=into, **options)
        return _read_native(folder, raw, cls, backbone, check_hash=check_hash, into=into, **options)


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
    """Rebuild and load a delta (see ``DeltaModel.from_finetuned``); ``cls`` may be ``DeltaModel`` itself.

    One reader per format returns a :class:`~opendelta.checkpoint_record.CheckpointRecord`
    (:func:`read_checkpoint_folder`), then :func:`apply_checkpoint` loads it.
    """
    dummy_inputs = overrides.pop("dummy_inputs", None)  # a constructor option for the pseudo pass, not a field
    record = read_checkpoint_folder(
        cls,
        path,
        backbone,
        delta_config=delta_config,
        state_dict=state_dict,
        check_hash=check_hash,
        hub_kwargs=hub_kwargs,
        overrides=overrides,
    )
    return apply_checkpoint(record, backbone, check_hash=check_hash, dummy_inputs=dummy_inputs)
