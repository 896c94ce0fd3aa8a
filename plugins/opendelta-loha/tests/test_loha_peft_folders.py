"""PEFT LoHa folders load through ``from_finetuned`` with PEFT's outputs, or are refused; ``save_peft`` reads back."""

import json

import pytest
import torch
from loha_helpers import PEFT_TARGETS, copy_factors, fresh, ours_like_peft, peft_factors, peft_loha, run
from safetensors.torch import load_file, save_file

from opendelta import AutoDeltaModel, CheckpointError
from opendelta.testing import Pristine, tiny_model
from opendelta_loha import LoHaModel

peft = pytest.importorskip("peft")


def saved(kind, tmp_path, seed=3):
    peft_model = peft_loha(fresh(kind), kind, seed=seed)
    folder = tmp_path / f"peft-{kind}"
    peft_model.save_pretrained(folder)
    return folder, run(peft_model, kind)


@pytest.mark.parametrize("kind", tuple(PEFT_TARGETS))
def test_a_peft_loha_folder_loads_with_peft_outputs(kind, tmp_path):
    folder, expected = saved(kind, tmp_path)
    model = fresh(kind)
    delta_model = AutoDeltaModel.from_finetuned(folder, backbone_model=model)
    assert type(delta_model) is LoHaModel
    assert len({d.r for d in delta_model.deltas}) == 2  # the folder's rank_pattern
    assert (run(model, kind) - expected).abs().max().item() <= 1e-5
    again = LoHaModel.from_finetuned(folder, backbone_model=fresh(kind))
    assert torch.equal(again.deltas[0].hada_w2_b, delta_model.deltas[0].hada_w2_b)


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
        ({"r": 2.5}, "LoHaConfig.r"),
        ({"rank_pattern": {"value": 2}}, "shape"),  # the factors are rank 3 there
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
    save_file({**tensors, f"{name}.hada_t1": torch.zeros(3, 3, 1, 1)}, weights)
    with pytest.raises(CheckpointError, match="hada_t1"):
        AutoDeltaModel.from_finetuned(folder, backbone_model=fresh("bert"))


@pytest.mark.parametrize("kind", ("bert", "t5", "llama"))
def test_save_peft_reads_back_in_peft_with_our_outputs(kind, tmp_path):
    model = fresh(kind)
    factors = peft_factors(peft_loha(model, kind, seed=5))
    delta_model = ours_like_peft(model, kind)
    copy_factors(factors, delta_model)
    ours = run(model, kind)
    folder = delta_model.save_peft(tmp_path / "export")
    loaded = peft.PeftModel.from_pretrained(fresh(kind), folder).eval()
    assert (run(loaded, kind) - ours).abs().max().item() <= 1e-5
    assert (run(fresh(kind), kind) - ours).abs().max().item() > 1e-3


def test_save_peft_writes_a_fused_layer_update_as_the_whole_layer_with_zero_rows(tmp_path):
    model = tiny_model("phi3").eval()
    delta_model = LoHaModel(model, r=2, init_weights=False)  # attn.q, attn.v: rows of the fused qkv_proj
    assert all(t.parts is not None for t in delta_model.targets)
    ours = run(model, "phi3")
    folder = delta_model.save_peft(tmp_path / "export")
    loaded = peft.PeftModel.from_pretrained(tiny_model("phi3").eval(), folder).eval()
    assert (run(loaded, "phi3") - ours).abs().max().item() <= 1e-5
    again = AutoDeltaModel.from_finetuned(folder, backbone_model=tiny_model("phi3").eval())
    assert (run(again.backbone_model, "phi3") - ours).abs().max().item() <= 1e-5


def test_save_peft_refuses_targets_peft_cannot_build_loha_on():
    delta_model = LoHaModel(fresh("gpt2"))  # GPT-2's Conv1D
    with pytest.raises(CheckpointError, match="Conv1D"):
        delta_model.save_peft("unused")
