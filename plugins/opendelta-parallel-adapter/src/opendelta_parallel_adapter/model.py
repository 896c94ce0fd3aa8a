"""``ParallelAdapterModel``: a scaled bottleneck adapter beside each targeted module or span of modules."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from opendelta.plugin_api import (
    SHARED_POSITIONALS,
    BottleneckAdapter,
    CheckpointError,
    DeltaModel,
    Target,
    UnsupportedTargetError,
    factory_kwargs,
)
from opendelta_parallel_adapter.config import ParallelAdapterConfig, spans_from_flat_pairs
from opendelta_parallel_adapter.spans import resolve_span_targets


class ParallelAdapterModel(DeltaModel):
    """The parallel adapter of He et al., 2022 (https://arxiv.org/abs/2110.04366).

    "Towards a Unified View of Parameter-Efficient Transfer Learning", ICLR 2022.

    A sublayer ``f`` (or a span of modules from ``start`` to ``end``) computes ``f(x) + s * up(act(down(x)))``: the
    adapter reads the input ``x`` of the module (of ``start``) and its output is added to the output of the module
    (of ``end``), where a sequential adapter would read the output. ``s`` is ``config.scaled``. The block is core's
    :class:`~opendelta.layers.BottleneckAdapter` without its residual, so the child names (``parallel_adapter.
    modulelist.down_proj``/``up_proj``) are the original OpenDelta's. Weights start normal with std 0.01 and biases
    at zero, so a fresh adapter is close to, not exactly, the identity.

    By default one adapter goes around each attention block (common name ``attn``) and one around each feed-forward
    block, spanning from the input of its first linear layer to the output of its second (``["ff.w1", "ff.w2"]``):
    a span is the only way to cover architectures like BART and OPT, which have no module holding exactly the
    feed-forward block.
    """

    config_class = ParallelAdapterConfig
    default_modified_modules: ClassVar[tuple[str | tuple[str, str], ...]] = ("attn", ("ff.w1", "ff.w2"))
    insertion = "parallel"
    positional_args = (
        "bottleneck_dim",
        "non_linearity",
        *SHARED_POSITIONALS,
    )
    """The manual's positional order: ``ParallelAdapterModel(model, x)`` binds x to ``bottleneck_dim``."""
    identity_at_init = False
    config: ParallelAdapterConfig

    def _resolve_targets(self) -> list[Target]:
        """Resolve patterns and ``[start, end]`` spans (see :mod:`opendelta_parallel_adapter.spans`).

        A pattern gives one module (input and output); a span gives a target whose ``output`` is the end module.
        Defaults are common names; the user's patterns follow ``config.common_structure``.
        """
        defaults = self.config.modified_modules is None
        return resolve_span_targets(
            self.backbone_model,
            self.default_modified_modules if defaults else self.config.modified_modules or [],
            self.config.exclude_modules,
            True if defaults else self.config.common_structure,
            defaults=defaults,
            method=type(self).__name__,
        )

    def _build_delta(self, target: Target) -> nn.Module:
        """The adapter from the target's input size (its start module's) to its output size (its end module's)."""
        end = target.output if target.output is not None else target
        in_features = self.features(target.module)[0]
        out_features = self.features(end.module)[1]
        if in_features < 1:
            raise UnsupportedTargetError(
                f"{type(self).__name__} needs a hidden-state input, but {target.name} "
                f"({type(target.module).__name__}) reads token ids; start the adapter at a later module"
            )
        return BottleneckAdapter(
            in_features,
            self.config.bottleneck_dim,
            self.config.non_linearity,
            out_features=out_features,
            residual=False,
            scale=self.config.scaled,
            **factory_kwargs(end.module),
        )

    @classmethod
    def translate_legacy_config(cls, config: dict[str, Any]) -> dict[str, Any]:
        """Read an OpenDelta 0.3.x config: flat pairs become spans, and ``scaled`` becomes the 1 it always ran with.

        The original paired ``modified_modules`` two by two, ``["attn", "attn", "ff.w1", "ff.w2"]``: a pair of equal
        patterns is one module, two different ones a span (``["attn", ["ff.w1", "ff.w2"]]`` here). It recorded
        ``scaled`` but never passed it to its layers, which always used 1.

        Raises:
            CheckpointError: an odd number of flat patterns, which the original could not pair either.
        """
        config = {**config, "scaled": 1.0}
        flat = config.get("modified_modules")
        if isinstance(flat, list) and all(isinstance(p, str) for p in flat):
            spans = spans_from_flat_pairs(flat)
            if spans is None:
                raise CheckpointError(
                    f"the OpenDelta 0.3.x parallel adapter config's modified_modules={flat!r} must pair its patterns "
                    f"two by two (start, end); pass modified_modules=[...] to from_finetuned"
                )
            config["modified_modules"] = spans
        return config

    def translate_legacy_state_dict(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Read an OpenDelta 0.3.x checkpoint: a span's adapter was saved under its first module, here its last."""
        renames = {
            f"{t.name}.{self.delta_name}.": f"{t.host_name}.{self.delta_name}." for t in self.targets if t.output
        }
        out = {}
        for name, tensor in tensors.items():
            prefix = next((p for p in renames if name.startswith(p)), None)
            out[renames[prefix] + name[len(prefix) :] if prefix else name] = tensor
        return out
