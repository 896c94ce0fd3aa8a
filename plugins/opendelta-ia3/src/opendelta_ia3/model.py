"""``IA3Model``: a learned vector scaling the output of the attention's k and v and the input of the FF down projection.

The two placements IA3 needs (after a layer for ``l_k``/``l_v``, before it for ``l_ff``) are one insertion kind,
``"ia3"``, registered here: its placer puts each delta after or before its layer, so every placed delta is a plain
sequential one (``"after"``/``"before"``), which core detaches, merges and routes per row like any other.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

from torch import nn

from opendelta.plugin_api import (
    SHARED_POSITIONALS,
    AddressingError,
    DeltaConfigError,
    DeltaModel,
    Insertion,
    Target,
    UnsupportedTargetError,
    factory_kwargs,
    insert_sequential_module,
    is_linear,
    linear_features,
    placement_kinds,
    register_placement,
    resolve_targets,
)
from opendelta_ia3.config import IA3Config
from opendelta_ia3.layer import IA3Layer

DEFAULT_FEEDFORWARD: tuple[str, ...] = ("ff.w2",)
"""The common name of the feed-forward modules when ``feedforward_modules`` is ``None``."""


def _place(model: DeltaModel, target: Target, delta: nn.Module) -> Insertion:
    """The ``"ia3"`` placer: before the layer for a feed-forward (input-scaling) delta, after it otherwise."""
    position = "before" if getattr(delta, "feedforward", False) else "after"
    return insert_sequential_module(target.module, delta, model.delta_name, position=position)


if "ia3" not in placement_kinds():  # a second import of this module (importlib.reload) keeps the first placer
    register_placement("ia3", _place)


class IA3Model(DeltaModel):
    """IA3 on a backbone (Liu et al., 2022; PEFT's ``IA3Model`` semantics).

    ``IA3Model(backbone_model=model)`` scales the outputs of every self-attention's key and value projections and
    the input of every feed-forward second projection (common names ``attn.k``, ``attn.v``, ``ff.w2``), each by a
    vector starting at ones. On a fused projection (GPT-2's ``c_attn``) only the k and v output slices are scaled.
    ``modified_modules=[...]`` chooses other linear layers; ``feedforward_modules`` says which of them are scaled
    on their input (see :class:`~opendelta_ia3.IA3Config`).
    """

    config_class = IA3Config
    default_modified_modules: ClassVar[tuple[str, ...]] = ("attn.k", "attn.v", *DEFAULT_FEEDFORWARD)
    insertion = "ia3"
    positional_args = SHARED_POSITIONALS
    supports_fused_targets = True
    identity_at_init = True
    combines_linearly = True
    """``combine_deltas`` sums the vectors weighted, as PEFT's IA3 ``add_weighted_adapter``."""
    config: IA3Config

    def supports(self, module: nn.Module) -> bool:
        """Linear layers: ``nn.Linear``, GPT-2's ``Conv1D``, a registered quantization backend's layers."""
        return is_linear(module)

    def _expand_target(self, target: Target) -> list[Target]:
        """With the defaults, a feed-forward that is no linear layer (a mixture of experts' block) is left out.

        IA3 scales the input of one linear layer; the experts of a sparse block have one each, and transformers 5
        stacks them into 3-D parameters. Named explicitly, such a module is refused as unsupported.
        """
        if self.config.modified_modules is None and not is_linear(target.module):
            return []
        return [target]

    def _prepare(self, targets: Sequence[Target]) -> None:
        """Decide which targets are feed-forward ones (scaled on their input) before any delta is built.

        Raises:
            DeltaConfigError: ``feedforward_modules`` names a module that is not modified.
            UnsupportedTargetError: a feed-forward target is a slice of a fused layer (its input is shared).
        """
        names = self._feedforward_names()
        by_name = {t.name: t for t in targets}
        if self.config.feedforward_modules is None:
            names &= set(by_name)
        outside = sorted(names - set(by_name))
        if outside:
            raise DeltaConfigError(
                f"IA3Config.feedforward_modules names {outside[:3]}, which modified_modules does not modify; the "
                f"feed-forward modules must be among the modified ones (as in PEFT)"
            )
        fused = [n for n in sorted(names) if by_name[n].parts is not None]
        if fused:
            raise UnsupportedTargetError(
                f"IA3 cannot scale the input of {fused[0]} for some of its fused parts only: an input-scaled "
                f"(feed-forward) target must be a whole layer"
            )
        self._feedforward = names

    def _feedforward_names(self) -> set[str]:
        given = self.config.feedforward_modules
        if given is not None and not given:
            return set()
        try:
            found = resolve_targets(
                self.backbone_model,
                given,
                self.config.exclude_modules,
                DEFAULT_FEEDFORWARD,
                self.config.common_structure,
                type(self).__name__,
            )
        except LookupError as exc:  # no ff.w2 (or no mapping) for the defaults: then no feed-forward target
            if given is None:
                return set()
            if isinstance(exc, AddressingError):
                raise type(exc)(f"feedforward_modules: {exc}") from exc
            raise
        return {t.name for t in found}

    def _build_delta(self, target: Target) -> nn.Module:
        in_features, out_features = linear_features(target.module)
        placement = factory_kwargs(target.module)  # a quantized layer's compute dtype, never its storage dtype
        feedforward = target.name in self._feedforward
        return IA3Layer(
            in_features if feedforward else out_features,
            None if feedforward else target.output_index(out_features, device=placement.get("device")),
            feedforward=feedforward,
            init_ones=self.config.init_ia3_weights,
            **placement,
        )

    def save_peft(self, path: str | os.PathLike[str], *, task_type: str | None = None) -> Path:
        """Export in PEFT's IA3 format, which ``PeftModel.from_pretrained`` reads (``peft_format.save_peft_ia3``)."""
        from opendelta_ia3.peft_format import save_peft_ia3

        return save_peft_ia3(self, path, task_type=task_type)
