"""What is specific to BOFTModel: its exports, its targets, refusals by name, per-row routing, the butterfly."""

import pytest
import torch
from oft_helpers import check_rows_routed

import opendelta
from opendelta import DeltaConfigError
from opendelta.testing import tiny_inputs, tiny_model
from opendelta_oft import BOFTConfig, BOFTModel
from opendelta_oft.butterfly import permutations


def test_importable_from_opendelta_once_installed_from_the_same_distribution_as_oft():
    assert opendelta.BOFTModel is BOFTModel and opendelta.BOFTConfig is BOFTConfig
    assert BOFTModel.delta_type == "boft" and BOFTModel.delta_name == "boft"
    plugins = {m.name: m.plugin for m in opendelta.list_methods()}
    assert plugins["oft"] == plugins["boft"] == "oft"  # one distribution's one entry point registers both


def test_defaults_scale_and_rotate_q_and_v_as_parallel_deltas_and_the_whole_fused_gpt2_c_attn():
    bert = BOFTModel(tiny_model("bert"))
    assert {t.name.rsplit(".", 1)[-1] for t in bert.targets} == {"query", "value"}
    assert {i.kind for _, i in bert.placements()} == {"parallel"}
    assert bert.deltas[0].boft_R.shape == (1, 8, 4, 4) and bert.deltas[0].boft_s.shape == (32, 1)
    gpt2 = BOFTModel(tiny_model("gpt2"))
    assert all(t.parts is None and t.name.endswith("c_attn") for t in gpt2.targets)


@pytest.mark.parametrize(
    "kwargs, named",
    [
        ({"boft_block_size": 5}, r"boft_block_size=5 does not divide in_features=32"),
        ({"boft_block_size": 8, "boft_n_butterfly_factor": 4}, r"multiple of boft_block_size \* 2"),
        ({"boft_n_butterfly_factor": 10**9}, "boft_n_butterfly_factor=1000000000"),
        ({"boft_block_size": 0}, "boft_block_size must be at least 1, got 0"),
        ({"boft_block_num": 8}, r"boft_block_num=8 is not supported: .*set boft_block_size"),
        ({"boft_n_butterfly_factor": 0}, "boft_n_butterfly_factor"),
        ({"bias": "all"}, "bias='all'"),
    ],
)
def test_unsupported_or_unfitting_options_are_refused_by_name(kwargs, named):
    model = tiny_model("bert")
    with pytest.raises(DeltaConfigError, match=named):
        BOFTModel(model, **kwargs)
    assert not any("boft" in n for n, _ in model.named_modules())


def test_an_unfitting_size_names_the_layer():
    with pytest.raises(DeltaConfigError, match=r"bert\.encoder\.layer\.0\.attention\.self\.query"):
        BOFTModel(tiny_model("bert"), boft_block_size=3)


def test_the_rotation_is_orthogonal_the_butterfly_reaches_further_and_init_is_the_identity():
    model = tiny_model("bert")
    one, two = (BOFTModel(model, boft_n_butterfly_factor=f, init_weights=False).deltas[0] for f in (1, 2))
    for layer in (one, two):
        rotation = layer.rotation()
        torch.testing.assert_close(rotation @ rotation.t(), torch.eye(32), rtol=0, atol=1e-5)
    assert (one.rotation().abs() > 0).sum() == 8 * 16 and (two.rotation().abs() > 0).sum() > 8 * 16
    assert torch.equal(permutations(8, 2, 4, 1)[0], torch.arange(8))
    assert torch.equal(BOFTModel(model).deltas[0].rotation(), torch.eye(32))


def test_boft_dropout_sets_blocks_of_one_factor_to_the_identity_in_training_only():
    layer = BOFTModel(tiny_model("bert"), boft_dropout=0.5, init_weights=False).deltas[0]
    torch.manual_seed(0)
    trained = layer.train().rotation()
    block = trained[:4, :4]
    assert not torch.equal(layer.eval().rotation(), trained)
    assert sum(torch.equal(trained[i : i + 4, i : i + 4], torch.eye(4)) for i in range(0, 32, 4)) == 4
    assert block.shape == (4, 4)


def test_each_routed_row_gets_exactly_what_its_delta_alone_gives():
    model = tiny_model("bert").eval()
    first = BOFTModel(model, boft_n_butterfly_factor=2, init_weights=False)
    second = BOFTModel(model, init_weights=False)
    check_rows_routed(model, tiny_inputs("bert"), first, second)
