"""What the PEFT oracle tests share: PEFT's LoHa on a copy of a tiny model, its factors copied into ours.

PEFT 0.21.2 builds LoHa on ``nn.Linear`` (and convolutions) only, not on GPT-2's ``Conv1D``; for GPT-2 the PEFT
copy has its ``Conv1D`` targets turned into the equal ``nn.Linear`` (weight transposed), so the oracle still checks
ours on the real ``Conv1D``.
"""

import copy

import torch
from torch import nn

from opendelta.testing import model_output_tensor, tiny_inputs, tiny_model

PEFT_TARGETS = {  # arch: PEFT target_modules (real names)
    "bert": ["query", "value", "intermediate.dense"],
    "t5": ["q", "v", "wo"],
    "gpt2": ["c_attn", "c_fc"],
    "llama": ["q_proj", "v_proj", "down_proj"],
}
RANK_PATTERNS = {"bert": {"value": 3}, "t5": {"wo": 2}, "gpt2": {"c_fc": 3}, "llama": {"down_proj": 2}}
ALPHA_PATTERNS = {"bert": {"query": 6.0}, "t5": {}, "gpt2": {"c_attn": 5.0}, "llama": {"q_proj": 3.0}}
PREFIX = "base_model.model."
FACTORS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


def run(model, arch):
    with torch.no_grad():
        return model_output_tensor(model(**tiny_inputs(arch)))


def fresh(arch):
    return tiny_model(arch).eval()


def as_linear(model):
    """``model`` with every transformers ``Conv1D`` replaced by the ``nn.Linear`` computing the same (in place)."""
    for name, module in list(model.named_modules()):
        if type(module).__name__ == "Conv1D":
            linear = nn.Linear(module.weight.shape[0], module.weight.shape[1])
            with torch.no_grad():
                linear.weight.copy_(module.weight.t())
                linear.bias.copy_(module.bias)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, linear)
    return model


def peft_loha(model, arch, seed=0, **options):
    """PEFT's LoHa on a copy of ``model`` (``init_weights=True``), every factor perturbed so ``dW`` is not zero."""
    peft = __import__("peft")
    config = peft.LoHaConfig(
        target_modules=PEFT_TARGETS[arch],
        r=4,
        alpha=6,
        rank_pattern=RANK_PATTERNS[arch],
        alpha_pattern=ALPHA_PATTERNS[arch],
        **options,
    )
    peft_model = peft.get_peft_model(as_linear(copy.deepcopy(model)), config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "hada_" in name:
                param.add_(0.3 * torch.randn(param.shape, generator=generator))
    return peft_model.eval()


def ours_like_peft(model, arch, **options):
    from opendelta_loha import LoHaModel

    return LoHaModel(
        model,
        modified_modules=PEFT_TARGETS[arch],
        r=4,
        alpha=6,
        rank_pattern=RANK_PATTERNS[arch],
        alpha_pattern=ALPHA_PATTERNS[arch],
        **options,
    )


def peft_factors(peft_model):
    """``{backbone module name: {factor: tensor}}`` of a PEFT LoHa model."""
    out = {}
    for name, module in peft_model.named_modules():
        if hasattr(module, "hada_w1_a") and "default" in module.hada_w1_a:
            key = name.removeprefix(PREFIX).removesuffix(".base_layer")
            out[key] = {f: getattr(module, f)["default"].detach() for f in FACTORS}
    return out


def peft_factors_with_grads(peft_model):
    """``{backbone module name: {factor: parameter}}`` of a PEFT model, the parameters themselves (with ``.grad``)."""
    out = {}
    for name, module in peft_model.named_modules():
        if hasattr(module, "hada_w1_a") and "default" in module._available_adapters:
            key = name.removeprefix(PREFIX).removesuffix(".base_layer")
            out[key] = {f: getattr(module, f)["default"] for f in FACTORS if "default" in getattr(module, f)}
    return out


def copy_factors(factors, delta_model):
    """Put PEFT's factors into ours (the addressed rows only where ours covers part of a fused layer)."""
    placed = {t.name: i.delta for t, i in delta_model.placements()}
    assert set(factors) == set(placed), sorted(set(placed) ^ set(factors))
    with torch.no_grad():
        for name, delta in placed.items():
            for factor, value in factors[name].items():
                rows = factor.endswith("_a") and delta.out_index is not None
                getattr(delta, factor).copy_(value[delta.out_index] if rows else value)
