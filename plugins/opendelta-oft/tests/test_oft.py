"""What is specific to OFTModel: its exports, its targets, refusals by name, per-row routing, orthogonality."""

import pytest
import torch
from oft_helpers import check_rows_routed

import opendelta
from opendelta import DeltaConfigError
from opendelta.testing import tiny_inputs, tiny_model
from opendelta_oft import OFTConfig, OFTModel, OFTRotation


def test_importable_from_opendelta_once_installed():
    assert opendelta.OFTModel is OFTModel and opendelta.OFTConfig is OFTConfig
    assert OFTModel.delta_type == "oft" and OFTModel.delta_name == "oft"


def test_defaults_rotate_the_inputs_of_q_and_v_and_the_whole_fused_gpt2_c_attn():
    bert = OFTModel(tiny_model("bert"))
    assert {t.name.rsplit(".", 1)[-1] for t in bert.targets} == {"query", "value"}
    assert {i.kind for _, i in bert.placements()} == {"before"}
    gpt2 = OFTModel(tiny_model("gpt2"))
    assert [t.name for t in gpt2.targets] == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    assert all(t.parts is None for t in gpt2.targets)


def test_a_block_size_that_does_not_divide_a_layer_is_refused_naming_the_layer_and_the_fix():
    model = tiny_model("bert")
    with pytest.raises(DeltaConfigError, match=r"oft_block_size=5 does not divide the in_features \(32\) of bert\.enc"):
        OFTModel(model, oft_block_size=5)
    with pytest.raises(
        DeltaConfigError, match=r"oft_block_size=64 .*choose an oft_block_size dividing it \(1, 2, 4, 8, 1"
    ):
        OFTModel(model, oft_block_size=64)
    assert not any("oft" in n for n, _ in model.named_modules())


@pytest.mark.parametrize(
    "kwargs, named",
    [
        ({"bias": "all"}, "bias='all'"),
        ({"r": 4}, r"r=4 is not supported: .*set oft_block_size"),
        ({"oft_block_size": 0}, "oft_block_size must be at least 1, got 0"),
        ({"num_cayley_neumann_terms": 65}, "num_cayley_neumann_terms must be between 1 and 64"),
        ({"module_dropout": 1.0}, "module_dropout"),
        ({"target_modules": ["query"]}, "target_modules"),
    ],
)
def test_unsupported_options_are_refused_by_name(kwargs, named):
    with pytest.raises(DeltaConfigError, match=named):
        OFTModel(tiny_model("bert"), **kwargs)


def test_the_exact_cayley_rotation_is_orthogonal_and_the_identity_at_init():
    layer = OFTRotation(16, 4, use_cayley_neumann=False, init_weights=False)
    rotation = layer.matrix()
    torch.testing.assert_close(rotation @ rotation.t(), torch.eye(16), rtol=0, atol=1e-5)
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(layer(x), x @ rotation)
    assert torch.equal(OFTRotation(16, 4).matrix(), torch.eye(16))


def test_module_dropout_sets_blocks_to_the_identity_in_training_only():
    layer = OFTRotation(16, 4, module_dropout=0.5, init_weights=False)
    x = torch.randn(2, 16)
    eval_out = layer.eval()(x)
    torch.manual_seed(0)
    train_out = layer.train()(x)
    blocks = (train_out - x).reshape(2, 4, 4).abs().sum(dim=(0, 2))
    assert (blocks == 0).sum() == 2 and not torch.equal(train_out, eval_out)


def test_each_routed_row_gets_exactly_what_its_delta_alone_gives():
    model = tiny_model("bert").eval()
    first = OFTModel(model, oft_block_size=8, init_weights=False)
    second = OFTModel(model, oft_block_size=8, init_weights=False)
    check_rows_routed(model, tiny_inputs("bert"), first, second)
