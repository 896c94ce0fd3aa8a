"""What the PEFT oracle tests share: PEFT's OFT/BOFT on a copy of a tiny model, and its parameters copied into ours.

PEFT 0.21.2 puts OFT and BOFT on ``nn.Linear`` only, so for GPT-2 (whose projections are ``Conv1D``) PEFT runs on a
copy whose ``Conv1D`` layers are equivalent ``nn.Linear`` ones (same names, the weight transposed): the same model.
"""

import copy
import warnings

import torch
from torch import nn

from opendelta.testing import model_output_tensor, tiny_inputs, tiny_model

PEFT_TARGETS = {
    # arch: PEFT target_modules, real module names (the query and value projections, GPT-2's fused c_attn)
    "bert": ["query", "value"],
    "t5": ["q", "v"],
    "gpt2": ["c_attn"],
    "llama": ["q_proj", "v_proj"],
}
PREFIX = "base_model.model."


def run(model, arch):
    with torch.no_grad():
        return model_output_tensor(model(**tiny_inputs(arch)))


def fresh(arch):
    return tiny_model(arch).eval()


def max_error(a, b):
    return (a - b).abs().max().item()


def linear_copy(model):
    """A deep copy of ``model`` whose transformers ``Conv1D`` layers are ``nn.Linear`` ones computing the same."""
    from transformers.pytorch_utils import Conv1D

    twin = copy.deepcopy(model)
    for name, module in list(twin.named_modules()):
        if isinstance(module, Conv1D):
            in_features, out_features = module.weight.shape
            linear = nn.Linear(in_features, out_features)
            with torch.no_grad():
                linear.weight.copy_(module.weight.t())
                linear.bias.copy_(module.bias)
            parent, _, child = name.rpartition(".")
            setattr(twin.get_submodule(parent), child, linear)
    return twin


def quiet(call, *args, **kwargs):
    """PEFT's own warnings (BOFT's missing CUDA extension...) are not what these tests check."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return call(*args, **kwargs)


def perturb(peft_model, names, seed, scale=0.1, around=None):
    """Redraw PEFT's adapter parameters whose name contains one of ``names``: ``around + scale N(0, 1)``."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if any(n in name for n in names):
                noise = scale * torch.randn(param.shape, generator=generator)
                param.copy_(noise + (around.get(next(n for n in names if n in name), 0.0) if around else 0.0))
    return peft_model


def peft_oft(model, arch, seed=0, **options):
    """PEFT's OFT on a linear copy of ``model``, its skew parameters drawn from ``0.1 N(0, 1)``, in eval mode."""
    peft = __import__("peft")
    config = peft.OFTConfig(target_modules=PEFT_TARGETS[arch], **{"oft_block_size": 8, **options})
    peft_model = quiet(peft.get_peft_model, linear_copy(model), config)
    return perturb(peft_model, ["oft_R"], seed).eval()


def peft_oft_blocks(peft_model):
    """``{backbone module name: oft_R weight}`` of a PEFT OFT model."""
    out = {}
    for name, module in peft_model.named_modules():
        if hasattr(module, "oft_R") and "default" in module.oft_R:
            out[name.removeprefix(PREFIX).removesuffix(".base_layer")] = module.oft_R["default"].weight.detach()
    return out


def copy_oft(blocks, delta_model):
    placed = {t.name: i.delta for t, i in delta_model.placements()}
    assert set(blocks) == set(placed), sorted(set(placed) ^ set(blocks))
    with torch.no_grad():
        for name, delta in placed.items():
            delta.oft_R.copy_(blocks[name])
