"""The parallel adapter's math (one module and spans), its default places, composition, and its refusals."""

import copy
import json

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from opendelta import (
    AddressingError,
    DeltaConfigError,
    ModuleNotFoundInStructureError,
    UnsupportedTargetError,
    insert_sequential_module,
)
from opendelta.testing import perturb, tiny_inputs, tiny_model
from opendelta_parallel_adapter import ParallelAdapterConfig, ParallelAdapterModel


def branch(adapter, x, act=lambda h: F.gelu(h, approximate="tanh")):
    """``up(act(down(x)))`` written out with the adapter's own parameters (no scale)."""
    down, up = adapter.modulelist.down_proj, adapter.modulelist.up_proj
    return F.linear(act(F.linear(x, down.weight, down.bias)), up.weight, up.bias)


def hooked(model):
    """Names of the backbone's modules that carry any forward (pre-)hook."""
    return [n for n, m in model.named_modules() if m._forward_hooks or m._forward_pre_hooks]


def run(model, arch):
    with torch.no_grad():
        return model(**tiny_inputs(arch)).logits


# ------------------------------------------------------------------------------------------------------------ math
def test_one_module_output_is_f_x_plus_s_up_act_down_x():
    model = tiny_model("bart")
    fc1 = model.model.encoder.layers[0].fc1  # Linear 32 -> 37: in != out, so a swapped size fails
    delta_model = ParallelAdapterModel(
        backbone_model=model, modified_modules=["encoder.layers.0.fc1"], bottleneck_dim=4, scaled=2.5
    )
    perturb(delta_model)
    adapter = fc1.parallel_adapter
    assert adapter.modulelist.down_proj.weight.shape == (4, 32) and adapter.modulelist.up_proj.weight.shape == (37, 4)
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        expected = F.linear(x, fc1.weight, fc1.bias) + 2.5 * branch(adapter, x)
        torch.testing.assert_close(fc1(x), expected)


def test_span_adds_the_adapter_of_the_start_input_to_the_end_output_in_a_real_forward_pass():
    model = tiny_model("bart")
    layer = model.model.encoder.layers[0]
    delta_model = ParallelAdapterModel(
        backbone_model=model, modified_modules=[["encoder.layers.0.fc1", "encoder.layers.0.fc2"]], scaled=4.0
    )
    perturb(delta_model)
    assert [(t.name, t.output.name) for t in delta_model.targets] == [
        ("model.encoder.layers.0.fc1", "model.encoder.layers.0.fc2")
    ]
    adapter = layer.fc2.parallel_adapter  # lives on the end module, reads the start module's input
    assert not hasattr(layer.fc1, "parallel_adapter")
    assert adapter.modulelist.down_proj.weight.shape == (24, 32) and adapter.modulelist.up_proj.weight.shape == (32, 24)
    seen = {}
    layer.fc1.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    layer.fc1.register_forward_hook(lambda m, args, out: seen.setdefault("fc1_out", out))
    layer.fc2.register_forward_hook(lambda m, args, out: seen.update(h=args[0], y=out))
    run(model, "bart")
    with torch.no_grad():
        torch.testing.assert_close(seen["fc1_out"], F.linear(seen["x"], layer.fc1.weight, layer.fc1.bias))
        expected = F.linear(seen["h"], layer.fc2.weight, layer.fc2.bias) + 4.0 * branch(adapter, seen["x"])
        torch.testing.assert_close(seen["y"], expected)


def test_gpt2_conv1d_sizes_and_math_follow_its_in_out_weight_layout():
    model = tiny_model("gpt2")
    c_fc = model.transformer.h[0].mlp.c_fc  # Conv1D, weight stored [in=32, out=37]
    delta_model = ParallelAdapterModel(backbone_model=model, modified_modules=["h.0.mlp.c_fc"], bottleneck_dim=3)
    perturb(delta_model)
    adapter = c_fc.parallel_adapter
    assert adapter.modulelist.down_proj.weight.shape == (3, 32) and adapter.modulelist.up_proj.weight.shape == (37, 3)
    x = torch.randn(2, 4, 32)
    with torch.no_grad():
        torch.testing.assert_close(c_fc(x), x @ c_fc.weight + c_fc.bias + branch(adapter, x))


def test_opt_attention_called_with_keywords_only_gets_its_adapter():
    """The original added 0 parameters on OPT; here 4 adapters of 2*32*24 + 24 + 32 parameters each."""
    model = tiny_model("opt")
    bare = run(model, "opt")
    delta_model = ParallelAdapterModel(backbone_model=model)
    assert [(t.name, t.output and t.output.name) for t in delta_model.targets] == [
        (f"model.decoder.layers.{i}.{a}", b and f"model.decoder.layers.{i}.{b}")
        for i in range(2)
        for a, b in (("self_attn", None), ("fc1", "fc2"))
    ]
    assert sum(p.numel() for p in delta_model.parameters()) == 4 * (2 * 32 * 24 + 24 + 32) == 6368
    perturb(delta_model, scale=1.0)
    assert (run(model, "opt") - bare).abs().max() > 1e-3
    attn = model.model.decoder.layers[0].self_attn
    adapter = attn.parallel_adapter
    x = torch.randn(1, 3, 32)
    with torch.no_grad():
        attached = attn(hidden_states=x)[0]
        delta_model.detach()
        expected = attn(hidden_states=x)[0] + branch(adapter, x)
    torch.testing.assert_close(attached, expected)


# -------------------------------------------------------------------------------------------------------- defaults
def test_bert_defaults_are_the_attention_block_and_the_feed_forward_span():
    model = tiny_model("bert")
    delta_model = ParallelAdapterModel(backbone_model=model)
    layer = "bert.encoder.layer.{}."
    assert [(t.name, t.output and t.output.name) for t in delta_model.targets] == [
        pair
        for i in range(2)
        for pair in (
            (layer.format(i) + "attention", None),
            (layer.format(i) + "intermediate.dense", layer.format(i) + "output.dense"),
        )
    ]
    block = model.bert.encoder.layer[1]
    assert type(block.attention.parallel_adapter.modulelist.up_proj) is nn.Linear
    assert block.output.dense.parallel_adapter.modulelist.down_proj.in_features == 32  # intermediate.dense's input
    assert block.output.dense.parallel_adapter.modulelist.up_proj.out_features == 32  # output.dense's output
    assert delta_model.config.modified_modules is None


def test_gpt2_defaults_span_the_conv1d_feed_forward():
    model = tiny_model("gpt2")
    delta_model = ParallelAdapterModel(backbone_model=model)
    assert [(t.name, t.output and t.output.name) for t in delta_model.targets] == [
        pair
        for i in range(2)
        for pair in (
            (f"transformer.h.{i}.attn", None),
            (f"transformer.h.{i}.mlp.c_fc", f"transformer.h.{i}.mlp.c_proj"),
        )
    ]
    assert type(model.transformer.h[0].mlp.c_proj).__name__ == "Conv1D"
    assert hasattr(model.transformer.h[0].mlp.c_proj, "parallel_adapter")


def test_t5_defaults_cover_encoder_and_decoder_and_name_saved_tensors_after_the_end_module():
    model = tiny_model("t5")
    delta_model = ParallelAdapterModel(backbone_model=model, bottleneck_dim=2)
    expected = []
    for stack, ff in (("encoder", 1), ("decoder", 2)):
        for i in range(2):
            dense = f"{stack}.block.{i}.layer.{ff}.DenseReluDense"
            expected += [(f"{stack}.block.{i}.layer.0", None), (f"{dense}.wi", f"{dense}.wo")]
    assert [(t.name, t.output and t.output.name) for t in delta_model.targets] == expected
    keys = delta_model.delta_state_dict()
    assert len(keys) == 8 * 4
    wo = "decoder.block.1.layer.2.DenseReluDense.wo"
    assert keys[f"{wo}.parallel_adapter.modulelist.down_proj.weight"].shape == (2, 32)
    assert "encoder.block.0.layer.0.parallel_adapter.modulelist.up_proj.bias" in keys


def test_fresh_adapter_is_small_normal_weights_and_zero_biases():
    delta_model = ParallelAdapterModel(backbone_model=tiny_model("roberta"))
    for adapter in delta_model.deltas:
        for linear in (adapter.modulelist.down_proj, adapter.modulelist.up_proj):
            assert torch.count_nonzero(linear.bias) == 0
            assert 0.005 < linear.weight.std().item() < 0.02


def test_exclude_modules_is_honoured_for_patterns_and_for_either_end_of_a_span():
    delta_model = ParallelAdapterModel(backbone_model=tiny_model("t5"), exclude_modules=["decoder"])
    assert len(delta_model.targets) == 4 and all(t.name.startswith("encoder.") for t in delta_model.targets)
    model = tiny_model("bart")
    delta_model = ParallelAdapterModel(
        backbone_model=model,
        modified_modules=["self_attn", ["fc1", "fc2"]],
        exclude_modules=["encoder.layers.0.fc2", "model.decoder"],
    )
    assert [t.host_name for t in delta_model.targets] == [
        "model.encoder.layers.0.self_attn",
        "model.encoder.layers.1.self_attn",
        "model.encoder.layers.1.fc2",
    ]
    assert not hooked(model.model.encoder.layers[0].fc1) and not hooked(model.model.decoder)


# ---------------------------------------------------------------------------------------------------- refusals
def assert_untouched(model, keys):
    assert list(model.state_dict()) == keys and not hooked(model)
    assert not any(n.endswith("parallel_adapter") for n, _ in model.named_modules())


@pytest.mark.parametrize(
    "kind, modules, error, match",
    [
        ("bart", ["fc3"], ModuleNotFoundInStructureError, "fc3"),
        ("bart", [["fc1", "fc9"]], ModuleNotFoundInStructureError, "fc9"),
        ("bart", [], ModuleNotFoundInStructureError, "empty"),
        ("bart", [["fc2", "fc1"]], AddressingError, r"\['fc2', 'fc1'\] does not pair up: .*decoder.layers.1.fc2"),
        ("bart", [["self_attn", "encoder_attn"]], AddressingError, "encoder.layers.0.self_attn .*'encoder_attn'"),
        ("bart", [["fc1", "encoder.layers.1.fc2"]], AddressingError, "layers.0.fc1 .*has no module matching"),
        ("bart", ["fc2", ["fc1", "fc2"]], AddressingError, "output of the same module"),
        ("bart", ["fc1", ["fc1", "fc2"]], AddressingError, "input of the same module"),
        ("gpt2", ["wte"], UnsupportedTargetError, "token ids"),
        ("gpt2", ["attn.q"], UnsupportedTargetError, "fused"),
        ("gpt2", [["attn", "attn.q"]], UnsupportedTargetError, "slice of the fused Conv1D"),
    ],
)
def test_bad_targets_raise_clear_errors_and_leave_the_backbone_untouched(kind, modules, error, match):
    model = tiny_model(kind)
    keys = list(model.state_dict())
    common = True if "attn.q" in json.dumps(modules) else None
    with pytest.raises(error, match=match):
        ParallelAdapterModel(backbone_model=model, modified_modules=modules, common_structure=common)
    assert_untouched(model, keys)


def test_everything_excluded_is_an_error():
    model = tiny_model("opt")
    with pytest.raises(ModuleNotFoundInStructureError, match="excluded all"):
        ParallelAdapterModel(backbone_model=model, exclude_modules=["model.decoder.layers"])
    assert_untouched(model, list(tiny_model("opt").state_dict()))


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"bottleneck_dim": 0}, "bottleneck_dim"),
        ({"non_linearity": "gleu"}, "non_linearity"),
        ({"scaled": 0}, "scaled"),
        ({"scaled": float("inf")}, "scaled"),
        ({"scaled": "4"}, "scaled"),
        ({"modified_modules": [["fc1"]]}, "modified_modules"),
        ({"modified_modules": [["fc1", "fc2", "fc3"]]}, "modified_modules"),
        ({"modified_modules": [["fc1", ""]]}, "modified_modules"),
        ({"modified_modules": [["fc1", 2]]}, "modified_modules"),
        ({"modified_modules": "fc1"}, "modified_modules"),
        ({"modified_modules": ["attn", "attn", "ff.w1"]}, r"modified_modules.*odd number.*\[.attn., \[.ff.w1."),
    ],
)
def test_bad_hyper_parameters_name_the_field(kwargs, field):
    with pytest.raises(DeltaConfigError, match=field):
        ParallelAdapterConfig(**kwargs)


# ------------------------------------------------------------------------------------------------- config, state
def test_constructor_takes_the_original_arguments_and_spans_survive_json():
    model = tiny_model("bart")
    delta_model = ParallelAdapterModel(
        backbone_model=model,
        modified_modules=["self_attn", ("fc1", "fc2")],
        bottleneck_dim=8,
        non_linearity="relu",
        scaled=4,
        unfrozen_modules=["deltas", "classification_head"],
    )
    config = delta_model.config
    assert config.modified_modules == ["self_attn", ["fc1", "fc2"]]
    document = json.loads(config.to_json_string())
    assert document["delta_type"] == "parallel_adapter"
    assert document["modified_modules"] == ["self_attn", ["fc1", "fc2"]]
    assert ParallelAdapterConfig.from_dict(document) == config
    rebuilt = ParallelAdapterModel.from_config(document, tiny_model("bart"))
    assert [(t.name, t.output and t.output.name) for t in rebuilt.targets] == [
        (t.name, t.output and t.output.name) for t in delta_model.targets
    ]
    assert all(a.scale == 4 and isinstance(a.modulelist.non_linear, nn.ReLU) for a in delta_model.deltas)


def test_detach_removes_the_capture_on_the_start_module_and_attach_restores_exactly():
    model = tiny_model("bart")
    bare = run(model, "bart")
    fc1, fc2 = model.model.decoder.layers[1].fc1, model.model.decoder.layers[1].fc2
    delta_model = ParallelAdapterModel(backbone_model=model, modified_modules=[["decoder.layers.1.fc1", "fc2"]])
    perturb(delta_model)
    attached = run(model, "bart")
    assert not torch.allclose(attached, bare)
    adapter = fc2.parallel_adapter
    assert "_opendelta_captured_input" not in vars(adapter)  # consumed by the end module, not kept alive
    delta_model.detach()
    assert not hooked(fc1) and not hooked(fc2) and not hasattr(fc2, "parallel_adapter")
    with torch.no_grad():
        fc1(torch.randn(1, 2, 32))  # a detached span captures nothing
    assert "_opendelta_captured_input" not in vars(adapter)
    assert torch.equal(run(model, "bart"), bare)
    delta_model.attach()
    assert fc2.parallel_adapter is adapter and torch.equal(run(model, "bart"), attached)


# --------------------------------------------------------------------------------------------------- composition
def test_two_parallel_adapters_on_one_span_add_in_the_order_added_and_detach_independently():
    model = tiny_model("bart")
    fc1, fc2 = model.model.encoder.layers[1].fc1, model.model.encoder.layers[1].fc2
    span = [["encoder.layers.1.fc1", "encoder.layers.1.fc2"]]
    first = ParallelAdapterModel(backbone_model=model, modified_modules=span, scaled=2.0)
    second = ParallelAdapterModel(backbone_model=model, modified_modules=span, bottleneck_dim=12)
    perturb(first, seed=1)
    perturb(second, seed=2)
    a1, a2 = fc2.parallel_adapter, fc2.parallel_adapter_1
    assert a2.modulelist.down_proj.out_features == 12
    x = torch.randn(2, 3, 32)
    with torch.no_grad():
        h = fc1(x)
        base = F.linear(h, fc2.weight, fc2.bias)
        assert torch.equal(fc2(h), (base + a1(x)) + a2(x))  # bit-exact: the additions happen in this order
        torch.testing.assert_close(a1(x), 2.0 * branch(a1, x))
        first.detach()
        h = fc1(x)
        assert torch.equal(fc2(h), base + a2(x))
    assert set(second.delta_state_dict()) == set(first.delta_state_dict())  # stable names, whatever the suffix


@pytest.mark.parametrize("parallel_first", [True, False])
def test_parallel_and_sequential_after_deltas_on_one_module_keep_insertion_order(parallel_first):
    model = tiny_model("bart")
    fc1 = model.model.encoder.layers[0].fc1
    double = nn.Linear(37, 37)

    def add_parallel():
        return ParallelAdapterModel(backbone_model=model, modified_modules=["encoder.layers.0.fc1"], bottleneck_dim=2)

    delta_model = add_parallel() if parallel_first else None
    insert_sequential_module(fc1, double, "double", position="after")
    delta_model = delta_model or add_parallel()
    perturb(delta_model)
    x = torch.randn(2, 3, 32)
    with torch.no_grad():
        base, pa = F.linear(x, fc1.weight, fc1.bias), branch(fc1.parallel_adapter, x)
        expected = double(base + pa) if parallel_first else double(base) + pa
        torch.testing.assert_close(fc1(x), expected)


def test_a_deep_copy_runs_its_own_span_adapters():
    model = tiny_model("bart")
    delta_model = ParallelAdapterModel(backbone_model=model)
    perturb(delta_model)
    expected = run(model, "bart")
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for param in delta_model.parameters():
            param.zero_()  # the original's adapters now add only zeros
    assert torch.equal(run(clone, "bart"), expected)
    assert not torch.equal(run(model, "bart"), expected)


def test_log_shows_the_span_adapter_on_the_end_module(capsys):
    ParallelAdapterModel(backbone_model=tiny_model("opt"), modified_modules=[["layers.1.fc1", "layers.1.fc2"]]).log()
    out = capsys.readouterr().out
    assert "parallel_adapter (BottleneckAdapter)" in out
    assert "down_proj (Linear) weight:[24, 32]" in out and "up_proj (Linear) weight:[32, 24]" in out
    assert out.index("fc2 (Linear)") < out.index("parallel_adapter (BottleneckAdapter)")
