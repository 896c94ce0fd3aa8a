"""What the PEFT oracle tests share: PEFT's IA3 on a copy of a tiny model, and its vectors copied into ours."""

import copy

import torch

from opendelta.testing import model_output_tensor, tiny_inputs, tiny_model

PEFT_TARGETS = {
    # arch: (PEFT target_modules, PEFT feedforward_modules), real module names, as PEFT's own defaults say
    "bert": (["key", "value", "output.dense"], ["output.dense"]),
    "t5": (["k", "v", "wo"], ["wo"]),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
}
PREFIX = "base_model.model."


def run(model, arch):
    with torch.no_grad():
        return model_output_tensor(model(**tiny_inputs(arch)))


def peft_ia3(model, arch, seed=0):
    """PEFT's IA3 on a copy of ``model``, its vectors drawn near one (``1 + 0.3 N(0, 1)``), in eval mode."""
    peft = __import__("peft")
    targets, feedforward = PEFT_TARGETS[arch]
    config = peft.IA3Config(
        target_modules=targets,
        feedforward_modules=feedforward,
        init_ia3_weights=False,
        fan_in_fan_out=arch == "gpt2",  # GPT-2's Conv1D stores [in, out]; PEFT warns unless told
    )
    peft_model = peft.get_peft_model(copy.deepcopy(model), config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "ia3_l" in name:
                param.copy_(1 + 0.3 * torch.randn(param.shape, generator=generator))
    return peft_model.eval()


def peft_vectors(peft_model):
    """``{backbone module name: flat vector}`` of a PEFT IA3 model."""
    out = {}
    for name, module in peft_model.named_modules():
        if hasattr(module, "ia3_l") and "default" in module.ia3_l:
            out[name.removeprefix(PREFIX).removesuffix(".base_layer")] = module.ia3_l["default"].detach().flatten()
    return out


def copy_vectors(vectors, delta_model):
    """Put PEFT's vectors into ours (the k/v slices only where ours covers part of a fused layer)."""
    placed = {t.name: i.delta for t, i in delta_model.placements()}
    assert set(vectors) >= set(placed), sorted(set(placed) - set(vectors))
    with torch.no_grad():
        for name, delta in placed.items():
            full = vectors[name]
            delta.ia3_l.copy_(full if delta.out_index is None else full[delta.out_index])


def fresh(arch):
    return tiny_model(arch).eval()
