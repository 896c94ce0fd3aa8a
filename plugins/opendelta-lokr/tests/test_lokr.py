"""What is specific to LoKrModel: its exports, config checks, patterns, dropout only in training, routing, saving."""

import pytest
import torch
from torch import nn

import opendelta
from opendelta import DeltaConfigError, UnsupportedTargetError, route_rows
from opendelta.testing import model_output_tensor, tiny_inputs, tiny_model
from opendelta_lokr import LoKrConfig, LoKrLayer, LoKrModel


def run(model, arch="bert"):
    with torch.no_grad():
        return model_output_tensor(model(**tiny_inputs(arch)))


def test_importable_from_opendelta_once_installed():
    assert opendelta.LoKrModel is LoKrModel and opendelta.LoKrConfig is LoKrConfig
    assert LoKrModel.delta_type == "lokr" and LoKrModel.delta_name == "lokr"


def test_classic_call_shape_positionals_and_defaults():
    model = tiny_model("bert")
    delta_model = LoKrModel(model, 3, 5)
    assert (delta_model.config.r, delta_model.config.alpha) == (3, 5)
    assert {t.name.rpartition(".")[2] for t in delta_model.targets} == {"query", "value"}
    layer = delta_model.deltas[0]
    assert isinstance(layer, LoKrLayer) and layer.scaling == pytest.approx(5 / 3)
    assert layer.shape == (4, 8, 4, 8)  # 32 = 4 * 8 both ways: kron([4, 4], [8, 8])
    assert [tuple(p.shape) for p in layer.parameters()] == [(4, 4), (8, 3), (3, 8)]  # 3 < 8 / 2: w2 decomposed
    assert not layer.lokr_w1.any()  # the zero factor: a fresh LoKr is the identity
    named = LoKrModel(backbone_model=tiny_model("bert"), modified_modules=["key"], r=2)
    assert {t.name.rpartition(".")[2] for t in named.targets} == {"key"}


@pytest.mark.parametrize(
    "options, named",
    [
        ({"r": 0}, "LoKrConfig.r"),
        ({"alpha": 0}, "alpha"),
        ({"rank_dropout": 1.0}, "rank_dropout"),
        ({"module_dropout": -0.1}, "module_dropout"),
        ({"rank_pattern": {"value": 0}}, "rank_pattern"),
        ({"alpha_pattern": {"(": 2.0}}, "alpha_pattern"),
        ({"decompose_factor": 0}, "decompose_factor"),
        ({"init_weights": "gaussian"}, "init_weights"),
    ],
)
def test_bad_values_are_refused_by_field(options, named):
    with pytest.raises(DeltaConfigError, match=named):
        LoKrConfig(**options)


def test_rank_and_alpha_patterns_use_peft_s_end_of_name_rule():
    delta_model = LoKrModel(
        tiny_model("bert"), modified_modules=["query", "value"], r=4, rank_pattern={"value": 2}, alpha_pattern={"y": 1}
    )
    by_leaf = {t.name.rpartition(".")[2]: i.delta for t, i in delta_model.placements()}
    assert (by_leaf["value"].r, by_leaf["query"].r) == (2, 4)
    assert (by_leaf["value"].w2_decomposed, by_leaf["query"].w2_decomposed) == (True, False)  # 4 < 8 / 2 is false
    assert by_leaf["query"].scaling == pytest.approx(8 / 4)  # "y" is no whole name component of "query"


def test_factorization_and_decomposition_follow_peft():
    from opendelta_lokr.layer import factorization

    assert [factorization(d) for d in (256, 128, 127, 96, 37)] == [(16, 16), (8, 16), (1, 127), (8, 12), (1, 37)]
    assert factorization(128, 4) == (4, 32) and factorization(96, 5) == (4, 24)
    both = LoKrLayer(64, 96, 1, 1.0, decompose_both=True, decompose_factor=4)
    assert both.shape == (4, 24, 4, 16) and {n for n, _ in both.named_parameters()} == {
        "lokr_w1_a",
        "lokr_w1_b",
        "lokr_w2_a",
        "lokr_w2_b",
    }
    torch.testing.assert_close(
        both.delta_weight(), torch.kron(both.lokr_w1_a @ both.lokr_w1_b, both.lokr_w2_a @ both.lokr_w2_b)
    )


def test_a_fused_layer_s_addressed_rows_get_a_kronecker_product_of_their_own():
    model = tiny_model("gpt2")
    delta_model = LoKrModel(model, init_weights=False)  # attn.q, attn.v: 64 of c_attn's 96 rows
    layer = delta_model.deltas[0]
    assert layer.shape == (8, 8, 4, 8)
    full = layer.delta_weight()
    k_rows = torch.arange(32, 64)
    assert not full[k_rows].any() and full.abs().sum() > 0


def test_dropout_is_training_time_only_and_module_dropout_can_skip_the_update():
    model = tiny_model("bert")
    LoKrModel(model, rank_dropout=0.5, module_dropout=0.5, init_weights=False)
    evals = [run(model) for _ in range(2)]
    torch.testing.assert_close(evals[0], evals[1], rtol=0, atol=0)
    layer = LoKrLayer(6, 5, 2, 2.0, module_dropout=0.999, init_weights=False).train()
    assert not layer(torch.randn(3, 6)).any()  # skipped: zero update
    layer = LoKrLayer(6, 5, 2, 2.0, rank_dropout=0.5, rank_dropout_scale=True, init_weights=False).train()
    torch.manual_seed(0)
    rows = layer(torch.eye(6)).t()  # [out, in]: dW with dropped rows, the kept ones rescaled
    full = layer.delta_weight().detach()
    kept = rows.abs().sum(dim=1) > 0
    assert 0 < kept.sum() < 5
    torch.testing.assert_close(rows[kept], full[kept] * 5 / kept.sum(), rtol=1e-5, atol=1e-6)


def test_each_routed_row_gets_exactly_what_its_delta_alone_gives():
    model = tiny_model("bert").eval()
    inputs = tiny_inputs("bert")
    first, second = LoKrModel(model, init_weights=False), LoKrModel(model, init_weights=False)
    runs = {}
    for name, other in (("first", second), ("second", first)):
        other.detach()
        runs[name] = run(model)
        other.attach()
    rows = inputs["input_ids"].shape[0]
    plan = [first if i % 2 == 0 else second for i in range(rows)]
    with torch.no_grad(), route_rows(model, plan):
        routed = model_output_tensor(model(**inputs))
    for i in range(rows):
        torch.testing.assert_close(routed[i], runs["first" if i % 2 == 0 else "second"][i], rtol=1e-5, atol=1e-6)


def test_save_finetuned_round_trips_patterns_and_factors(tmp_path):
    model = tiny_model("t5")
    delta_model = LoKrModel(
        model, modified_modules=["q", "wo"], rank_pattern={"wo": 2}, decompose_both=True, init_weights=False
    )
    delta_model.freeze_module(set_state_dict=True)
    expected = run(model, "t5")
    delta_model.save_finetuned(tmp_path / "delta")
    again = opendelta.AutoDeltaModel.from_finetuned(tmp_path / "delta", backbone_model=tiny_model("t5"))
    assert again.config.rank_pattern == {"wo": 2}
    torch.testing.assert_close(run(again.backbone_model, "t5"), expected, rtol=0, atol=0)


def test_a_convolution_is_refused_as_unsupported():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten())
    with pytest.raises(UnsupportedTargetError):
        LoKrModel(net, modified_modules=["0"])
