"""``AdapterModel``: a bottleneck adapter after each targeted module."""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from opendelta.plugin_api import SHARED_POSITIONALS, BottleneckAdapter, DeltaModel, Target, factory_kwargs
from opendelta_adapter.config import AdapterConfig


class AdapterModel(DeltaModel):
    """Houlsby et al., 2019, "Parameter-Efficient Transfer Learning for NLP" (https://arxiv.org/abs/1902.00751).

    Each targeted module's hidden-state output ``h`` becomes ``h + up(act(down(h)))``. By default the adapters go
    after the attention's and the feed-forward's output projections (common names ``attn.proj``, ``ff.w2``), that is
    before the residual layer norm, as in the paper. Weights start normal with std 0.01 and biases at zero, so a
    fresh adapter is close to, not exactly, the identity.
    """

    config_class = AdapterConfig
    default_modified_modules: ClassVar[tuple[str, ...]] = ("attn.proj", "ff.w2")
    insertion = "after"
    positional_args = (
        "bottleneck_dim",
        "non_linearity",
        *SHARED_POSITIONALS,
    )
    """The manual's positional order: ``AdapterModel(model, x)`` binds x to ``bottleneck_dim``."""
    identity_at_init = False
    config: AdapterConfig

    def _build_delta(self, target: Target) -> nn.Module:
        _in, hidden = self.features(target.module)
        return BottleneckAdapter(
            hidden, self.config.bottleneck_dim, self.config.non_linearity, **factory_kwargs(target.module)
        )
