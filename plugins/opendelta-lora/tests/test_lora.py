"""LoRA's own behaviour: its math against a hand computation, GPT-2's fused c_attn, defaults, and refusals."""

import pytest
import torch
from torch import nn

from opendelta import DeltaConfigError, UnsupportedTargetError
from opendelta.testing import perturb, tiny_inputs, tiny_model
from opendelta_lora import LoraConfig, LoraModel


def test_output_equals_w_x_plus_scaled_b_a_x():
    model = tiny_model("bert")
    query = model.bert.encoder.layer[0].attention.self.query
    x = torch.randn(3, 5, query.in_features)
    delta_model = LoraModel(backbone_model=model, modified_modules=["0.attention.self.query"], lora_r=4, lora_alpha=8)
    perturb(delta_model)
    lora = query.lora
    expected = x @ query.weight.t() + query.bias + (8 / 4) * (x @ lora.lora_A.t() @ lora.lora_B.t())
    torch.testing.assert_close(query(x), expected)
    torch.testing.assert_close(lora.delta_weight(), 2.0 * lora.lora_B @ lora.lora_A)


def test_fresh_lora_starts_with_b_zero_and_a_nonzero():
    model = tiny_model("roberta")
    delta_model = LoraModel(backbone_model=model)
    for layer in delta_model.deltas:
        assert torch.count_nonzero(layer.lora_B) == 0
        assert torch.count_nonzero(layer.lora_A) > 0


def test_defaults_target_query_and_value_through_the_common_structure():
    model = tiny_model("bert")
    names = [t.name for t in LoraModel(backbone_model=model).targets]
    assert names == [f"bert.encoder.layer.{i}.attention.self.{p}" for i in range(2) for p in ("query", "value")]


def test_gpt2_default_updates_only_the_q_and_v_slices_of_the_fused_c_attn():
    model = tiny_model("gpt2")
    c_attn = model.transformer.h[0].attn.c_attn
    hidden = c_attn.weight.shape[0]
    x = torch.randn(2, 4, hidden)
    with torch.no_grad():
        bare = c_attn(x)
    delta_model = LoraModel(backbone_model=model)
    assert {t.parts for t in delta_model.targets} == {(0, 2)}
    perturb(delta_model)
    with torch.no_grad():
        out = c_attn(x)
    q, k, v = (slice(i * hidden, (i + 1) * hidden) for i in range(3))
    assert torch.equal(out[..., k], bare[..., k])
    assert not torch.allclose(out[..., q], bare[..., q]) and not torch.allclose(out[..., v], bare[..., v])
    weight = c_attn.lora.delta_weight()
    assert weight.shape == (3 * hidden, hidden) and torch.count_nonzero(weight[k]) == 0


def test_conv1d_named_explicitly_gets_a_full_width_update():
    model = tiny_model("gpt2")
    delta_model = LoraModel(backbone_model=model, modified_modules=["attn.c_proj"], lora_r=2)
    layer = model.transformer.h[1].attn.c_proj.lora
    assert layer.lora_A.shape == (2, 32) and layer.lora_B.shape == (32, 2) and layer.out_index is None
    assert len(delta_model.targets) == 2


def test_exclude_modules_is_honoured():
    model = tiny_model("bert")
    delta_model = LoraModel(backbone_model=model, modified_modules=["query"], exclude_modules=["bert.encoder.layer.1"])
    assert [t.name for t in delta_model.targets] == ["bert.encoder.layer.0.attention.self.query"]
    defaults = LoraModel(backbone_model=tiny_model("bert"), exclude_modules=["bert.encoder.layer.0"])
    assert all(".layer.1." in t.name for t in defaults.targets) and len(defaults.targets) == 2


def test_non_linear_target_is_refused_before_anything_changes():
    model = tiny_model("bert")
    before = list(model.state_dict())
    with pytest.raises(UnsupportedTargetError, match="LayerNorm"):
        LoraModel(backbone_model=model, modified_modules=["output.LayerNorm"])
    assert list(model.state_dict()) == before
    assert not any(isinstance(m, nn.Module) and hasattr(m, "lora") for m in model.modules())


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"lora_r": 0}, "lora_r"),
        ({"lora_alpha": -1}, "lora_alpha"),
        ({"lora_dropout": 1.5}, "lora_dropout"),
        ({"lora_r": "8"}, "lora_r"),
    ],
)
def test_bad_hyper_parameters_name_the_field(kwargs, field):
    with pytest.raises(DeltaConfigError, match=field):
        LoraConfig(**kwargs)


def test_dropout_is_active_in_train_mode_only():
    model = tiny_model("bert")
    delta_model = LoraModel(backbone_model=model, lora_dropout=0.5)
    perturb(delta_model)
    inputs = tiny_inputs("bert")
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, model(**inputs).logits)
        model.train()
        torch.manual_seed(0)
        first = model(**inputs).logits
        torch.manual_seed(1)
        assert not torch.equal(first, model(**inputs).logits)
