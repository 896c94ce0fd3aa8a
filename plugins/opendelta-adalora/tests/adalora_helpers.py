"""What the PEFT oracle tests share: PEFT's AdaLoRA on a copy of a tiny model, and its tensors copied into ours."""

import copy

import torch

from opendelta.testing import model_output_tensor, tiny_inputs, tiny_model
from opendelta_adalora import AdaLoraModel

PEFT_TARGETS = {  # arch: PEFT target_modules, real module names (GPT-2's whole fused c_attn)
    "bert": ["query", "value"],
    "t5": ["q", "v"],
    "gpt2": ["c_attn"],
    "llama": ["q_proj", "v_proj"],
}
ARCHS = tuple(PEFT_TARGETS)
PREFIX = "base_model.model."
SCHEDULE = {"init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 2, "deltaT": 1, "total_step": 8, "lora_alpha": 16}
"""Small enough to allocate in a few steps: the budget falls from 4 to 2 per layer over steps 2..6."""


def run(model, arch):
    with torch.no_grad():
        return model_output_tensor(model(**tiny_inputs(arch)))


def fresh(arch):
    return tiny_model(arch).eval()


def labelled(arch, seed=0):
    """Inputs with labels, so the model returns a loss (PEFT's AdaLoRA adds its regulariser to that loss)."""
    inputs = tiny_inputs(arch, seed=seed)
    labels = inputs["input_ids"].clone() if arch == "t5" else torch.tensor([0, 1])
    return {**inputs, "labels": labels}


def peft_adalora(model, arch, seed=0, **schedule):
    """PEFT's AdaLoRA on a copy of ``model``, every ``A``, ``E``, ``B`` redrawn (``E`` not zero), in eval mode."""
    peft = __import__("peft")
    config = peft.AdaLoraConfig(
        target_modules=PEFT_TARGETS[arch],
        fan_in_fan_out=arch == "gpt2",  # GPT-2's Conv1D stores [in, out]; PEFT warns unless told
        **{**SCHEDULE, **schedule},
    )
    peft_model = peft.get_peft_model(copy.deepcopy(model), config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if any(f"{part}.default" in name for part in ("lora_A", "lora_E", "lora_B")):
                param.copy_(0.3 * torch.randn(param.shape, generator=generator))
    return peft_model.eval()


def peft_layers(peft_model):
    """``{backbone module name: PEFT's SVD layer}``."""
    return {
        name.removeprefix(PREFIX): module
        for name, module in peft_model.named_modules()
        if isinstance(getattr(module, "lora_E", None), torch.nn.ParameterDict) and "default" in module.lora_E
    }


def ours_like_peft(arch, model, **schedule):
    """Ours on PEFT's targets with PEFT's schedule, the backbone frozen (as PEFT freezes its copy)."""
    delta_model = AdaLoraModel(model, modified_modules=PEFT_TARGETS[arch], **{**SCHEDULE, **schedule})
    delta_model.freeze_module(exclude=["deltas"], set_state_dict=False)
    return delta_model


def copy_from_peft(peft_model, delta_model):
    """Put PEFT's ``A``, ``E``, ``B`` into ours (the q/v rows only where ours covers slices of a fused layer)."""
    theirs = peft_layers(peft_model)
    ours = delta_model.adalora_layers()
    assert set(theirs) >= set(ours), sorted(set(ours) - set(theirs))
    with torch.no_grad():
        for name, layer in ours.items():
            for part in ("lora_A", "lora_E", "lora_B"):
                value = getattr(theirs[name], part)["default"]
                if part == "lora_B" and layer.out_index is not None:
                    value = value[layer.out_index]
                getattr(layer, part).copy_(value)


def max_error(a, b):
    return (a - b).abs().max().item()
