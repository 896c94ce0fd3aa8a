"""PEFT OFT folders load through ``from_finetuned`` with PEFT's outputs, or are refused; ``save_peft`` reads in PEFT."""

import json

import pytest
import torch
from oft_helpers import PEFT_TARGETS, check_refused, fresh, linear_copy, max_error, peft_oft, quiet, run

from opendelta import AutoDeltaModel, CheckpointError
from opendelta.testing import Pristine
from opendelta_oft import OFTModel

pytest.importorskip("peft")
TOLERANCE = 1e-5


def saved(kind, tmp_path, seed=3, **options):
    peft_model = peft_oft(fresh(kind), kind, seed=seed, **options)
    folder = tmp_path / f"peft-{kind}"
    peft_model.save_pretrained(folder)
    return folder, run(peft_model, kind)


@pytest.mark.parametrize("options", ({}, {"use_cayley_neumann": False, "block_share": True}), ids=("neumann", "shared"))
@pytest.mark.parametrize("kind", tuple(PEFT_TARGETS))
def test_a_peft_oft_folder_loads_with_peft_outputs(kind, options, tmp_path):
    folder, expected = saved(kind, tmp_path, **options)
    model = fresh(kind)
    delta_model = AutoDeltaModel.from_finetuned(folder, backbone_model=model)
    assert type(delta_model) is OFTModel and delta_model.config.oft_block_size == 8
    assert max_error(run(model, kind), expected) <= TOLERANCE
    again = OFTModel.from_finetuned(folder, backbone_model=fresh(kind))
    assert torch.equal(again.deltas[0].oft_R, delta_model.deltas[0].oft_R)


def test_a_folder_that_sets_r_loads_with_the_block_size_it_means(tmp_path):
    folder, expected = saved("llama", tmp_path, r=4, oft_block_size=0)
    model = fresh("llama")
    delta_model = AutoDeltaModel.from_finetuned(folder, backbone_model=model)
    assert delta_model.config.oft_block_size == 8  # in_features 32 / 4 blocks
    assert max_error(run(model, "llama"), expected) <= TOLERANCE


@pytest.mark.parametrize("kind", tuple(PEFT_TARGETS))
def test_save_peft_reads_back_in_peft_with_our_outputs(kind, tmp_path):
    peft = pytest.importorskip("peft")
    model = fresh(kind)
    delta_model = OFTModel(model, oft_block_size=4, use_cayley_neumann=False, init_weights=False)
    ours = run(model, kind)
    folder = delta_model.save_peft(tmp_path / "exported")
    document = json.loads((folder / "adapter_config.json").read_text())
    assert document["peft_type"] == "OFT" and document["oft_block_size"] == 4
    backbone = linear_copy(fresh(kind))
    loaded = quiet(peft.PeftModel.from_pretrained, backbone, folder).eval()
    assert max_error(run(loaded, kind), ours) <= TOLERANCE
    back = AutoDeltaModel.from_finetuned(folder, backbone_model=fresh(kind))  # and back into ours
    assert max_error(run(back.backbone_model, kind), ours) <= TOLERANCE


@pytest.mark.parametrize(
    "fields, named",
    [
        ({"modules_to_save": ["classifier"]}, "modules_to_save"),
        ({"layers_to_transform": [0]}, "layers_to_transform"),
        ({"bias": "all"}, "bias='all'"),
        ({"some_future_option": 3}, "some_future_option"),
        ({"target_modules": "all-linear"}, "all-linear"),
        ({"peft_version": "0.17.0"}, "peft_version='0.17.0'"),
        ({"block_share": True}, "does not fit"),
        ({"target_modules": ["nothing_here"]}, "matches no module"),
        ({"target_modules": ["query"]}, "not one of the adapter's tensors"),
    ],
)
def test_folders_it_cannot_load_faithfully_are_refused_by_name_and_change_nothing(fields, named, tmp_path):
    folder, _ = saved("bert", tmp_path)
    check_refused(folder, fields, named)


def test_a_folder_whose_layers_peft_gave_other_block_sizes_is_refused_by_name(tmp_path):
    peft = pytest.importorskip("peft")
    config = peft.OFTConfig(target_modules=["query", "output.dense"], r=4, oft_block_size=0)  # 32 -> 8, 37 -> 37
    peft_model = quiet(peft.get_peft_model, linear_copy(fresh("bert")), config)
    assert {m.oft_R["default"].block_size for m in peft_model.modules() if hasattr(m, "oft_R")} == {8, 37}
    peft_model.save_pretrained(tmp_path / "mixed")
    model = fresh("bert")
    before = Pristine.of(model)
    with pytest.raises(CheckpointError, match="adjusted the block size"):
        AutoDeltaModel.from_finetuned(tmp_path / "mixed", backbone_model=model)
    before.assert_unchanged(model)
