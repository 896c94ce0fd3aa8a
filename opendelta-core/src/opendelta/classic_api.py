"""OpenDelta 0.3.2's attributes and helpers of a delta model, over this library's machinery (manual section 1.20.2).

Code written for 0.3.2 reads ``delta_model.lora_r``, ``.modified_modules``, ``.delta_modules`` and calls
``num_trainable_parameters()``, ``find_module()``... These are answered here from the config the deltas were built
from and from the placed deltas; nothing is stored twice, so an attribute can never disagree with what was built.

Hyper-parameters are read-only once built: changing ``lora_r`` afterwards would not resize a single delta, so it is
refused with the way to get what was meant. ``unfrozen_modules`` is the exception: it is what ``freeze_module()``
reads, and setting it updates the config, as 0.3.2's ``freeze_module`` read the attribute.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from torch import nn

from opendelta.addressing import compile_patterns, is_excluded
from opendelta.errors import DeltaStateError
from opendelta.freezing import trainable_only_state_dict
from opendelta.markers import WRAPPED_ATTR, mark_delta
from opendelta.structure_registry import structure_for_model

if TYPE_CHECKING:
    from opendelta.config import DeltaConfig

__all__ = ["ClassicDeltaApi"]

SETTABLE_FIELDS = frozenset({"unfrozen_modules"})
"""Config fields a user may set on a built delta model: what they control is read when used, not when built."""


def _built_config(module: nn.Module) -> DeltaConfig | None:
    """The config a delta model was built from, once it is built (``None`` while a 0.3.2-style one is building)."""
    return module.__dict__.get("config")


class ClassicDeltaApi(nn.Module):
    """The 0.3.2 names of a delta model; mixed into :class:`opendelta.DeltaModel` (listed before ``nn.Module``)."""

    backbone_model: nn.Module
    deltas: nn.ModuleList

    def __getattr__(self, name: str) -> Any:
        """``nn.Module``'s lookup, then the config's fields (``.lora_r``), then ``delta_modules`` (the deltas)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            config = _built_config(self)
            if config is not None and name in type(config).field_names():
                return getattr(config, name)
            if name == "delta_modules" and "_modules" in self.__dict__ and "deltas" in self._modules:
                return self._modules["deltas"]  # what 0.3.2 held there: the delta modules, in insertion order
            raise

    def __setattr__(self, name: str, value: Any) -> None:
        config = _built_config(self)
        if config is not None and name in type(config).field_names():
            if name not in SETTABLE_FIELDS:
                raise DeltaStateError(
                    f"{type(self).__name__}.{name} is the hyper-parameter its deltas were built with and cannot change "
                    f"afterwards (no delta would follow); build a new delta model with {name}={value!r} on a fresh "
                    f"backbone"
                )
            value = ["deltas"] if value is None else value  # 0.3.2's None: the default
            compile_patterns(value if isinstance(value, str) else [v for v in value if v != "deltas"], argument=name)
            value = list(value)
            config.unfrozen_modules = value
            if name not in self.__dict__:
                return
        super().__setattr__(name, value)

    # ------------------------------------------------------------------------------------------ parameter sugar
    def trainable_parameters_names(self, module: nn.Module | None = None) -> list[str]:
        """Names of the parameters that require grad in ``module`` (default: the backbone, deltas included)."""
        module = self.backbone_model if module is None else module
        return [n for n, p in module.named_parameters() if p.requires_grad]

    def frozen_parameters_names(self, module: nn.Module | None = None) -> list[str]:
        """Names of the parameters that do not require grad in ``module`` (default: the backbone)."""
        module = self.backbone_model if module is None else module
        return [n for n, p in module.named_parameters() if not p.requires_grad]

    def trainable_parameters(self, module: nn.Module | None = None) -> list[nn.Parameter]:
        """The parameters that require grad in ``module`` (default: this delta model's deltas), for an optimizer."""
        module = self if module is None else module
        return [p for p in module.parameters() if p.requires_grad]

    def num_trainable_parameters(self, module: nn.Module | None = None) -> int:
        """How many scalars require grad in ``module`` (default: this delta model's deltas)."""
        return sum(p.numel() for p in self.trainable_parameters(module))

    def num_total_parameters(self, module: nn.Module | None = None) -> int:
        """How many scalars ``module`` has (default: this delta model's deltas); shared parameters count once."""
        module = self if module is None else module
        return sum(p.numel() for p in module.parameters())

    # -------------------------------------------------------------------------------------------- addressing
    def find_key(self, key: str, target_list: Sequence[str | re.Pattern[str]]) -> bool:
        """Whether the module named ``key`` (relative to the backbone) is designated by ``target_list``.

        The rules of name-based addressing: a pattern matches the end of the name on whole components (``[r]``:
        a regular expression; a compiled ``re.Pattern`` is taken as one); with ``common_structure``, or with the
        method's default ``modified_modules``, the module's common names (``attn.q``) match too; a module under
        ``exclude_modules`` never matches.
        """
        if is_excluded(key, compile_patterns(self.exclude_modules, argument="exclude_modules")):
            return False
        texts = [f"[r]{t.pattern}" if isinstance(t, re.Pattern) else t for t in target_list]
        patterns = compile_patterns(texts, argument="target_list")
        if any(p.matches(key) for p in patterns):
            return True
        if not (self.common_structure or self.modified_modules is None):  # the defaults are common names
            return False
        common = structure_for_model(self.backbone_model).common_names(self.backbone_model).get(key, [])
        return any(p.matches(c.name) for c in common for p in patterns)

    def find_module(self, root_module: nn.Module, key: str) -> tuple[nn.Module, str, nn.Module]:
        """``(parent, child_name, module)`` for the submodule of ``root_module`` named ``key`` (dotted)."""
        parent_name, _, child_name = key.rpartition(".")
        parent = root_module.get_submodule(parent_name)
        return parent, child_name, parent.get_submodule(child_name)

    # ------------------------------------------------------------------------------------------------ marking
    def mark_as_delta(self, module: nn.Module | None = None) -> None:
        """Mark ``module`` (default: every delta of this model) as delta parameters, as bigmodelvis shows them.

        Deltas are marked when placed; this re-marks them. A module that is not part of this model's deltas is
        refused: being a delta here means being placed (saved, detached, counted with the delta), which marking
        alone cannot do.

        Raises:
            DeltaStateError: ``module`` is not one of this delta model's deltas nor inside one.
        """
        if module is None:
            for delta in self.deltas:
                mark_delta(delta, getattr(delta, WRAPPED_ATTR, None))
            return
        inside = {id(m) for delta in self.deltas for m in delta.modules()}
        if id(module) not in inside:
            raise DeltaStateError(
                f"mark_as_delta: the {type(module).__name__} given is not part of {type(self).__name__}'s deltas; "
                f"place it with insert_sequential_module/insert_parallel_module/replace_module to make it a delta, "
                f"or keep a backbone module trainable with freeze_module(exclude=['deltas', '<its name>'])"
            )
        for p in module.parameters():
            p._is_delta = True

    def set_active_state_dict(self, module: nn.Module | None = None) -> None:
        """Make ``module.state_dict()`` (default: the backbone's) hold only the parameters that require grad."""
        trainable_only_state_dict(self.backbone_model if module is None else module)

    def create_config_from_model(self) -> DeltaConfig:
        """The config of this delta model (0.3.2 built it from the attributes; here they are read from it)."""
        config = _built_config(self)
        if config is None:
            raise DeltaStateError(f"{type(self).__name__} has no config before its deltas are added")
        return config
