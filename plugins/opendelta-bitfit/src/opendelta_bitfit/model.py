"""``BitFitModel``: a trainable bias after every linear layer and layer norm inside the targeted modules.

BitFit "broadcasts to submodules" (manual section 1.21.2): targeting ``attn`` means every position inside the
attention that has, or could have, a bias. That happens twice here:

* in common-name space (core's ``cover_common_scopes``): ``ff`` designates every module whose common name
  lies under a ``...ff`` name, even where the architecture has no single feed-forward module (BERT's ``ff.w1`` is
  ``intermediate.dense``, outside ``output``, the module named ``ff``; BART's ``fc1``/``fc2`` are children of the
  layer itself);
* in real-module space (:meth:`BitFitModel._expand_target`): a designated container yields every ``nn.Linear``,
  transformers ``Conv1D`` and layer norm inside it.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from opendelta.plugin_api import (
    SHARED_POSITIONALS,
    CheckpointError,
    DeltaModel,
    Target,
    backbone_submodules,
    factory_kwargs,
    is_expert_list,
    is_linear,
    is_norm,
)
from opendelta_bitfit.config import BitFitConfig
from opendelta_bitfit.layer import BiasDelta


def is_bias_site(module: nn.Module) -> bool:
    """Whether BitFit adds a bias to ``module``: a linear layer (``nn.Linear``, ``Conv1D``) or a layer norm."""
    return is_linear(module) or is_norm(module)


class BitFitModel(DeltaModel):
    """BitFit on a backbone (manual section 1.21.2): a trainable bias on every linear layer and layer norm.

    ``BitFitModel(backbone_model=model)`` covers, by default, everything in the attention and feed-forward blocks,
    every layer norm the common structure names, and the LM head's projection (common names ``attn``, ``ff``,
    ``layer_norm``, ``lm_head.proj``). ``modified_modules=["attention"]`` covers every linear layer and layer norm
    inside each module named ``...attention``.

    Each covered layer gets a :class:`~opendelta_bitfit.BiasDelta` run after it (child name ``bitfit``): its output
    ``h`` becomes ``h + bias``, with ``bias`` starting at zero. The backbone's own biases and their
    ``requires_grad`` are never touched, unlike the original, which unfroze them in place and created ``bias``
    parameters on bias-less layers: so ``detach()`` gives back the backbone exactly, ``attach()`` restores the
    trained deltas, and BitFit composes with other deltas, a second BitFit included. Train it with
    ``freeze_module(exclude=["deltas", ...])`` like any other method.
    """

    config_class = BitFitConfig
    default_modified_modules: ClassVar[tuple[str, ...]] = ("attn", "ff", "layer_norm", "lm_head.proj")
    insertion = "after"
    positional_args = SHARED_POSITIONALS
    """The manual's positional order: ``BitFitModel(model, x)`` binds x to ``modified_modules``."""
    supports_fused_targets = True
    combines_linearly = True
    """Biases add to the output, so ``combine_deltas`` sums them weighted."""
    cover_common_scopes = True  # ``ff`` covers BERT's intermediate.dense and BART's fc1/fc2, which no ``ff`` holds
    identity_at_init = True
    config: BitFitConfig

    def _expand_target(self, target: Target) -> list[Target]:
        """A linear layer or layer norm is itself; another module yields those inside it (core drops excluded ones).

        With the default targets, the routed experts of a sparse mixture-of-experts block are left alone (see
        :meth:`_enters`); named ones (``modified_modules=["ff.experts"]``) are covered like any other module.
        """
        if is_bias_site(target.module):
            return [target]
        if not self._enters(target.name, target.module):
            return []
        found = backbone_submodules(target.module, target.name, is_bias_site, self._enters)
        return [Target(name, module) for name, module in found]

    def _enters(self, name: str, module: nn.Module) -> bool:
        """Whether the defaults reach inside ``module``: not into a list of experts (transformers 4.57's).

        Each expert's bias would train only on the tokens routed to it, and transformers 5 stores the experts as
        stacked weights with no layer to put a bias after: so on both lines the defaults cover the block around the
        experts (its router where that is a linear layer, Qwen2-MoE's shared expert, the norms), not the experts.
        """
        return self.config.modified_modules is not None or not is_expert_list(name, module)

    def _build_delta(self, target: Target) -> nn.Module:
        """A zero bias as wide as the layer's output (Linear/Conv1D ``out_features``, a norm's size)."""
        _in, out_features = self.features(target.module)
        return BiasDelta(
            out_features,
            target.output_index(out_features),
            **factory_kwargs(target.module),
        )

    def translate_legacy_state_dict(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Read an OpenDelta 0.3.x BitFit checkpoint: the trained biases become this model's deltas.

        The original trained each layer's own bias in place (creating it where a linear layer had none) and saved it
        under the backbone's name (``...query.bias``); here the backbone keeps its bias and the delta is what training
        added, ``saved - backbone``, so ``detach()`` gives back the untouched backbone. A bias the original added
        after another kind of module was already named ``<module>.bitfit.bias``, as here.

        Raises:
            CheckpointError: a fused layer's saved bias changed outside the slices this delta covers.
        """
        out = dict(tensors)
        params = dict(self.backbone_model.named_parameters())
        for target, insertion in self.placements():
            saved = out.pop(f"{target.name}.bias", None)
            if saved is None:
                continue
            own = params.get(f"{target.name}.bias")
            delta = saved.to(own.dtype) - own.detach().cpu() if own is not None else saved
            index = insertion.delta.out_index
            if index is not None:
                outside = torch.ones(delta.numel(), dtype=torch.bool)
                outside[index.cpu()] = False
                if delta[outside].any():
                    raise CheckpointError(
                        f"the OpenDelta 0.3.x checkpoint changes {target.name}.bias outside the slices "
                        f"{target.parts} of {target.num_parts} this BitFit covers; load it with modified_modules "
                        f"naming the whole module"
                    )
                delta = delta[index.cpu()]
            out[f"{target.name}.{self.delta_name}.bias"] = delta
        return out
