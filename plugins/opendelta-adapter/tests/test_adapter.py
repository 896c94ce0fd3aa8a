"""The adapter's math, placement and refusals."""

import pytest
import torch
from torch import nn

from opendelta import DeltaConfigError, DeltaStateError
from opendelta.testing import perturb, tiny_inputs, tiny_model
from opendelta_adapter import AdapterConfig, AdapterModel


def test_output_is_h_plus_up_act_down_h():
    model = tiny_model("bart")
    fc2 = model.model.encoder.layers[0].fc2
    x = torch.randn(2, 5, fc2.in_features)
    with torch.no_grad():
        h = fc2(x)
    delta_model = AdapterModel(backbone_model=model, modified_modules=["encoder.layers.0.fc2"], bottleneck_dim=4)
    perturb(delta_model)
    block = fc2.adapter.modulelist
    expected = h + block.up_proj(nn.functional.gelu(block.down_proj(h), approximate="tanh"))
    torch.testing.assert_close(fc2(x), expected)


def test_defaults_are_after_attention_output_and_second_feed_forward_projection():
    names = [t.name for t in AdapterModel(backbone_model=tiny_model("bert")).targets]
    assert names == [
        f"bert.encoder.layer.{i}.{p}" for i in range(2) for p in ("attention.output.dense", "output.dense")
    ]


def test_two_adapters_on_one_module_run_in_the_order_added():
    model = tiny_model("bart")
    fc2 = model.model.decoder.layers[1].fc2
    first = AdapterModel(backbone_model=model, modified_modules=["decoder.layers.1.fc2"])
    second = AdapterModel(backbone_model=model, modified_modules=["decoder.layers.1.fc2"], bottleneck_dim=12)
    perturb(first, seed=1)
    perturb(second, seed=2)
    x = torch.randn(2, 3, fc2.in_features)
    with torch.no_grad():
        inner = nn.functional.linear(x, fc2.weight, fc2.bias)
        expected = fc2.adapter_1(fc2.adapter(inner))
        assert torch.equal(fc2(x), expected)
    assert fc2.adapter.modulelist.down_proj.out_features == 24 and fc2.adapter_1.modulelist.down_proj.out_features == 12
    first.detach()
    with torch.no_grad():
        assert torch.equal(fc2(x), fc2.adapter_1(inner))


def test_exclude_modules_is_honoured():
    delta_model = AdapterModel(backbone_model=tiny_model("t5"), exclude_modules=["decoder"])
    assert delta_model.targets and all(t.name.startswith("encoder.") for t in delta_model.targets)


def test_container_module_with_tuple_output_works():
    model = tiny_model("opt")
    delta_model = AdapterModel(backbone_model=model, modified_modules=["self_attn"])
    perturb(delta_model)
    assert model(**tiny_inputs("opt")).logits.isfinite().all()


def test_a_module_without_tensor_output_is_a_clear_error():
    model = tiny_model("bert")
    AdapterModel(backbone_model=model, modified_modules=["bert.encoder"], bottleneck_dim=2)
    encoder_output = model(**tiny_inputs("bert"))  # BertEncoder returns a ModelOutput: fine
    assert encoder_output.logits.isfinite().all()

    class Dict(nn.Module):
        def forward(self, x):
            return {"hidden": x}

    wrapper = nn.Sequential(nn.Linear(4, 4), Dict())
    wrapper.dummy_inputs = {"input": torch.ones(1, 4)}
    with pytest.raises(DeltaStateError, match="cannot find the hidden-state output of Dict"):
        AdapterModel(backbone_model=wrapper, modified_modules=["1"])


def test_log_prints_the_adapter_and_its_shapes(capsys):
    model = tiny_model("roberta")
    AdapterModel(backbone_model=model, modified_modules=["output"], bottleneck_dim=12).log()
    out = capsys.readouterr().out
    assert "adapter (BottleneckAdapter)" in out and "weight:[12, 32]" in out


@pytest.mark.parametrize(
    "kwargs, field", [({"bottleneck_dim": 0}, "bottleneck_dim"), ({"non_linearity": "gleu"}, "non_linearity")]
)
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(DeltaConfigError, match=field):
        AdapterConfig(**kwargs)
