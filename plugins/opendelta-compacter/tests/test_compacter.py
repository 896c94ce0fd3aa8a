"""Compacter's own behaviour: its math against hand-written Kronecker sums, init, placement, refusals, composition."""

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from opendelta import DeltaConfigError, DeltaStateError, ModuleNotFoundInStructureError
from opendelta.testing import perturb, tiny_inputs, tiny_model
from opendelta_compacter import CompacterConfig, CompacterModel, PHMLinear, new_phm_rule, new_phm_weight
from opendelta_compacter.model import bottleneck_size


def run(model, arch):
    with torch.no_grad():
        return model(**tiny_inputs(arch)).logits


def hand_weight(rule, blocks):
    """``sum_i kron(A_i, B_i)`` written out with torch.kron, one term at a time."""
    return sum(torch.kron(rule[i], blocks[i]) for i in range(rule.shape[0]))


def hand_phm(layer, x):
    """A PHMLinear's output from its own tensors, without using any of its methods."""
    rule = layer.phm_rule_left @ layer.phm_rule_right if layer.factorized_phm_rule else layer.phm_rule
    blocks = layer.W_left @ layer.W_right if layer.factorized_phm else layer.W
    out = x @ hand_weight(rule, blocks)
    return out if layer.b is None else out + layer.b


@pytest.mark.parametrize("kronecker_prod", [None, False, True])
@pytest.mark.parametrize(
    "factorized_phm, factorized_phm_rule", [(True, False), (False, False), (True, True), (False, True)]
)
def test_output_is_h_plus_up_act_down_h_with_kronecker_sum_weights(factorized_phm, factorized_phm_rule, kronecker_prod):
    model = tiny_model("bart")
    fc2 = model.model.encoder.layers[0].fc2
    x = torch.randn(2, 5, fc2.in_features)
    with torch.no_grad():
        h = fc2(x)
    delta_model = CompacterModel(
        backbone_model=model,
        modified_modules=["encoder.layers.0.fc2"],
        reduction_factor=4,
        phm_rank=2,
        factorized_phm=factorized_phm,
        factorized_phm_rule=factorized_phm_rule,
        kronecker_prod=kronecker_prod,
    )
    perturb(delta_model)
    adapter = fc2.compacter
    down, up = adapter.down_sampler, adapter.up_sampler
    assert (down.in_features, down.out_features, up.out_features) == (32, 8, 32)
    with torch.no_grad():
        expected = h + hand_phm(up, F.gelu(hand_phm(down, h), approximate="tanh"))  # gelu_new
        torch.testing.assert_close(fc2(x), expected)
        torch.testing.assert_close(down.delta_weight(), hand_weight(down.rule(), down.blocks()))


def test_the_two_ways_of_computing_the_product_agree():
    torch.manual_seed(0)
    for factorized in (True, False):
        rule = new_phm_rule(4, factorized=True, dtype=torch.float64)
        weight = new_phm_weight(4, 24, 12, factorized=factorized, rank=3, dtype=torch.float64)
        structured = PHMLinear(24, 12, rule, weight, kronecker_prod=False)
        dense = PHMLinear(24, 12, rule, weight, kronecker_prod=True)
        with torch.no_grad():
            structured.b.normal_()
            dense.b.copy_(structured.b)
        x = torch.randn(3, 7, 24, dtype=torch.float64)
        torch.testing.assert_close(structured(x), dense(x), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(dense(x), x @ hand_weight(structured.rule(), structured.blocks()) + structured.b)
        assert PHMLinear(24, 12, rule, weight).kronecker_prod is not factorized  # None: structured iff factorised


def test_parameters_have_the_original_names_shapes_and_init():
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(768, 768))
    backbone.dummy_inputs = {"input": torch.zeros(1, 768)}
    delta_model = CompacterModel(backbone_model=backbone, modified_modules=["0"])
    down, up = backbone[0].compacter.down_sampler, backbone[0].compacter.up_sampler
    shapes = {name: tuple(p.shape) for name, p in backbone[0].compacter.named_parameters()}
    assert shapes == {
        "down_sampler.phm_rule": (4, 4, 4),
        "down_sampler.W_left": (4, 192, 1),
        "down_sampler.W_right": (4, 1, 12),
        "down_sampler.b": (48,),
        "up_sampler.phm_rule": (4, 4, 4),
        "up_sampler.W_left": (4, 12, 1),
        "up_sampler.W_right": (4, 1, 192),
        "up_sampler.b": (768,),
    }
    assert torch.count_nonzero(down.b) == 0 and torch.count_nonzero(up.b) == 0
    with torch.no_grad():
        assert 0.005 < float(down.phm_rule.std()) < 0.015  # normal, std 0.01
        bound = math.sqrt(2) * math.sqrt(6 / (192 + 1))  # Glorot-uniform of each [192, 1] block, gain sqrt(2)
        assert 0.9 * bound < float(down.W_left.abs().max()) <= bound
    assert sum(p.numel() for p in delta_model.parameters()) == 2 * 64 + 4 * 192 + 4 * 12 + 48 + 4 * 12 + 4 * 192 + 768


def test_bottleneck_is_rounded_up_to_a_multiple_of_the_division():
    assert bottleneck_size(768, 16, 4) == 48
    assert bottleneck_size(32, 16, 4) == 4  # 2 would not split into 4 blocks
    assert bottleneck_size(40, 4, 4) == 12
    assert bottleneck_size(32, 64, 2) == 2


def test_a_fresh_compacter_is_close_to_but_not_exactly_the_identity():
    delta_model = CompacterModel(backbone_model=tiny_model("t5"))
    h = 3 * torch.randn(4, 7, 32)
    with torch.no_grad():
        changes = [float((adapter(h) - h).norm() / h.norm()) for adapter in delta_model.deltas]
    assert all(0 < change < 1e-2 for change in changes), changes


@pytest.mark.parametrize(
    "architecture, expected",
    [
        ("bert", [f"bert.encoder.layer.{i}.{p}" for i in range(2) for p in ("attention.output.dense", "output.dense")]),
        ("gpt2", [f"transformer.h.{i}.{p}.c_proj" for i in range(2) for p in ("attn", "mlp")]),
        (
            "t5",
            [f"encoder.block.{i}.layer.{p}" for i in range(2) for p in ("0.SelfAttention.o", "1.DenseReluDense.wo")]
            + [f"decoder.block.{i}.layer.{p}" for i in range(2) for p in ("0.SelfAttention.o", "2.DenseReluDense.wo")],
        ),
    ],
)
def test_defaults_are_after_attention_output_and_second_feed_forward_projection(architecture, expected):
    model = tiny_model(architecture)
    delta_model = CompacterModel(backbone_model=model)
    assert [t.name for t in delta_model.targets] == expected
    for target in delta_model.targets:
        down = target.module.compacter.down_sampler
        assert (down.in_features, down.out_features) == (32, 4)  # hidden 32, not GPT-2 mlp.c_proj's input 37


def test_exclude_modules_is_honoured():
    delta_model = CompacterModel(backbone_model=tiny_model("bart"), exclude_modules=["model.decoder"])
    assert len(delta_model.targets) == 4 and all(t.name.startswith("model.encoder.") for t in delta_model.targets)
    only = CompacterModel(
        backbone_model=tiny_model("bert"), modified_modules=["output.dense"], exclude_modules=["bert.encoder.layer.0"]
    )
    assert [t.name for t in only.targets] == [
        "bert.encoder.layer.1.attention.output.dense",
        "bert.encoder.layer.1.output.dense",
    ]


def assert_untouched(model, keys):
    assert list(model.state_dict()) == keys
    assert not any(hasattr(m, "compacter") for m in model.modules())


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"modified_modules": ["no_such_module"]}, ModuleNotFoundInStructureError, "no_such_module"),
        ({"exclude_modules": ["bert"]}, ModuleNotFoundInStructureError, "excluded all"),
        ({"hypercomplex_division": 3}, DeltaConfigError, r"hypercomplex_division=3 .*attention\.output\.dense \(32\)"),
        ({"modified_modules": ["output.dense", "intermediate.dense"]}, DeltaConfigError, r"intermediate\.dense \(37\)"),
        (
            {
                "modified_modules": ["output.dense", "intermediate.dense"],
                "hypercomplex_division": 1,
                "shared_W_phm": True,
            },
            DeltaConfigError,
            r"shared_W_phm.*same hidden size.*\(32\).*\(37\)",
        ),
    ],
)
def test_targets_that_do_not_fit_are_refused_before_anything_changes(kwargs, error, match):
    model = tiny_model("bert")
    keys = list(model.state_dict())
    with pytest.raises(error, match=match):
        CompacterModel(backbone_model=model, **kwargs)
    assert_untouched(model, keys)


def test_a_module_without_hidden_state_output_is_a_clear_error():
    class Dict(nn.Module):
        def forward(self, x):
            return {"hidden": x}

    backbone = nn.Sequential(nn.Linear(8, 8), Dict())
    backbone.dummy_inputs = {"input": torch.ones(1, 8)}
    with pytest.raises(DeltaStateError, match="cannot find the hidden-state output of Dict"):
        CompacterModel(backbone_model=backbone, modified_modules=["1"])
    assert_untouched(backbone, ["0.weight", "0.bias"])


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"reduction_factor": 0}, "reduction_factor"),
        ({"hypercomplex_division": 0}, "hypercomplex_division"),
        ({"phm_rank": 0}, "phm_rank"),
        ({"phm_init_range": 0.0}, "phm_init_range"),
        ({"phm_init_range": float("nan")}, "phm_init_range"),
        ({"non_linearity": "gleu"}, "non_linearity"),
        ({"phm_c_init": "glorot-uniform"}, "phm_c_init"),
        ({"hypercomplex_nonlinearity": "phm"}, "hypercomplex_nonlinearity"),
        ({"kronecker_prod": "yes"}, "kronecker_prod"),
        ({"learn_phm": 1}, "learn_phm"),
        ({"reduction_factor": 16.0}, "reduction_factor"),
    ],
)
def test_bad_hyper_parameters_name_the_field(kwargs, field):
    with pytest.raises(DeltaConfigError, match=field):
        CompacterConfig(**kwargs)
    with pytest.raises(DeltaConfigError, match=field):
        CompacterModel(backbone_model=tiny_model("bert"), **kwargs)


def test_two_compacters_on_one_module_run_in_the_order_added_and_detach_independently():
    model = tiny_model("gpt2")
    c_proj = model.transformer.h[1].mlp.c_proj
    first = CompacterModel(backbone_model=model, modified_modules=["h.1.mlp.c_proj"])
    second = CompacterModel(backbone_model=model, modified_modules=["h.1.mlp.c_proj"], hypercomplex_division=2)
    perturb(first, seed=1)
    perturb(second, seed=2)
    assert c_proj.compacter.down_sampler.phm_dim == 4 and c_proj.compacter_1.down_sampler.phm_dim == 2
    x = torch.randn(2, 3, 37)
    with torch.no_grad():
        inner = x @ c_proj.weight + c_proj.bias  # Conv1D: weight [in, out]
        assert torch.equal(c_proj(x), c_proj.compacter_1(c_proj.compacter(inner)))
        first.detach()
        assert torch.equal(c_proj(x), c_proj.compacter_1(inner))
        first.attach()
        assert torch.equal(c_proj(x), c_proj.compacter_1(c_proj.compacter(inner)))


def test_deltas_follow_the_backbone_dtype():
    model = tiny_model("opt").to(torch.bfloat16)
    delta_model = CompacterModel(backbone_model=model, shared_phm_rule=True)
    assert {p.dtype for p in delta_model.parameters()} == {torch.bfloat16}
    assert run(model, "opt").isfinite().all()
