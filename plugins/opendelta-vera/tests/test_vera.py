"""What is specific to VeraModel: its exports and config, the shared matrices stored once, saving them or the seed."""

import pytest
import torch
from safetensors.torch import load_file

import opendelta
from opendelta import AutoDeltaModel, DeltaConfigError, route_rows
from opendelta.hashing import backbone_hash
from opendelta.plugin_api import delta_parameter_names
from opendelta.testing import model_output_tensor, perturb, tiny_inputs, tiny_model
from opendelta_vera import VeraConfig, VeraLayer, VeraModel


def run(model, arch="bert"):
    with torch.no_grad():
        return model_output_tensor(model(**tiny_inputs(arch)))


def test_importable_from_opendelta_once_installed():
    assert opendelta.VeraModel is VeraModel and opendelta.VeraConfig is VeraConfig
    assert VeraModel.delta_type == "vera" and VeraModel.delta_name == "vera"
    assert VeraModel(tiny_model("bert"), 4).config.r == 4  # the classic call shape: r first by position


def test_the_shared_matrices_are_stored_once_frozen_and_are_no_delta_parameters():
    model = tiny_model("bert")
    bare_hash = backbone_hash(model)
    delta_model = VeraModel(backbone_model=model, modified_modules=["query", "value", "intermediate.dense"], r=6)
    assert backbone_hash(model) == bare_hash  # the matrices are the delta's, not the backbone's
    layers = list(delta_model.deltas)
    assert all(isinstance(layer, VeraLayer) for layer in layers) and len(layers) == 6
    owner = layers[0]
    assert all(layer.owner is owner for layer in layers)
    assert owner.vera_A.shape == (6, 32) and owner.vera_B.shape == (37, 6)  # max in 32, max out 37 (intermediate)
    pointers = {layer.projections(torch.device("cpu"), torch.float32)[0].data_ptr() for layer in layers}
    assert pointers == {owner.vera_A.data_ptr()}  # slices of one tensor, no copies
    for keys in (list(model.state_dict()), list(delta_model.delta_state_dict())):
        assert sum(k.endswith(".vera_A") for k in keys) == 1 and sum(k.endswith(".vera_B") for k in keys) == 1
    assert {n.rpartition(".")[2] for n, _ in delta_model.named_parameters()} == {"vera_lambda_b", "vera_lambda_d"}
    assert not any(n.endswith(("vera_A", "vera_B")) for n in delta_parameter_names(model))
    assert not owner.vera_A.requires_grad
    delta_model.freeze_module(set_state_dict=True)
    assert {n.rpartition(".")[2] for n, p in model.named_parameters() if p.requires_grad} == {
        "vera_lambda_b",
        "vera_lambda_d",
    }


@pytest.mark.parametrize("save_projection", [True, False])
def test_save_finetuned_saves_the_matrices_or_the_seed_and_reloads_them_bit_for_bit(save_projection, tmp_path):
    model = tiny_model("bert").eval()
    delta_model = VeraModel(model, r=8, save_projection=save_projection, projection_prng_key=2**40 + 3)
    delta_model.freeze_module()
    perturb(delta_model, scale=1.0)
    owner = delta_model.deltas[0]
    if save_projection:  # matrices no draw gives: a reload must read them
        with torch.no_grad():
            owner.vera_B.mul_(2.0)
    expected = run(model)
    folder = delta_model.save_finetuned(tmp_path / "delta")
    (weights,) = folder.glob("*.safetensors")
    stored = [n for n in load_file(weights) if n.endswith(("vera_A", "vera_B"))]
    assert len(stored) == (2 if save_projection else 0)
    fresh = tiny_model("bert").eval()
    again = AutoDeltaModel.from_finetuned(folder, backbone_model=fresh)
    assert torch.equal(again.deltas[0].vera_A, owner.vera_A) and torch.equal(again.deltas[0].vera_B, owner.vera_B)
    assert torch.equal(run(fresh), expected)


def test_the_matrices_follow_the_backbone_to_another_dtype_attached_or_detached():
    model = tiny_model("bert").eval()
    delta_model = VeraModel(model, r=8)
    perturb(delta_model, scale=1.0)
    expected = run(model)
    model.to(torch.float64)
    assert delta_model.deltas[0].vera_A.dtype == torch.float64
    torch.testing.assert_close(run(model).float(), expected, rtol=1e-5, atol=1e-6)
    delta_model.detach()
    model.to(torch.float32)  # moved while the deltas are out: attach moves them (the matrices with the first layer)
    delta_model.attach()
    assert delta_model.deltas[0].vera_A.dtype == torch.float32
    torch.testing.assert_close(run(model), expected, rtol=1e-5, atol=1e-6)


def test_each_routed_row_gets_exactly_what_its_delta_alone_gives():
    model = tiny_model("bert").eval()
    inputs = tiny_inputs("bert")
    first, second = VeraModel(model, r=8, init_weights=False), VeraModel(model, r=8, projection_prng_key=1)
    perturb(second, scale=1.0)
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


def test_dropout_acts_in_training_only():
    model = tiny_model("bert")
    delta_model = VeraModel(model, r=8, vera_dropout=0.5)
    perturb(delta_model, scale=1.0)
    model.eval()
    assert torch.equal(run(model), run(model))
    model.train()
    torch.manual_seed(0)
    assert not torch.equal(run(model), run(model))


@pytest.mark.parametrize(
    "options, named",
    [
        ({"r": 0}, "r must be a positive"),
        ({"bias": "all"}, "bias='all'"),
        ({"bias": "vera_only"}, "bias='vera_only'"),
        ({"vera_dropout": 1.0}, "vera_dropout"),
        ({"d_initial": float("nan")}, "d_initial"),
        ({"projection_prng_key": True}, "projection_prng_key"),
        ({"projection_prng_key": 2**64}, "projection_prng_key"),
        ({"target_modules": ["query"]}, "target_modules"),  # PEFT's name: here modified_modules
    ],
)
def test_values_it_does_not_support_are_refused_by_name(options, named):
    with pytest.raises(DeltaConfigError, match=named):
        VeraModel(tiny_model("bert"), **options)


def test_a_seed_is_not_a_size_field_and_round_trips_through_json():
    config = VeraConfig(projection_prng_key=2**64 - 1)
    assert VeraConfig.from_dict(config.to_dict()).projection_prng_key == 2**64 - 1
    assert VeraConfig.__dataclass_fields__["projection_prng_key"].type != "int"


@pytest.mark.parametrize("save_projection", [True, False])
@pytest.mark.parametrize("dtype, tolerance", [(torch.float16, 5e-3), (torch.bfloat16, 2e-2)])  # measured 1.4e-5, 1.1e-4
def test_a_float32_checkpoint_loads_onto_the_backbone_in_half_precision(save_projection, dtype, tolerance, tmp_path):
    model = tiny_model("bert").eval()
    delta_model = VeraModel(model, r=8, save_projection=save_projection)
    delta_model.freeze_module()
    perturb(delta_model, scale=1.0)
    expected = run(model)
    folder = delta_model.save_finetuned(tmp_path / "delta")
    half = tiny_model("bert").to(dtype).eval()
    again = AutoDeltaModel.from_finetuned(folder, backbone_model=half)
    assert again.deltas[0].vera_A.dtype == dtype and again.deltas[1].vera_lambda_b.dtype == dtype
    torch.testing.assert_close(run(half).float(), expected, rtol=0, atol=tolerance)
