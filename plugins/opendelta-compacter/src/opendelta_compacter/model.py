"""``CompacterModel``: a hypercomplex (PHM) adapter after each targeted module."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from opendelta.plugin_api import SHARED_POSITIONALS, DeltaConfigError, DeltaModel, Target, factory_kwargs
from opendelta_compacter.config import CompacterConfig
from opendelta_compacter.layer import HyperComplexAdapterLayer, PHMFactors, PHMLinear, new_phm_rule, new_phm_weight

logger = logging.getLogger(__name__)


def bottleneck_size(hidden: int, reduction_factor: int, n: int) -> int:
    """``hidden // reduction_factor`` rounded up to a multiple of ``n`` (at least ``n``), so ``n`` blocks tile it.

    Equal to ``hidden // reduction_factor`` wherever the original worked (768 / 16 = 48 with n = 4); where it is
    not a multiple of ``n`` the original stopped with an assertion, and a tiny width (32 / 16 = 2) is lifted to ``n``.
    """
    size = hidden // reduction_factor
    return max(n, -(-size // n) * n)


@dataclass
class _Shared:
    """The tensors one delta model shares between its layers (``None``: each layer gets its own)."""

    rule: PHMFactors | None = None
    down: PHMFactors | None = None
    up: PHMFactors | None = None


class CompacterModel(DeltaModel):
    """Karimi Mahabadi et al., 2021, "Compacter" (https://arxiv.org/abs/2106.04647), manual section 1.21.5.

    ``CompacterModel(backbone_model=model, modified_modules=["fc2"], hypercomplex_division=4)`` puts a bottleneck
    adapter after each matched module whose two projections are PHM layers (:class:`PHMLinear`): the module's
    hidden-state output ``h`` becomes ``h + up(act(down(h)))``. By default they go after the attention's and the
    feed-forward's output projections (common names ``attn.proj``, ``ff.w2``), before the residual layer norm, as
    in the paper. The rule starts normal (std 0.01) and the blocks Glorot-uniform, so a fresh adapter is close to
    (not exactly) the identity, as in the original.

    With ``shared_phm_rule`` every projection of this delta model uses one phm rule; with ``shared_W_phm`` every
    down projection uses one set of blocks and every up projection another. A shared tensor is one
    ``nn.Parameter`` registered in several layers: trained, counted and frozen once, saved under each layer's name.
    """

    config_class = CompacterConfig
    default_modified_modules: ClassVar[tuple[str, ...]] = ("attn.proj", "ff.w2")
    insertion = "after"
    positional_args = (
        *SHARED_POSITIONALS,
        "reduction_factor",
        "non_linearity",
        "phm_c_init",
        "hypercomplex_division",
        "learn_phm",
        "hypercomplex_nonlinearity",
        "shared_phm_rule",
        "factorized_phm",
        "shared_W_phm",
        "factorized_phm_rule",
        "phm_rank",
        "phm_init_range",
        "kronecker_prod",
        "use_bias_up_sampler",
        "use_bias_down_sampler",
    )
    """The manual's positional order: ``CompacterModel(model, x)`` binds x to ``modified_modules``."""
    identity_at_init = False
    config: CompacterConfig
    _shared: _Shared | None = None

    def _build_delta(self, target: Target) -> nn.Module:
        """A :class:`HyperComplexAdapterLayer` sized for the target's output, using the shared tensors if any."""
        if self._shared is None:  # first target: check them all, before any is modified, and make shared tensors
            self._shared = self._check_and_share()
        cfg, shared = self.config, self._shared
        hidden = self.features(target.module)[1]
        bottleneck = bottleneck_size(hidden, cfg.reduction_factor, cfg.hypercomplex_division)
        kwargs = factory_kwargs(target.module)
        down = PHMLinear(
            hidden,
            bottleneck,
            shared.rule if shared.rule is not None else self._new_rule(kwargs),
            shared.down if shared.down is not None else self._new_weight(hidden, bottleneck, kwargs),
            bias=cfg.use_bias_down_sampler,
            kronecker_prod=cfg.kronecker_prod,
        )
        up = PHMLinear(
            bottleneck,
            hidden,
            shared.rule if shared.rule is not None else self._new_rule(kwargs),
            shared.up if shared.up is not None else self._new_weight(bottleneck, hidden, kwargs),
            bias=cfg.use_bias_up_sampler,
            kronecker_prod=cfg.kronecker_prod,
        )
        return HyperComplexAdapterLayer(down, up, cfg.non_linearity)

    def translate_legacy_state_dict(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Read an OpenDelta 0.3.x Compacter checkpoint, whose delta was named ``compactor``.

        The tensors inside it have the same names and shapes here (the original refused the shared options, so
        none are shared).
        """
        marker = f".{self.delta_name}."
        return {name.replace(".compactor.", marker, 1): tensor for name, tensor in tensors.items()}

    def _new_rule(self, kwargs: dict[str, Any]) -> PHMFactors:
        """A fresh phm rule as the config says (``kwargs``: device and dtype)."""
        cfg = self.config
        return new_phm_rule(
            cfg.hypercomplex_division,
            cfg.phm_c_init,
            factorized=cfg.factorized_phm_rule,
            learnable=cfg.learn_phm,
            **kwargs,
        )

    def _new_weight(self, in_features: int, out_features: int, kwargs: dict[str, Any]) -> PHMFactors:
        """Fresh blocks for an ``in_features -> out_features`` projection as the config says."""
        cfg = self.config
        return new_phm_weight(
            cfg.hypercomplex_division,
            in_features,
            out_features,
            cfg.hypercomplex_nonlinearity,
            factorized=cfg.factorized_phm,
            rank=cfg.phm_rank,
            init_range=cfg.phm_init_range,
            **kwargs,
        )

    def _check_and_share(self) -> _Shared:
        """Refuse targets whose sizes do not fit the config, then create the tensors the layers will share.

        Raises:
            DeltaConfigError: ``hypercomplex_division`` does not divide some target's hidden size, or
                ``shared_W_phm`` is asked for targets of different sizes. Nothing has been modified yet.
        """
        cfg, n = self.config, self.config.hypercomplex_division
        sizes = {t.name: self.features(t.module)[1] for t in self.targets}
        misfits = [f"{name} ({size})" for name, size in sizes.items() if size % n]
        if misfits:
            raise DeltaConfigError(
                f"CompacterConfig.hypercomplex_division={n} must divide the hidden size of every target, but these "
                f"modules output sizes it does not divide: {', '.join(misfits[:5])}"
                f"{'...' if len(misfits) > 5 else ''}. Choose a divisor of those sizes or other modified_modules."
            )
        for name, size in sizes.items():
            bottleneck = bottleneck_size(size, cfg.reduction_factor, n)
            if bottleneck != size // cfg.reduction_factor:
                logger.info("%s: bottleneck %d // %d rounded up to %d", name, size, cfg.reduction_factor, bottleneck)
        kwargs = factory_kwargs(self.targets[0].module)
        shared = _Shared(rule=self._new_rule(kwargs) if cfg.shared_phm_rule else None)
        if cfg.shared_W_phm:
            if len(set(sizes.values())) > 1:
                listed = ", ".join(f"{name} ({size})" for name, size in list(sizes.items())[:6])
                raise DeltaConfigError(
                    f"CompacterConfig.shared_W_phm=True shares one set of blocks between all targets, so they need "
                    f"the same hidden size, but they differ: {listed}. Target modules of one size, or set "
                    f"shared_W_phm=False."
                )
            hidden = next(iter(sizes.values()))
            bottleneck = bottleneck_size(hidden, cfg.reduction_factor, n)
            shared.down = self._new_weight(hidden, bottleneck, kwargs)
            shared.up = self._new_weight(bottleneck, hidden, kwargs)
        return shared
