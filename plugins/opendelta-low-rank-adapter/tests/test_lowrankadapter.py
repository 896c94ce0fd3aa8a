"""The low-rank adapter's math, identity at init, placement, refusals, detach/attach and composition."""

import pytest
import torch
from torch import nn

from opendelta import DeltaConfigError, ModuleNotFoundInStructureError, UnsupportedTargetError
from opendelta.layers import INITIALISERS
from opendelta.testing import perturb, tiny_inputs, tiny_model
from opendelta_low_rank_adapter import LowRankAdapter, LowRankAdapterConfig, LowRankAdapterModel, LowRankLinear


def gelu_new(x):
    return nn.functional.gelu(x, approximate="tanh")


def by_hand(h, adapter, act=gelu_new):
    """``h + up(act(down(h)))`` written out with dense weights ``W_left @ W_right`` ([in, out], used as ``x @ W``)."""
    down, up = adapter.down_sampler, adapter.up_sampler
    z = act(h @ (down.W_left @ down.W_right) + down.b)
    return h + z @ (up.W_left @ up.W_right) + up.b


def state(model):
    return list(model.state_dict())


def has_low_rank_adapter(model):
    return any(hasattr(m, "low_rank_adapter") for m in model.modules())


# ------------------------------------------------------------------------------------------------------------- math
def test_low_rank_linear_is_x_times_the_product_of_its_factors_plus_b():
    layer = LowRankLinear(6, 5, rank=3)
    assert (layer.W_left.shape, layer.W_right.shape, layer.b.shape) == ((6, 3), (3, 5), (5,))
    with torch.no_grad():
        layer.b.normal_()
    x = torch.randn(2, 4, 6)
    dense = layer.W_left @ layer.W_right  # (in, out)
    torch.testing.assert_close(layer(x), x @ dense + layer.b)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, dense.t(), layer.b))
    torch.testing.assert_close(layer.delta_weight(), dense)
    assert torch.linalg.matrix_rank(layer.delta_weight()) == 3


def test_output_is_h_plus_up_act_down_h_on_one_module():
    model = tiny_model("bert")
    dense = model.bert.encoder.layer[0].attention.output.dense
    x = torch.randn(2, 5, dense.in_features)
    with torch.no_grad():
        h = dense(x)
    delta_model = LowRankAdapterModel(
        backbone_model=model, modified_modules=["layer.0.attention.output.dense"], reduction_factor=8, low_rank_rank=2
    )
    perturb(delta_model)
    adapter = dense.low_rank_adapter
    assert adapter.down_sampler.W_right.shape == (2, 32 // 8) and adapter.up_sampler.W_left.shape == (4, 2)
    with torch.no_grad():
        torch.testing.assert_close(dense(x), by_hand(h, adapter))
        assert not torch.allclose(dense(x), h, atol=1e-3)


def test_non_linearity_is_the_configured_one():
    model = tiny_model("bart")
    fc2 = model.model.encoder.layers[0].fc2
    x = torch.randn(3, fc2.in_features)
    with torch.no_grad():
        h = fc2(x)
    delta_model = LowRankAdapterModel(
        backbone_model=model, modified_modules=["encoder.layers.0.fc2"], non_linearity="tanh"
    )
    perturb(delta_model, scale=0.5)
    with torch.no_grad():
        torch.testing.assert_close(fc2(x), by_hand(h, fc2.low_rank_adapter, act=torch.tanh))
        assert not torch.allclose(fc2(x), by_hand(h, fc2.low_rank_adapter), atol=1e-4)


# --------------------------------------------------------------------------------------------- identity at init
@pytest.mark.parametrize("w_init", [m for m in INITIALISERS if m != "zeros"])
def test_fresh_adapter_is_exactly_the_identity_and_learns_from_the_first_step(w_init):
    model = tiny_model("bart")
    fc2 = model.model.decoder.layers[0].fc2
    x = torch.randn(2, 3, fc2.in_features)
    with torch.no_grad():
        h = fc2(x)
    LowRankAdapterModel(
        backbone_model=model, modified_modules=["decoder.layers.0.fc2"], reduction_factor=4, low_rank_w_init=w_init
    )
    adapter = fc2.low_rank_adapter
    down, up = adapter.down_sampler, adapter.up_sampler
    assert torch.equal(fc2(x), h)
    assert torch.count_nonzero(up.W_right) == 0 and torch.count_nonzero(up.b) == 0
    assert torch.count_nonzero(down.b) == 0
    for factor in (down.W_left, down.W_right, up.W_left):
        assert torch.count_nonzero(factor) == factor.numel(), f"{w_init} left a zero in a factor"

    optimiser = torch.optim.SGD(adapter.parameters(), lr=0.1)
    target = torch.randn_like(h)
    (fc2(x) * target).sum().backward()
    assert up.W_right.grad.abs().sum() > 0 and up.b.grad.abs().sum() > 0
    optimiser.step()
    optimiser.zero_grad()
    assert not torch.allclose(fc2(x), h)
    (fc2(x) * target).sum().backward()
    for name, param in adapter.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, f"no gradient reaches {name} after one step"


def test_built_in_the_dtype_of_the_modified_module():
    model = tiny_model("gpt2").double()
    inputs = tiny_inputs("gpt2")
    with torch.no_grad():
        bare = model(**inputs).logits
    delta_model = LowRankAdapterModel(backbone_model=model)
    assert {p.dtype for p in delta_model.parameters()} == {torch.float64}
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, bare)


# ------------------------------------------------------------------------------------------------------ placement
def test_bert_defaults_go_after_the_attention_output_and_second_feed_forward_projection():
    model = tiny_model("bert")
    delta_model = LowRankAdapterModel(backbone_model=model)
    names = [t.name for t in delta_model.targets]
    assert names == [
        f"bert.encoder.layer.{i}.{p}" for i in range(2) for p in ("attention.output.dense", "output.dense")
    ]
    layer = model.bert.encoder.layer[1]
    assert isinstance(layer.output.dense.low_rank_adapter, LowRankAdapter)
    assert layer.output.dense.low_rank_adapter.down_sampler.W_left.shape == (32, 1)  # hidden 32, not ffn 37


def test_gpt2_defaults_are_the_conv1d_output_projections_sized_by_their_out_features():
    model = tiny_model("gpt2")
    delta_model = LowRankAdapterModel(backbone_model=model, reduction_factor=4)
    assert [t.name for t in delta_model.targets] == [
        f"transformer.h.{i}.{p}.c_proj" for i in range(2) for p in ("attn", "mlp")
    ]
    mlp_proj = model.transformer.h[0].mlp.c_proj
    assert mlp_proj.weight.shape == (37, 32)  # Conv1D stores [in, out]
    adapter = mlp_proj.low_rank_adapter
    assert adapter.down_sampler.W_left.shape == (32, 1) and adapter.down_sampler.W_right.shape == (1, 8)
    assert adapter.up_sampler.W_right.shape == (1, 32)
    perturb(delta_model)
    assert model(**tiny_inputs("gpt2")).logits.isfinite().all()


def test_t5_defaults_cover_encoder_and_decoder_self_attention_and_feed_forward():
    delta_model = LowRankAdapterModel(backbone_model=tiny_model("t5"))
    assert [t.name for t in delta_model.targets] == [
        name
        for stack, ff in (("encoder", 1), ("decoder", 2))
        for i in range(2)
        for name in (f"{stack}.block.{i}.layer.0.SelfAttention.o", f"{stack}.block.{i}.layer.{ff}.DenseReluDense.wo")
    ]


def test_a_container_with_a_tuple_output_is_sized_by_the_pseudo_forward_pass():
    model = tiny_model("opt")
    inputs = tiny_inputs("opt")
    with torch.no_grad():
        bare = model(**inputs).logits
    delta_model = LowRankAdapterModel(backbone_model=model, modified_modules=["layers.1.self_attn"], reduction_factor=2)
    adapter = model.model.decoder.layers[1].self_attn.low_rank_adapter
    assert adapter.down_sampler.W_left.shape == (32, 1) and adapter.up_sampler.b.shape == (32,)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, bare)
        perturb(delta_model)
        assert not torch.allclose(model(**inputs).logits, bare)


def test_exclude_modules_is_honoured():
    model = tiny_model("bert")
    delta_model = LowRankAdapterModel(
        backbone_model=model, modified_modules=["output.dense"], exclude_modules=["bert.encoder.layer.1"]
    )
    assert [t.name for t in delta_model.targets] == [
        "bert.encoder.layer.0.attention.output.dense",
        "bert.encoder.layer.0.output.dense",
    ]
    assert not hasattr(model.bert.encoder.layer[1].output.dense, "low_rank_adapter")
    defaults = LowRankAdapterModel(backbone_model=tiny_model("t5"), exclude_modules=["decoder"])
    assert len(defaults.targets) == 4 and all(t.name.startswith("encoder.") for t in defaults.targets)


# ------------------------------------------------------------------------------------------------------- refusals
def test_modules_that_resolve_to_nothing_are_refused_and_the_backbone_is_untouched():
    model = tiny_model("roberta")
    before = state(model)
    with pytest.raises(ModuleNotFoundInStructureError, match="no_such_module"):
        LowRankAdapterModel(backbone_model=model, modified_modules=["no_such_module"])
    with pytest.raises(ModuleNotFoundInStructureError, match="excluded all"):
        LowRankAdapterModel(backbone_model=model, exclude_modules=["roberta"])
    assert state(model) == before and not has_low_rank_adapter(model)


def test_a_slice_of_gpt2_fused_c_attn_is_refused_and_the_backbone_is_untouched():
    model = tiny_model("gpt2")
    before = state(model)
    with pytest.raises(UnsupportedTargetError, match="c_attn"):
        LowRankAdapterModel(backbone_model=model, modified_modules=["attn.q"], common_structure=True)
    assert state(model) == before and not has_low_rank_adapter(model)


def test_too_large_a_reduction_factor_names_the_module_and_sizes_and_undoes_earlier_insertions():
    model = tiny_model("bert")
    inputs = tiny_inputs("bert")
    with torch.no_grad():
        bare = model(**inputs).logits
    before = state(model)
    # intermediate.dense outputs 37 features (37 // 33 = 1: fine), output.dense 32 (32 // 33 = 0): refused third
    with pytest.raises(DeltaConfigError) as caught:
        LowRankAdapterModel(
            backbone_model=model, modified_modules=["intermediate.dense", "layer.1.output.dense"], reduction_factor=33
        )
    message = str(caught.value)
    assert "bert.encoder.layer.1.output.dense" in message and "hidden size is 32" in message
    assert "reduction_factor=33" in message
    assert state(model) == before and not has_low_rank_adapter(model)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, bare)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"reduction_factor": 0}, "reduction_factor"),
        ({"reduction_factor": "32"}, "reduction_factor"),
        ({"low_rank_rank": 0}, "low_rank_rank"),
        ({"low_rank_rank": 1.5}, "low_rank_rank"),
        ({"non_linearity": "gleu"}, "non_linearity"),
        ({"low_rank_w_init": "xavier"}, "low_rank_w_init"),
        ({"low_rank_w_init": "zeros"}, "low_rank_w_init"),
    ],
)
def test_bad_hyper_parameters_name_the_field(kwargs, field):
    with pytest.raises(DeltaConfigError, match=field):
        LowRankAdapterConfig(**kwargs)
    model = tiny_model("bert")
    before = state(model)
    with pytest.raises(DeltaConfigError, match=field):
        LowRankAdapterModel(backbone_model=model, **kwargs)
    assert state(model) == before


# ---------------------------------------------------------------------------------------- detach, attach, compose
def test_detach_and_attach_remove_and_restore_the_same_adapters_exactly():
    model = tiny_model("deberta-v2")
    inputs = tiny_inputs("deberta-v2")
    with torch.no_grad():
        bare = model(**inputs).logits
    delta_model = LowRankAdapterModel(backbone_model=model, low_rank_rank=2)
    perturb(delta_model)
    with torch.no_grad():
        attached = model(**inputs).logits
    assert not torch.allclose(attached, bare)
    dense = model.deberta.encoder.layer[0].output.dense
    adapter = dense.low_rank_adapter
    keys = {k for k in model.state_dict() if ".low_rank_adapter." in k}
    suffixes = {k.split(".low_rank_adapter.")[1] for k in keys}
    assert suffixes == {f"{s}.{p}" for s in ("down_sampler", "up_sampler") for p in ("W_left", "W_right", "b")}
    assert set(delta_model.delta_state_dict()) == keys

    delta_model.detach()
    assert not hasattr(dense, "low_rank_adapter") and not any(".low_rank_adapter." in k for k in model.state_dict())
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, bare)
    delta_model.attach()
    assert dense.low_rank_adapter is adapter
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, attached)


def test_two_low_rank_adapters_on_one_module_run_in_the_order_added():
    model = tiny_model("bart")
    fc2 = model.model.decoder.layers[1].fc2
    first = LowRankAdapterModel(backbone_model=model, modified_modules=["decoder.layers.1.fc2"])
    second = LowRankAdapterModel(
        backbone_model=model, modified_modules=["decoder.layers.1.fc2"], reduction_factor=4, low_rank_rank=2
    )
    perturb(first, seed=1, scale=0.5)
    perturb(second, seed=2, scale=0.5)
    assert fc2.low_rank_adapter.up_sampler.W_left.shape == (1, 1)
    assert fc2.low_rank_adapter_1.up_sampler.W_left.shape == (8, 2)
    x = torch.randn(2, 3, fc2.in_features)
    with torch.no_grad():
        inner = nn.functional.linear(x, fc2.weight, fc2.bias)
        expected = fc2.low_rank_adapter_1(fc2.low_rank_adapter(inner))
        assert torch.equal(fc2(x), expected)
        assert not torch.allclose(fc2.low_rank_adapter(fc2.low_rank_adapter_1(inner)), expected)
        first.detach()
        assert torch.equal(fc2(x), fc2.low_rank_adapter_1(inner))
        first.attach()  # back in its original place: still first
        assert torch.equal(fc2(x), expected)
