"""``LowRankAdapterModel``: a low-rank adapter after each targeted module."""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from opendelta.plugin_api import SHARED_POSITIONALS, DeltaConfigError, DeltaModel, Target, factory_kwargs
from opendelta_low_rank_adapter.config import LowRankAdapterConfig
from opendelta_low_rank_adapter.layer import LowRankAdapter


class LowRankAdapterModel(DeltaModel):
    """The low-rank adapter, the baseline of Compacter (Karimi Mahabadi et al., 2021; manual section 1.21.4).

    ``LowRankAdapterModel(backbone_model=model, modified_modules=["fc2"], reduction_factor=12)`` turns each
    targeted module's hidden-state output ``h`` (a tensor, or the first element of a tuple / ModelOutput) into
    ``h + up(act(down(h)))``, where both projections have rank-``low_rank_rank`` weights and the bottleneck is
    ``hidden // reduction_factor`` wide. By default the adapters go after the attention's and the feed-forward's
    output projections (common names ``attn.proj``, ``ff.w2``), before the residual layer norm. Any module with a
    hidden-state output can be targeted: its size is read from its type, or measured by one pseudo forward pass.
    A fresh adapter is exactly the identity.
    """

    config_class = LowRankAdapterConfig
    default_modified_modules: ClassVar[tuple[str, ...]] = ("attn.proj", "ff.w2")
    insertion = "after"
    positional_args = (
        "reduction_factor",
        "non_linearity",
        "low_rank_w_init",
        "low_rank_rank",
        *SHARED_POSITIONALS,
    )
    """The manual's positional order: ``LowRankAdapterModel(model, x)`` binds x to ``reduction_factor``."""
    identity_at_init = True
    config: LowRankAdapterConfig

    def _build_delta(self, target: Target) -> nn.Module:
        _in, hidden = self.features(target.module)
        bottleneck = hidden // self.config.reduction_factor
        if bottleneck < 1:
            raise DeltaConfigError(
                f"{type(self).__name__}: reduction_factor={self.config.reduction_factor} leaves no bottleneck for "
                f"{target.name} ({type(target.module).__name__}), whose hidden size is {hidden}: "
                f"{hidden} // {self.config.reduction_factor} = 0. Use a reduction_factor of at most {hidden}."
            )
        return LowRankAdapter(
            hidden,
            bottleneck,
            rank=self.config.low_rank_rank,
            w_init=self.config.low_rank_w_init,
            non_linearity=self.config.non_linearity,
            **factory_kwargs(target.module),
        )
