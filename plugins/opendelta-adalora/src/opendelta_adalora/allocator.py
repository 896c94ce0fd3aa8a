"""The rank allocator: scores every singular triplet and masks the least important ones to a falling budget.

AdaLoRA's section 3 (Zhang et al., 2023), as PEFT 0.21.2's ``RankAllocator`` computes it. Each step, every entry
``w`` of ``A``, ``E`` and ``B`` gets its sensitivity ``I = |w * grad|``, smoothed (``beta1``) and with its
uncertainty ``|I - I_bar|`` smoothed too (``beta2``); an entry's score is their product. A triplet's score is its
``E`` entry's plus the means of its ``A`` row and ``B`` column. The budget (the total rank of all layers) falls
cubically from ``init_r`` per layer to ``target_r`` per layer between step ``tinit`` and ``total_step - tfinal``;
every ``deltaT`` steps the triplets scoring at or below the ``(init - budget)``-th smallest score have ``E`` zeroed.

Knows nothing of the model: it is given the layers (by name) and their parameters, so the delta model decides
what is scored.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from opendelta_adalora.config import AdaLoraConfig
from opendelta_adalora.layer import AdaLoraLayer

_PARTS = ("lora_A", "lora_E", "lora_B")


class RankAllocator:
    """The importance scores and the budget schedule of one AdaLoRA training run.

    Args:
        config: the schedule (``tinit``, ``tfinal``, ``total_step``, ``deltaT``, ``target_r``, ``beta1``, ``beta2``).
        layers: the layers to allocate among, by module name; the initial budget is their current total rank.
    """

    def __init__(self, config: AdaLoraConfig, layers: Mapping[str, AdaLoraLayer]) -> None:
        self.config = config
        self.init_bgt = sum(layer.r for layer in layers.values())
        self.target_bgt = config.target_r * len(layers)
        self.reset_ipt()

    def reset_ipt(self) -> None:
        """Forget the smoothed scores (done once the ranks are fixed, as PEFT does)."""
        self.exp_avg_ipt: dict[str, torch.Tensor] = {}
        self.exp_avg_unc: dict[str, torch.Tensor] = {}

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """``(budget, whether to mask at this step)``: constant, then cubic, then ``target_r`` per layer."""
        tinit, tfinal, total = self.config.tinit, self.config.tfinal, self.config.total_step
        assert total is not None  # checked by the caller
        if step <= tinit:
            return self.init_bgt, False
        if step > total - tfinal:
            return self.target_bgt, True
        mul_coeff = 1 - (step - tinit) / (total - tfinal - tinit)
        budget = int((self.init_bgt - self.target_bgt) * (mul_coeff**3) + self.target_bgt)
        return budget, step % self.config.deltaT == 0

    @torch.no_grad()
    def update_ipt(self, layers: Mapping[str, AdaLoraLayer]) -> None:
        """Smooth each entry's sensitivity ``|w * grad|`` and its uncertainty (a missing gradient counts as zero)."""
        beta1, beta2 = self.config.beta1, self.config.beta2
        for name, layer in layers.items():
            for part in _PARTS:
                param = getattr(layer, part)
                key = f"{name}.{part}"
                if key not in self.exp_avg_ipt:
                    self.exp_avg_ipt[key] = torch.zeros_like(param)
                    self.exp_avg_unc[key] = torch.zeros_like(param)
                grad = param.grad if param.grad is not None else torch.zeros_like(param)
                ipt = (param * grad).abs().detach()
                self.exp_avg_ipt[key] = beta1 * self.exp_avg_ipt[key] + (1 - beta1) * ipt
                self.exp_avg_unc[key] = (
                    beta2 * self.exp_avg_unc[key] + (1 - beta2) * (ipt - self.exp_avg_ipt[key]).abs()
                )

    def _score(self, key: str) -> torch.Tensor:
        return self.exp_avg_ipt[key] * self.exp_avg_unc[key]

    def triplet_scores(self, layers: Mapping[str, AdaLoraLayer]) -> dict[str, torch.Tensor]:
        """Each layer's ``(r,)`` triplet scores: ``E``'s score plus the mean scores of ``A``'s row, ``B``'s column."""
        scores = {}
        for name in layers:
            row = self._score(f"{name}.lora_A").mean(dim=1, keepdim=True)  # (r, 1)
            column = self._score(f"{name}.lora_B").mean(dim=0, keepdim=False).view(-1, 1)  # (r, 1)
            vectors = torch.cat([row, column], dim=1).sum(dim=1, keepdim=False)  # (r,)
            scores[name] = self._score(f"{name}.lora_E").view(-1) + vectors.view(-1)
        return scores

    @torch.no_grad()
    def mask_to_budget(self, layers: Mapping[str, AdaLoraLayer], budget: int) -> dict[str, list[bool]]:
        """Zero ``E`` of every triplet scoring at or below the ``(init - budget)``-th smallest score.

        Returns:
            The kept flags of each layer's triplets (in the layer's own order). With nothing to remove (a budget of
            the initial rank) every triplet is kept; PEFT fails there instead.
        """
        scores = self.triplet_scores(layers)
        k = self.init_bgt - budget
        if k <= 0 or not scores:
            return {name: [True] * layer.r for name, layer in layers.items()}
        threshold = torch.kthvalue(torch.cat(list(scores.values())), k=k)[0].item()
        kept = {}
        for name, layer in layers.items():
            drop = scores[name].view(-1, 1) <= threshold  # (r, 1)
            layer.lora_E.masked_fill_(drop, 0.0)
            kept[name] = (~drop).view(-1).tolist()
        return kept
