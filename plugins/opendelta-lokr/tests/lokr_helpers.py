"""What the PEFT oracle tests share: PEFT's LoKr on a copy of a tiny model, its factors copied into ours.

PEFT 0.21.2 builds LoKr on ``nn.Linear`` (and convolutions) only, not on GPT-2's ``Conv1D``; for GPT-2 the PEFT
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
RANK_PATTERNS = {"bert": {"value": 8}, "t5": {"wo": 2}, "gpt2": {"c_fc": 3}, "llama": {"q_proj": 8}}
"""With ``r=1`` and ``decompose_both``, a rank of 8 makes both factors full on a 32-wide layer, 2 or 3 only ``w1``."""
ALPHA_PATTERNS = {"bert": {"query": 6.0}, "t5": {}, "gpt2": {"c_attn": 5.0}, "llama": {"q_proj": 3.0}}
PREFIX = "base_model.model."
FACTORS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
OPTIONS = {"r": 1, "alpha": 6, "decompose_both": True}


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


def peft_lokr(model, arch, seed=0, **options):
    """PEFT's LoKr on a copy of ``model`` (``init_weights=True``), every factor perturbed so ``dW`` is not zero."""
    peft = __import__("peft")
    config = peft.LoKrConfig(
        target_modules=PEFT_TARGETS[arch],
        rank_pattern=RANK_PATTERNS[arch],
        alpha_pattern=ALPHA_PATTERNS[arch],
        **{**OPTIONS, **options},
    )
    peft_model = peft.get_peft_model(as_linear(copy.deepcopy(model)), config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lokr_" in name:
                param.add_(0.5 * torch.randn(param.shape, generator=generator))
    return peft_model.eval()


def ours_like_peft(model, arch, **options):
    from opendelta_lokr import LoKrModel

    return LoKrModel(
        model,
        modified_modules=PEFT_TARGETS[arch],
        rank_pattern=RANK_PATTERNS[arch],
        alpha_pattern=ALPHA_PATTERNS[arch],
        **{**OPTIONS, **options},
    )


def peft_factors(peft_model):
    """``{backbone module name: {factor: tensor}}`` of a PEFT LoKr model (the factors it has)."""
    out = {}
    for name, module in peft_model.named_modules():
        if hasattr(module, "lokr_w1") and "default" in module._available_adapters:
            key = name.removeprefix(PREFIX).removesuffix(".base_layer")
            out[key] = {f: getattr(module, f)["default"].detach() for f in FACTORS if "default" in getattr(module, f)}
    return out


def peft_factors_with_grads(peft_model):
    """``{backbone module name: {factor: parameter}}`` of a PEFT model, the parameters themselves (with ``.grad``)."""
    out = {}
    for name, module in peft_model.named_modules():
        if hasattr(module, "lokr_w1") and "default" in module._available_adapters:
            key = name.removeprefix(PREFIX).removesuffix(".base_layer")
            out[key] = {f: getattr(module, f)["default"] for f in FACTORS if "default" in getattr(module, f)}
    return out


def copy_factors(factors, delta_model):
    """Put PEFT's factors into ours: the same factors, of the same shapes, on the same modules."""
    placed = {t.name: i.delta for t, i in delta_model.placements()}
    assert set(factors) == set(placed), sorted(set(placed) ^ set(factors))
    with torch.no_grad():
        for name, delta in placed.items():
            assert {n for n, _ in delta.named_parameters()} == set(factors[name]), name
            for factor, value in factors[name].items():
                getattr(delta, factor).copy_(value)
