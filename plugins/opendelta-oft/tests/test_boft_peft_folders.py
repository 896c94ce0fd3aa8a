"""PEFT BOFT folders load through ``from_finetuned`` with PEFT's outputs or are refused; ``save_peft`` reads in PEFT."""

import json

import pytest
import torch
from oft_helpers import PEFT_TARGETS, check_refused, fresh, linear_copy, max_error, peft_boft, quiet, run

from opendelta import AutoDeltaModel
from opendelta_oft import BOFTModel

pytest.importorskip("peft")
TOLERANCE = 1e-5


def saved(kind, tmp_path, seed=3, monkeypatch=None, **options):
    peft_model = peft_boft(fresh(kind), kind, seed=seed, monkeypatch=monkeypatch, **options)
    folder = tmp_path / f"peft-{kind}"
    peft_model.save_pretrained(folder)
    return folder, run(peft_model, kind)


@pytest.mark.parametrize("factors", (1, 2))
@pytest.mark.parametrize("kind", tuple(PEFT_TARGETS))
def test_a_peft_boft_folder_loads_with_peft_outputs(kind, factors, tmp_path, monkeypatch):
    patched = monkeypatch if factors > 1 else None
    folder, expected = saved(kind, tmp_path, monkeypatch=patched, boft_n_butterfly_factor=factors)
    model = fresh(kind)
    delta_model = AutoDeltaModel.from_finetuned(folder, backbone_model=model)
    assert type(delta_model) is BOFTModel and delta_model.config.boft_n_butterfly_factor == factors
    assert max_error(run(model, kind), expected) <= TOLERANCE
    again = BOFTModel.from_finetuned(folder, backbone_model=fresh(kind))
    assert torch.equal(again.deltas[0].boft_R, delta_model.deltas[0].boft_R)


def test_a_folder_that_sets_boft_block_num_loads_with_the_block_size_it_means(tmp_path):
    folder, expected = saved("t5", tmp_path, boft_block_size=0, boft_block_num=4)
    model = fresh("t5")
    delta_model = AutoDeltaModel.from_finetuned(folder, backbone_model=model)
    assert delta_model.config.boft_block_size == 8  # in_features 32 / 4 blocks
    assert max_error(run(model, "t5"), expected) <= TOLERANCE


def test_a_folder_peft_wrote_without_its_cuda_extension_loads_as_the_one_factor_peft_computed(tmp_path):
    folder, expected = saved("llama", tmp_path, boft_n_butterfly_factor=2)  # PEFT falls back to one factor
    assert json.loads((folder / "adapter_config.json").read_text())["boft_n_butterfly_factor"] == 2
    model = fresh("llama")
    delta_model = AutoDeltaModel.from_finetuned(folder, backbone_model=model)
    assert delta_model.config.boft_n_butterfly_factor == 1
    assert max_error(run(model, "llama"), expected) <= TOLERANCE


@pytest.mark.parametrize("factors", (1, 2))
@pytest.mark.parametrize("kind", tuple(PEFT_TARGETS))
def test_save_peft_reads_back_in_peft_with_our_outputs(kind, factors, tmp_path, monkeypatch):
    peft = pytest.importorskip("peft")
    if factors > 1:
        monkeypatch.setattr("peft.tuners.boft.layer.get_fbd_cuda", lambda: __import__("oft_helpers").PythonFbd)
    model = fresh(kind)
    delta_model = BOFTModel(model, boft_block_size=4, boft_n_butterfly_factor=factors, init_weights=False)
    ours = run(model, kind)
    folder = delta_model.save_peft(tmp_path / "exported")
    document = json.loads((folder / "adapter_config.json").read_text())
    assert document["peft_type"] == "BOFT" and document["boft_n_butterfly_factor"] == factors
    loaded = quiet(peft.PeftModel.from_pretrained, linear_copy(fresh(kind)), folder).eval()
    assert max_error(run(loaded, kind), ours) <= TOLERANCE
    back = AutoDeltaModel.from_finetuned(folder, backbone_model=fresh(kind))
    assert max_error(run(back.backbone_model, kind), ours) <= TOLERANCE


@pytest.mark.parametrize(
    "fields, named",
    [
        ({"modules_to_save": ["classifier"]}, "modules_to_save"),
        ({"layers_pattern": "layer", "layers_to_transform": [0]}, "layers_"),
        ({"bias": "boft_only"}, "bias='boft_only'"),
        ({"some_future_option": 3}, "some_future_option"),
        ({"target_modules": "all-linear"}, "all-linear"),
        ({"boft_block_size": 8}, "boft_R tensors hold other blocks"),
        ({"target_modules": ["nothing_here"]}, "matches no module"),
        ({"target_modules": ["query", "key", "value"]}, "lacks"),
    ],
)
def test_folders_it_cannot_load_faithfully_are_refused_by_name_and_change_nothing(fields, named, tmp_path):
    folder, _ = saved("bert", tmp_path)
    check_refused(folder, fields, named)
