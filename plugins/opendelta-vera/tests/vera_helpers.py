"""What the PEFT oracle tests share: PEFT's VeRA on a copy of a tiny model, and its vectors copied into ours."""

import copy

import torch

from opendelta.testing import model_output_tensor, tiny_inputs, tiny_model

R = 8
PEFT_TARGETS = {
    # arch: PEFT target_modules (real names), layers of different sizes so that each reads other slices
    "bert": ["query", "value", "intermediate.dense", "output.dense"],
    "t5": ["q", "v", "wo"],
    "gpt2": ["c_attn", "mlp.c_proj"],
    "llama": ["q_proj", "v_proj", "down_proj"],
}
PREFIX = "base_model.model."


def run(model, arch):
    with torch.no_grad():
        return model_output_tensor(model(**tiny_inputs(arch)))


def peft_vera(model, arch, seed=0, **options):
    """PEFT's VeRA on a copy of ``model``, its vectors moved off the identity start, in eval mode."""
    peft = __import__("peft")
    config = peft.VeraConfig(
        r=R,
        target_modules=PEFT_TARGETS[arch],
        fan_in_fan_out=arch == "gpt2",  # GPT-2's Conv1D stores [in, out]; PEFT warns unless told
        **options,
    )
    peft_model = peft.get_peft_model(copy.deepcopy(model), config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "vera_lambda" in name:
                param.add_(torch.randn(param.shape, generator=generator))
    return peft_model.eval()


def peft_vectors(peft_model):
    """``{backbone module name: (lambda_b, lambda_d)}`` of a PEFT VeRA model."""
    out = {}
    for name, module in peft_model.named_modules():
        if hasattr(module, "vera_lambda_b") and "default" in module.vera_lambda_b:
            key = name.removeprefix(PREFIX).removesuffix(".base_layer")
            out[key] = (module.vera_lambda_b["default"].detach(), module.vera_lambda_d["default"].detach())
    return out


def peft_projections(peft_model):
    base = peft_model.base_model
    return base.vera_A["default"], base.vera_B["default"]


def copy_vectors(vectors, delta_model):
    """Put PEFT's vectors into ours (the covered rows only where ours covers part of a fused layer)."""
    placed = {t.name: i.delta for t, i in delta_model.placements()}
    assert set(vectors) >= set(placed), sorted(set(placed) - set(vectors))
    with torch.no_grad():
        for name, delta in placed.items():
            lambda_b, lambda_d = vectors[name]
            delta.vera_lambda_b.copy_(lambda_b if delta.out_index is None else lambda_b[delta.out_index])
            delta.vera_lambda_d.copy_(lambda_d)


def fresh(arch):
    return tiny_model(arch).eval()


def max_error(a, b):
    return (a - b).abs().max().item()
