"""PEFT FourierFT folders load through ``from_finetuned`` with PEFT's outputs (or are refused by name), and
``save_peft`` writes folders PEFT loads with our outputs."""

import copy
import json

import pytest
import torch
from fourierft_helpers import N_FREQUENCY, PEFT_TARGETS, SCALING, fresh, peft_fourierft, run

from opendelta import AutoDeltaModel, CheckpointError
from opendelta.testing import Pristine, perturb
from opendelta_fourierft import FourierFTModel

peft = pytest.importorskip("peft")

TOLERANCE = 1e-5


def saved(kind, tmp_path, seed=3, **options):
    peft_model = peft_fourierft(fresh(kind), kind, seed=seed, **options)
    folder = tmp_path / f"peft-{kind}"
    peft_model.save_pretrained(folder)
    return folder, run(peft_model, kind)


def test_peft_saves_the_spectra_only_not_the_locations(tmp_path):
    folder, _ = saved("bert", tmp_path)
    from safetensors.torch import load_file

    names = sorted(load_file(folder / "adapter_model.safetensors"))
    assert names and all(n.endswith(".fourierft_spectrum") for n in names), names


@pytest.mark.parametrize("kind", tuple(PEFT_TARGETS))
def test_a_peft_fourierft_folder_loads_with_peft_outputs(kind, tmp_path):
    folder, expected = saved(kind, tmp_path, random_loc_seed=99, n_frequency_pattern={"v|value|c_attn": 150})
    model = fresh(kind)
    delta_model = AutoDeltaModel.from_finetuned(folder, backbone_model=model)
    assert type(delta_model) is FourierFTModel
    assert delta_model.config.random_loc_seed == 99 and delta_model.config.scaling == SCALING
    assert (run(model, kind) - expected).abs().max().item() <= TOLERANCE
    again = FourierFTModel.from_finetuned(folder, backbone_model=fresh(kind))
    for ours, theirs in zip(again.deltas, delta_model.deltas, strict=True):
        assert torch.equal(ours.fourierft_spectrum, theirs.fourierft_spectrum)
        assert torch.equal(ours.indices, theirs.indices)


def _edit(folder, **fields):
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, **fields}))


@pytest.mark.parametrize(
    "fields, named",
    [
        ({"modules_to_save": ["classifier"]}, "modules_to_save"),
        ({"bias": "all"}, "bias='all'"),
        ({"bias": "fourier_only"}, "bias='fourier_only'"),
        ({"layers_to_transform": [0]}, "layers_to_transform"),
        ({"some_future_option": 3}, "some_future_option"),
        ({"target_modules": "all-linear"}, "all-linear"),
        ({"random_loc_seed": None}, "random_loc_seed"),
        ({"n_frequency": N_FREQUENCY + 1}, r"has shape \[200\], not \[201\]"),
        ({"target_modules": ["nothing_here"]}, "matches no module"),
        ({"target_modules": ["attention"]}, "linear layers only"),
    ],
)
def test_folders_it_cannot_load_faithfully_are_refused_by_name_and_change_nothing(fields, named, tmp_path):
    folder, _ = saved("bert", tmp_path)
    _edit(folder, **fields)
    model = fresh("bert")
    before = Pristine.of(model)
    with pytest.raises(CheckpointError, match=named):
        AutoDeltaModel.from_finetuned(folder, backbone_model=model)
    before.assert_unchanged(model)


@pytest.mark.parametrize("kind", tuple(PEFT_TARGETS))
def test_save_peft_reads_back_in_peft_with_our_outputs(kind, tmp_path):
    model = fresh(kind)
    delta_model = FourierFTModel(
        model,
        modified_modules=PEFT_TARGETS[kind],
        n_frequency=N_FREQUENCY,
        scaling=SCALING,
        random_loc_seed=11,
        n_frequency_pattern={"v|value": 100},
    )
    perturb(delta_model, scale=0.5)
    expected = run(model, kind)
    folder = delta_model.save_peft(tmp_path / "export")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(fresh(kind)), folder).eval()
    assert (run(loaded, kind) - expected).abs().max().item() <= TOLERANCE
    back = AutoDeltaModel.from_finetuned(folder, backbone_model=fresh(kind))
    assert torch.equal(run(back.backbone_model, kind), expected)


def test_save_peft_refuses_a_delta_on_some_rows_of_a_fused_layer(tmp_path):
    delta_model = FourierFTModel(fresh("gpt2"), n_frequency=N_FREQUENCY)  # attn.q, attn.v: rows of c_attn
    with pytest.raises(CheckpointError, match=r"c_attn.*covers 64 of the fused layer's 96"):
        delta_model.save_peft(tmp_path / "export")
    assert not (tmp_path / "export").exists()
