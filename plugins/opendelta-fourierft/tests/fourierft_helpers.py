"""What the PEFT oracle tests share: PEFT's FourierFT on a copy of a tiny model, and its spectra copied into ours."""

import copy

import torch

from opendelta.testing import model_output_tensor, tiny_inputs, tiny_model

PEFT_TARGETS = {
    # arch: PEFT target_modules (real names): the attention's query and value projections (GPT-2's whole c_attn)
    "bert": ["query", "value"],
    "t5": ["q", "v"],
    "gpt2": ["c_attn"],
    "llama": ["q_proj", "v_proj"],
}
N_FREQUENCY = 200  # Llama's tiny v_proj has 16 x 32 = 512 entries
SCALING = 10.0  # a delta of a few percent of the tiny weights: not the identity, outputs stay of order one
PREFIX = "base_model.model."


def run(model, arch):
    with torch.no_grad():
        return model_output_tensor(model(**tiny_inputs(arch)))


def peft_fourierft(model, arch, seed=0, **options):
    """PEFT's FourierFT on a copy of the model, spectra at PEFT's ``N(0, 1)`` init plus ``0.5 N(0, 1)``, eval mode."""
    peft = __import__("peft")
    config = peft.FourierFTConfig(
        target_modules=PEFT_TARGETS[arch],
        n_frequency=N_FREQUENCY,
        scaling=SCALING,
        fan_in_fan_out=arch == "gpt2",  # GPT-2's Conv1D stores [in, out]; PEFT warns unless told
        **options,
    )
    torch.manual_seed(seed)  # PEFT draws its initial spectra from the global generator
    peft_model = peft.get_peft_model(copy.deepcopy(model), config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "fourierft_spectrum" in name:
                param.add_(0.5 * torch.randn(param.shape, generator=generator))
    return peft_model.eval()


def peft_layers(peft_model):
    """``{backbone module name: PEFT's FourierFT layer}``."""
    return {
        name.removeprefix(PREFIX): module
        for name, module in peft_model.named_modules()
        if hasattr(module, "fourierft_spectrum") and "default" in module.fourierft_spectrum
    }


def copy_spectra(peft_model, delta_model):
    """Put PEFT's spectra into ours (the same layers on both sides)."""
    layers = peft_layers(peft_model)
    placed = {t.name: i.delta for t, i in delta_model.placements()}
    assert set(placed) == set(layers), sorted(set(placed) ^ set(layers))
    with torch.no_grad():
        for name, delta in placed.items():
            delta.fourierft_spectrum.copy_(layers[name].fourierft_spectrum["default"])


def fresh(arch):
    return tiny_model(arch).eval()
