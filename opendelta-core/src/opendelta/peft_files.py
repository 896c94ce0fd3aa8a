"""PEFT adapter folders, read and written once here for every plugin whose method PEFT also has.

``PeftModel.save_pretrained`` writes the same folder for each of its methods: ``adapter_config.json`` (a JSON object
with ``peft_type`` and the method's fields) and ``adapter_model.safetensors`` (or, from old PEFT versions,
``adapter_model.bin``) whose keys start with ``base_model.model.``. What differs per method is the meaning of the
fields and tensors, which the method's plugin maps onto its own config and state (the ``read_checkpoint`` hook). The
parts that do not differ live here, with the same guards as OpenDelta's own format: size-capped JSON, files that may
not be links out of the folder, pickles read without running code and bounded by the backbone's size, atomic writes,
and a refusal naming every PEFT option the plugin does not understand (an option it ignored could change what the
adapter computes: such a folder is refused, never loaded wrong).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save
from torch import nn

from opendelta import file_patterns
from opendelta.errors import AddressingError, CheckpointError
from opendelta.legacy import legacy_size_limit, read_pickled_tensors
from opendelta.saving import contained_file, read_config_dict, read_safetensors, write_atomically
from opendelta.targets import backbone_module_names

__all__ = [
    "PEFT_BOOKKEEPING",
    "PEFT_CONFIG_NAME",
    "PEFT_PREFIX",
    "PEFT_WEIGHTS_NAME",
    "PeftFolder",
    "peft_folder",
    "refuse_task_heads",
    "write_peft_folder",
]

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PICKLED_WEIGHTS_NAME = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."
"""What PEFT puts before a backbone module's name in its weight files."""
PEFT_BOOKKEEPING = frozenset(
    {
        "peft_type",
        "task_type",
        "base_model_name_or_path",
        "revision",
        "inference_mode",
        "auto_mapping",
        "peft_version",
    }
)
"""Fields every PEFT config may have that do not change what the adapter computes."""


def _is_off(value: Any) -> bool:
    """Whether a PEFT option is unset: ``None``, ``False`` or empty (PEFT writes ``{}`` for no pattern)."""
    return value is None or (isinstance(value, (bool, list, dict, str)) and not value)


@dataclass(frozen=True)
class PeftFolder:
    """One PEFT adapter folder of a known ``peft_type``: its checked config, and its tensors on demand.

    Attributes:
        folder: the folder.
        config: ``adapter_config.json``, a JSON object (size-capped).
        peft_type: PEFT's method name, upper case (``"IA3"``, ``"LN_TUNING"``...).
    """

    folder: Path
    config: dict[str, Any]
    peft_type: str

    @property
    def source(self) -> str:
        """How error messages name the adapter: its folder."""
        return str(self.folder)

    def refuse_unknown(self, understood: Collection[str], method: str) -> None:
        """Refuse, by name, every set field that is neither bookkeeping nor in ``understood``.

        Args:
            understood: the fields the plugin reads, or knows to be inert for a trained adapter.
            method: the delta model class, for the message (``"IA3Model"``).

        Raises:
            CheckpointError: naming the first such field and its value.
        """
        for field, value in self.config.items():
            if field in PEFT_BOOKKEEPING or field in understood or _is_off(value):
                continue
            names = isinstance(value, list) and all(isinstance(v, str) for v in value)
            shown = file_patterns.shown(value) if names else repr(value)[:200]  # layers_to_transform=[0]: numbers
            raise CheckpointError(
                f"{self.source}: {field}={shown} is a PEFT option {method} does not support (it may change what the "
                f"adapter computes); {method} reads {', '.join(sorted(understood))}. Use PEFT for this adapter."
            )

    def require_targets(self, method: str) -> None:
        """Refuse a config without ``target_modules``, or with ``"all-linear"``.

        PEFT records the modules it modified in ``target_modules``, so a folder without them was not written by
        ``save_pretrained``; ``"all-linear"`` is resolved by PEFT against the model class (every linear layer but the
        output head), which a reader matching names cannot reproduce faithfully.

        Args:
            method: the delta model class, for the message (``"LoHaModel"``).

        Raises:
            CheckpointError: no ``target_modules``, or ``"all-linear"``.
        """
        targets = self.config.get("target_modules")
        if not targets:
            raise CheckpointError(f"{self.source} has no target_modules: PEFT records the modules it modified there")
        if isinstance(targets, str) and targets.lower() == "all-linear":
            raise CheckpointError(
                f"{self.source}: target_modules='all-linear' is not supported by {method}'s PEFT reader"
            )

    def refuse_trained_bias(self, method: str) -> None:
        """Refuse a ``bias`` other than ``"none"`` (PEFT's LoRA-family option to train and save backbone biases).

        Such a folder holds trained biases besides the method's tensors, which a plugin that loads only its own
        tensors would drop. A plugin calling this lists ``bias`` among the fields :meth:`refuse_unknown` accepts.

        Args:
            method: the delta model class, for the message (``"VeraModel"``).

        Raises:
            CheckpointError: naming the value.
        """
        value = self.config.get("bias")
        if _is_off(value) or value == "none":
            return
        raise CheckpointError(
            f"{self.source}: bias={value!r:.100} saves trained backbone biases, which {method} does not load; only "
            f"bias='none' is supported. Use PEFT for this adapter."
        )

    def refuse_other_class(self, delta_cls: type, ours: type) -> None:
        """Refuse a ``from_finetuned`` called on a delta class other than ``ours`` (or the generic one).

        Raises:
            CheckpointError: naming the adapter's type and the classes that read it.
        """
        if getattr(delta_cls, "delta_type", None) in ("", None) or issubclass(delta_cls, ours):
            return
        raise CheckpointError(
            f"{self.folder} is a PEFT {self.peft_type!r} adapter, and {delta_cls.__name__} cannot read it; load it "
            f"with {ours.__name__}.from_finetuned or AutoDeltaModel.from_finetuned"
        )

    def targeted_modules(self, model: nn.Module) -> list[str]:
        """The backbone modules PEFT put this adapter on, in the model's order, by PEFT's matching rule.

        ``target_modules`` as a string is a regex the full name must match; as a list, an entry is the name or a
        ``.``-separated suffix of it; ``exclude_modules`` (same forms) takes names out. Regexes run bounded (a file
        from a stranger may hold a catastrophic one).

        Raises:
            CheckpointError: a field of another type, a regex too costly or invalid, or no module matched.
        """
        target = self._matcher("target_modules")
        exclude = self._matcher("exclude_modules")
        names = [n for n in backbone_module_names(model) if target(n) and not exclude(n)]
        if not names:
            raise CheckpointError(f"{self.source}: target_modules matches no module of this {type(model).__name__}")
        return names

    def _matcher(self, field: str) -> Callable[[str], bool]:
        value = self.config.get(field)
        ok = (
            value is None
            or isinstance(value, str)
            or (isinstance(value, list) and all(isinstance(v, str) for v in value))
        )
        if not ok:
            raise CheckpointError(
                f"{self.source}: {field} must be a list of names or a regex string, got {value!r:.200}"
            )
        file_patterns.check_limits(field, value, self.source)
        if not value:
            return lambda name: False
        if isinstance(value, str):
            try:
                regex = file_patterns.compile_file_regex(value, value, file_patterns.MatchBudget(field, self.source))
            except AddressingError as exc:
                raise CheckpointError(str(exc)) from exc
            return lambda name: regex.fullmatch(name) is not None
        listed = frozenset(value)
        return lambda name: name in listed or any(name.endswith(f".{entry}") for entry in listed)

    def weights_file(self, *, pickled: bool = True) -> Path:
        """The weights file: ``adapter_model.safetensors``, else old PEFT's ``adapter_model.bin``.

        Args:
            pickled: whether ``adapter_model.bin`` is accepted too; ``False`` for a reader whose folders come only
                from PEFT versions that write safetensors, or that has not been checked against old pickles.

        Raises:
            CheckpointError: neither is there, or it is a link out of the folder.
        """
        names = (PEFT_WEIGHTS_NAME, PEFT_PICKLED_WEIGHTS_NAME) if pickled else (PEFT_WEIGHTS_NAME,)
        for name in names:
            if (self.folder / name).is_file():
                return contained_file(self.folder, name, "the PEFT weights file")
        raise CheckpointError(f"{self.folder} has {PEFT_CONFIG_NAME} but no {PEFT_WEIGHTS_NAME}")

    def tensors(self, backbone_model: nn.Module, *, pickled: bool = True) -> dict[str, torch.Tensor]:
        """The weights, names unchanged; a pickle is read without running code and bounded by the backbone's size.

        Args:
            backbone_model: the model the adapter is for (bounds a pickle's size).
            pickled: whether ``adapter_model.bin`` is read too (see :meth:`weights_file`).

        Raises:
            CheckpointError: a missing, damaged or oversized weights file.
        """
        path = self.weights_file(pickled=pickled)
        if path.name == PEFT_WEIGHTS_NAME:
            return read_safetensors(path)
        return read_pickled_tensors(path, max_bytes=legacy_size_limit(backbone_model))

    def module_tensors(
        self, backbone_model: nn.Module, suffixes: Collection[str]
    ) -> dict[str, dict[str, torch.Tensor]]:
        """``{module name: {suffix: tensor}}`` for keys ``base_model.model.<module>.<suffix>``.

        Args:
            backbone_model: the model the adapter is for (bounds a pickle's size).
            suffixes: the tensor names the method saves per module (``"ia3_l"``, ``"ln_tuning_layers.weight"``).

        Raises:
            CheckpointError: a key of another shape (named): something this reader would otherwise drop.
        """
        found: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in self.tensors(backbone_model).items():
            suffix = next((s for s in suffixes if key.endswith(f".{s}")), None)
            if not key.startswith(PEFT_PREFIX) or suffix is None:
                raise CheckpointError(
                    f"{self.source}: {key!r:.200} is not a {self.peft_type} tensor of this format "
                    f"('{PEFT_PREFIX}<module>.<{'|'.join(suffixes)}>')"
                )
            found.setdefault(key[len(PEFT_PREFIX) : -len(suffix) - 1], {})[suffix] = tensor
        return found


def peft_folder(folder: str | os.PathLike[str], peft_type: str) -> PeftFolder | None:
    """The PEFT adapter in ``folder`` when its ``peft_type`` is ``peft_type``; ``None`` for any other folder.

    ``None`` lets another plugin's ``read_checkpoint`` hook read the folder (another method, or not PEFT's).

    Raises:
        CheckpointError: an ``adapter_config.json`` that is oversized, not a JSON object, or a link out.
    """
    path = Path(folder)
    if not (path / PEFT_CONFIG_NAME).is_file():
        return None
    config = read_config_dict(contained_file(path, PEFT_CONFIG_NAME, "the PEFT config"))
    found = config.get("peft_type")
    if not isinstance(found, str) or found.upper() != peft_type.upper():
        return None
    return PeftFolder(path, config, found.upper())


def write_peft_folder(
    folder: str | os.PathLike[str], document: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]
) -> Path:
    """Write a PEFT adapter folder (created if needed): the weights, then the config, each atomically.

    Args:
        folder: where ``adapter_config.json`` and ``adapter_model.safetensors`` go.
        document: the config (``peft_type`` and the method's fields; PEFT's loader fills the fields left out with
            its defaults, so write every field whose default would compute something else).
        tensors: ``{"base_model.model.<module>.<name>": tensor}``; copied to CPU, contiguous.

    Returns:
        The folder.
    """
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    stored = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    write_atomically(path / PEFT_WEIGHTS_NAME, save(stored, metadata={"format": "pt"}))
    write_atomically(path / PEFT_CONFIG_NAME, (json.dumps(dict(document), indent=2) + "\n").encode())
    return path


def refuse_task_heads(delta_model: Any, method: str) -> None:
    """Refuse, before anything is written, to export a delta model's task heads where the writer does not ship them.

    A PEFT folder written without its ``modules_to_save`` would load with the backbone's own heads: silently another
    model. (LoRA's writer ships them; the others refuse until they do.)

    Raises:
        CheckpointError: the delta model has task heads (``modules_to_save``); the message says how to save them.
    """
    heads = list(delta_model.task_heads())
    if heads:
        raise CheckpointError(
            f"{type(delta_model).__name__} has task heads (modules_to_save={heads!r}), which the PEFT {method} export "
            f"does not write; save it with save_finetuned(), which keeps them, or build it without modules_to_save"
        )
