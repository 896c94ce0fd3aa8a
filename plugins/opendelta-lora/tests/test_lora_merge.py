"""Merging LoRA into the weights: W + (alpha/r) B A on Linear and GPT-2's transposed, fused Conv1D."""

import pytest
import torch
import transformers

from opendelta.testing import ARCHITECTURES, model_output_tensor, perturb, tiny_inputs, tiny_model
from opendelta_lora import LoraModel


def run(model, arch):
    with torch.no_grad():
        return model_output_tensor(model(**tiny_inputs(arch)))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_merged_equals_attached_and_unmerge_restores_the_weights(arch):
    model = tiny_model(arch)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    delta_model = LoraModel(backbone_model=model, lora_r=4)
    perturb(delta_model, scale=0.2)
    attached = run(model, arch)
    assert delta_model.merge(safe_merge=True) == len(delta_model.targets)
    assert not any(hasattr(m, "lora") for m in model.modules())
    torch.testing.assert_close(run(model, arch), attached, rtol=1e-5, atol=1e-5)
    delta_model.unmerge()
    torch.testing.assert_close(run(model, arch), attached, rtol=1e-5, atol=1e-5)
    for name, value in weights.items():
        torch.testing.assert_close(model.state_dict()[name], value, rtol=1e-6, atol=1e-6)


def test_gpt2_merge_writes_only_the_q_and_v_columns_of_the_transposed_c_attn():
    model = tiny_model("gpt2")
    c_attn = model.transformer.h[0].attn.c_attn
    before = c_attn.weight.clone()  # (in, 3 * hidden)
    delta_model = LoraModel(backbone_model=model)
    perturb(delta_model)
    expected = before + c_attn.lora.delta_weight().t()
    delta_model.merge()
    torch.testing.assert_close(c_attn.weight, expected)
    assert torch.equal(c_attn.weight[:, 32:64], before[:, 32:64]), "the k columns are untouched"


def test_merge_and_unload_gives_a_plain_model_that_reloads_with_the_same_outputs(tmp_path):
    model = tiny_model("bart", "BartForConditionalGeneration")
    delta_model = LoraModel(backbone_model=model)
    perturb(delta_model, scale=0.2)
    delta_model.freeze_module(set_state_dict=True)
    attached = run(model, "bart")
    plain = delta_model.merge_and_unload()
    plain.save_pretrained(tmp_path / "merged")
    reloaded = transformers.BartForConditionalGeneration.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(run(reloaded, "bart"), attached, rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # transformers 4.57's GPT-2 under dynamo, not ours
def test_lora_compiles_without_graph_breaks_with_and_without_autograd():
    model = tiny_model("gpt2")
    perturb(LoraModel(backbone_model=model))
    inputs = tiny_inputs("gpt2")
    assert torch._dynamo.explain(model)(**inputs).graph_break_count == 0
    with torch.no_grad():
        assert torch._dynamo.explain(model)(**inputs).graph_break_count == 0


def test_merge_into_a_square_conv1d_transposes_the_update():
    """GPT-2's attention c_proj is a Conv1D of [in, out] = [n, n]: equal shapes must not skip the transpose."""
    from opendelta.testing import perturb, tiny_inputs, tiny_model

    model = tiny_model("gpt2")
    weight = model.transformer.h[0].attn.c_proj.weight
    assert weight.shape[0] == weight.shape[1]
    delta_model = LoraModel(backbone_model=model, modified_modules=["attn.c_proj"])
    perturb(delta_model)
    inputs = tiny_inputs("gpt2")
    with torch.no_grad():
        unmerged = model(**inputs).logits
        delta_model.merge()
        merged = model(**inputs).logits
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
