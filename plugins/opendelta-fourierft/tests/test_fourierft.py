"""What is specific to FourierFTModel: its exports and options, the locations, sizes, fused rows, routing, dtypes."""

import pytest
import torch

import opendelta
from opendelta import DeltaConfigError, route_rows
from opendelta.testing import Pristine, model_output_tensor, perturb, tiny_inputs, tiny_model
from opendelta_fourierft import FourierFTConfig, FourierFTLayer, FourierFTModel
from opendelta_fourierft.frequencies import frequency_locations


def run(model, arch):
    with torch.no_grad():
        return model_output_tensor(model(**tiny_inputs(arch)))


def test_importable_from_opendelta_once_installed_and_positional_like_peft_s_order():
    assert opendelta.FourierFTModel is FourierFTModel and opendelta.FourierFTConfig is FourierFTConfig
    assert FourierFTModel.delta_type == "fourierft" and FourierFTModel.delta_name == "fourierft"
    delta_model = FourierFTModel(tiny_model("bert"), 64, 3.0, ["value"])
    config = delta_model.config
    assert (config.n_frequency, config.scaling, config.modified_modules) == (64, 3.0, ["value"])
    assert all(isinstance(d, FourierFTLayer) and d.n_frequency == 64 for d in delta_model.deltas)


def test_the_locations_are_distinct_in_range_and_drawn_again_equal_from_the_seed():
    rows, columns = frequency_locations(6, 5, 30, seed=3)
    assert len(set(zip(rows.tolist(), columns.tolist(), strict=True))) == 30  # every entry of a 6 x 5 spectrum
    assert int(rows.max()) == 5 and int(columns.max()) == 4
    assert torch.equal(frequency_locations(6, 5, 7, seed=3), frequency_locations(6, 5, 30, seed=3)[:, :7])
    assert not torch.equal(frequency_locations(6, 5, 7, seed=3), frequency_locations(6, 5, 7, seed=4))
    with pytest.raises(ValueError, match=r"n_frequency must be in 1\.\.30"):
        frequency_locations(6, 5, 31, seed=3)
    for seed in (0, -1):  # a seed, not a size: every int64 is one (as for PEFT)
        assert FourierFTModel(tiny_model("bert"), n_frequency=8, random_loc_seed=seed).deltas


def test_the_locations_are_no_state_and_a_reload_draws_them_bit_for_bit(tmp_path):
    model = tiny_model("gpt2")
    delta_model = FourierFTModel(model, n_frequency=50, random_loc_seed=21)
    delta_model.freeze_module()
    perturb(delta_model)
    assert set(delta_model.delta_state_dict()) == {
        f"{t.name}.fourierft.fourierft_spectrum" for t in delta_model.targets
    }
    delta_model.save_finetuned(tmp_path / "delta")
    again = FourierFTModel.from_finetuned(tmp_path / "delta", backbone_model=tiny_model("gpt2"))
    assert again.config.random_loc_seed == 21
    for ours, theirs in zip(again.deltas, delta_model.deltas, strict=True):
        assert torch.equal(ours.indices, theirs.indices)
        assert torch.equal(ours.fourierft_spectrum, theirs.fourierft_spectrum)


def test_an_n_frequency_larger_than_a_named_layer_is_refused_naming_it_and_changes_nothing():
    model = tiny_model("llama")
    before = Pristine.of(model)
    with pytest.raises(
        DeltaConfigError, match=r"n_frequency=1000 is more than model\.layers\.0\.self_attn\.v_proj.*16 x 32"
    ):
        FourierFTModel(model, modified_modules=["q_proj", "v_proj"])
    before.assert_unchanged(model)
    fitted = FourierFTModel(model, modified_modules=["q_proj", "v_proj"], n_frequency_pattern={"v_proj": 512})
    assert sorted({d.n_frequency for d in fitted.deltas}) == [512, 1000]


def test_with_the_defaults_a_layer_too_small_is_left_out_and_all_too_small_is_refused():
    defaults = FourierFTModel(tiny_model("llama"))  # v_proj: 16 x 32 (grouped-query attention) < 1000
    assert {t.name.rpartition(".")[2] for t in defaults.targets} == {"q_proj"}
    assert {t.name.rpartition(".")[2] for t in FourierFTModel(tiny_model("llama"), n_frequency=512).targets} == {
        "q_proj",
        "v_proj",
    }
    model = tiny_model("llama")
    with pytest.raises(DeltaConfigError, match="more than every default target"):
        FourierFTModel(model, n_frequency=1025)


@pytest.mark.parametrize(
    "options, named",
    [
        ({"bias": "all"}, "bias='all'"),
        ({"bias": "fourier_only"}, "bias='fourier_only'"),
        ({"n_frequency": 0}, "n_frequency must be >= 1"),
        ({"n_frequency_pattern": {"value": 0}}, r"n_frequency_pattern\['value'\] must be >= 1"),
        ({"n_frequency_pattern": {"(": 5}}, "is no regex"),
        ({"random_loc_seed": None}, "random_loc_seed"),
    ],
)
def test_options_it_does_not_support_are_refused_by_name(options, named):
    with pytest.raises(DeltaConfigError, match=named):
        FourierFTModel(tiny_model("bert"), **options)


def test_the_start_is_zero_by_default_and_peft_s_random_start_on_request():
    model = tiny_model("bert")
    bare = run(model, "bert")
    zero = FourierFTModel(model, n_frequency=64)
    assert zero.identity_at_init and all(not d.fourierft_spectrum.any() for d in zero.deltas)
    assert torch.equal(run(model, "bert"), bare)
    zero.detach()
    random = FourierFTModel(model, n_frequency=64, init_weights=False)
    assert not random.identity_at_init and not torch.allclose(run(model, "bert"), bare)


def test_on_gpt2_s_fused_c_attn_the_defaults_change_only_the_q_and_v_rows():
    model = tiny_model("gpt2")
    delta_model = FourierFTModel(model, n_frequency=100)
    perturb(delta_model, scale=1.0)
    layer = delta_model.deltas[0]
    assert layer.rows == 64 and tuple(layer.indices.shape) == (2, 100) and int(layer.indices[0].max()) < 64
    host = delta_model.targets[0].module
    update = layer.merge_update(host)["weight"]  # Conv1D: [in, out]
    width = model.config.n_embd
    assert update[:, width : 2 * width].abs().max() == 0  # k rows untouched
    assert update[:, :width].abs().max() > 0 and update[:, 2 * width :].abs().max() > 0
    x = torch.randn(2, 3, width)
    torch.testing.assert_close(layer(x), x @ update, rtol=1e-5, atol=1e-6)


def test_each_routed_row_gets_exactly_what_its_delta_alone_gives():
    model = tiny_model("bert").eval()
    inputs = tiny_inputs("bert")
    first, second = (FourierFTModel(model, n_frequency=64, random_loc_seed=s, scaling=10.0) for s in (1, 2))
    perturb(first, seed=1)
    perturb(second, seed=2)
    runs = {}
    for name, other in (("first", second), ("second", first)):
        other.detach()
        runs[name] = run(model, "bert")
        other.attach()
    rows = inputs["input_ids"].shape[0]
    plan = [first if i % 2 == 0 else second for i in range(rows)]
    with torch.no_grad(), route_rows(model, plan):
        routed = model_output_tensor(model(**inputs))
    for i in range(rows):
        torch.testing.assert_close(routed[i], runs["first" if i % 2 == 0 else "second"][i], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_a_half_or_double_precision_backbone_computes_the_update_in_float32_or_float64(dtype):
    model = tiny_model("bert")
    delta_model = FourierFTModel(model, n_frequency=64, scaling=10.0)
    perturb(delta_model)
    expected = run(model, "bert")
    model.to(dtype)
    layer = delta_model.deltas[0]
    assert layer.fourierft_spectrum.dtype == dtype and layer.delta_weight().dtype == dtype
    tolerance = 1e-6 if dtype == torch.float64 else 5e-2
    torch.testing.assert_close(run(model, "bert").float(), expected, rtol=tolerance, atol=tolerance)
