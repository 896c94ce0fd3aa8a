"""What the PEFT oracle tests share: PEFT's LN tuning on a copy of a tiny model, its trained norms as offsets."""

import copy
import warnings

import torch

from opendelta.testing import model_output_tensor, tiny_inputs, tiny_model

PEFT_TARGETS = {
    # arch: PEFT target_modules, real module names: every layer norm of the blocks and the stacks' final ones
    "bert": ["LayerNorm"],
    "t5": ["layer_norm", "final_layer_norm"],
    "gpt2": ["ln_1", "ln_2", "ln_f"],
    "llama": ["input_layernorm", "post_attention_layernorm", "norm"],
}
PREFIX = "base_model.model."


def fresh(arch):
    return tiny_model(arch).eval()


def run(model, arch):
    with torch.no_grad():
        return model_output_tensor(model(**tiny_inputs(arch)))


def peft_ln_tuning(model, arch, seed=0):
    """PEFT's LN tuning on a copy of ``model``, each trained copy's parameters set to ``p + 0.3 N(0, 1)``, in eval."""
    peft = __import__("peft")
    config = peft.LNTuningConfig(target_modules=PEFT_TARGETS[arch])
    with warnings.catch_warnings():  # PEFT's generic tuner warns that a norm is no linear layer: LN tuning's own case
        warnings.filterwarnings("ignore", "Unsupported layer type", UserWarning)
        peft_model = peft.get_peft_model(copy.deepcopy(model), config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "ln_tuning_layers" in name:
                param.add_(0.3 * torch.randn(param.shape, generator=generator))
    return peft_model.eval()


def peft_offsets(peft_model):
    """``{(backbone norm name, parameter): trained copy - original}`` of a PEFT LN tuning model."""
    out = {}
    for name, module in peft_model.named_modules():
        layers = getattr(module, "ln_tuning_layers", None)
        if layers is None or "default" not in layers:
            continue
        real = name.removeprefix(PREFIX)
        for param_name, param in layers["default"].named_parameters(recurse=False):
            original = getattr(module.base_layer, param_name)
            out[real, param_name] = (param - original).detach()
    return out


def copy_offsets(offsets, delta_model):
    """Put PEFT's trained changes into our offsets (every one of ours must have PEFT's counterpart)."""
    placed = {(t.name, t.parameter): i.delta for t, i in delta_model.placements()}
    assert set(placed) == set(offsets), sorted(set(placed) ^ set(offsets))
    with torch.no_grad():
        for key, delta in placed.items():
            delta.offset.copy_(offsets[key])
