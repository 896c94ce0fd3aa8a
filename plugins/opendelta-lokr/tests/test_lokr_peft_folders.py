"""PEFT LoKr folders load through ``from_finetuned`` with PEFT's outputs, or are refused; ``save_peft`` reads back."""

import json

import pytest
import torch
from lokr_helpers import PEFT_TARGETS, copy_factors, fresh, ours_like_peft, peft_factors, peft_lokr, run
from safetensors.torch import load_file, save_file

from opendelta import AutoDeltaModel, CheckpointError
from opendelta.testing import Pristine, tiny_model
from opendelta_lokr import LoKrModel

peft = pytest.importorskip("peft")


def saved(kind, tmp_path, seed=3):
    peft_model = peft_lokr(fresh(kind), kind, seed=seed)
    folder = tmp_path / f"peft-{kind}"
    peft_model.save_pretrained(folder)
    return folder, run(peft_model, kind)


@pytest.mark.parametrize("kind", tuple(PEFT_TARGETS))
def test_a_peft_lokr_folder_loads_with_peft_outputs(kind, tmp_path):
    folder, expected = saved(kind, tmp_path)
    model = fresh(kind)
    delta_model = AutoDeltaModel.from_finetuned(folder, backbone_model=model)
    assert type(delta_model) is LoKrModel
    assert len({d.r for d in delta_model.deltas}) == 2  # the folder's rank_pattern
    assert (run(model, kind) - expected).abs().max().item() <= 1e-5
    again = LoKrModel.from_finetuned(folder, backbone_model=fresh(kind))
    assert all(torch.equal(a, b) for a, b in zip(again.parameters(), delta_model.parameters(), strict=True))


def _edit(folder, **fields):
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, **fields}))


@pytest.mark.parametrize(
    "fields, named",
    [
        ({"modules_to_save": ["classifier"]}, "modules_to_save"),
        ({"layers_to_transform": [0]}, "layers_to_transform"),
        ({"some_future_option": 3}, "some_future_option"),
        ({"target_modules": "all-linear"}, "all-linear"),
        ({"target_modules": ["nothing_here"]}, "matches no module"),
        ({"target_modules": ["LayerNorm"]}, "linear layers only"),
        ({"r": 2.5}, "LoKrConfig.r"),
        ({"rank_pattern": {}}, "lokr_w1"),  # value's factors are full there, decomposed at r=1
        ({"decompose_factor": 0}, "decompose_factor"),
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


def test_convolution_factors_are_refused_by_name(tmp_path):
    folder, _ = saved("bert", tmp_path)
    weights = folder / "adapter_model.safetensors"
    tensors = load_file(weights)
    name = next(iter(tensors)).rpartition(".")[0]
    save_file({**tensors, f"{name}.lokr_t2": torch.zeros(1, 1, 3, 3)}, weights)
    with pytest.raises(CheckpointError, match="lokr_t2"):
        AutoDeltaModel.from_finetuned(folder, backbone_model=fresh("bert"))


@pytest.mark.parametrize("kind", ("bert", "t5", "llama"))
def test_save_peft_reads_back_in_peft_with_our_outputs(kind, tmp_path):
    model = fresh(kind)
    factors = peft_factors(peft_lokr(model, kind, seed=5))
    delta_model = ours_like_peft(model, kind)
    copy_factors(factors, delta_model)
    ours = run(model, kind)
    folder = delta_model.save_peft(tmp_path / "export")
    loaded = peft.PeftModel.from_pretrained(fresh(kind), folder).eval()
    assert (run(loaded, kind) - ours).abs().max().item() <= 1e-5
    assert (run(fresh(kind), kind) - ours).abs().max().item() > 1e-3


def test_save_peft_of_a_whole_fused_layer_reads_back_in_peft(tmp_path):
    model = tiny_model("phi3").eval()
    delta_model = LoKrModel(model, modified_modules=["qkv_proj"], r=2, init_weights=False)
    ours = run(model, "phi3")
    folder = delta_model.save_peft(tmp_path / "export")
    loaded = peft.PeftModel.from_pretrained(tiny_model("phi3").eval(), folder).eval()
    assert (run(loaded, "phi3") - ours).abs().max().item() <= 1e-5
    again = AutoDeltaModel.from_finetuned(folder, backbone_model=tiny_model("phi3").eval())
    assert (run(again.backbone_model, "phi3") - ours).abs().max().item() <= 1e-5


@pytest.mark.parametrize(
    "kind, named",
    [("gpt2", "Conv1D"), ("phi3", "some parts of the fused")],  # defaults: a Conv1D; q and v rows of qkv_proj
)
def test_save_peft_refuses_what_peft_s_lokr_cannot_express(kind, named):
    delta_model = LoKrModel(tiny_model(kind))
    with pytest.raises(CheckpointError, match=named):
        delta_model.save_peft("unused")
