"""A LoRA trained in float32 loads onto the same backbone in float16 or bfloat16: it is the same backbone.

The backbone hash the checkpoint records is exact (dtype included), so the half-precision backbone is recognised by
the rounded hashes it also records (opendelta.hashing); the delta and the saved head are cast to the backbone's
dtype on load. Tolerances on the logits (magnitude about 1) of the tiny BERT: 5e-3 in float16, 2e-2 in bfloat16
(measured: 7.5e-4 and 1.5e-3).
"""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from opendelta import AutoDeltaModel, BackboneMismatchError
from opendelta.testing import perturb, tiny_inputs, tiny_model
from opendelta_lora import LoraModel

TOLERANCE = {torch.float16: 5e-3, torch.bfloat16: 2e-2}
HALF = [torch.float16, torch.bfloat16]


def logits(model):
    with torch.no_grad():
        return model(**tiny_inputs("bert")).logits


def train(model, path):
    """Stand-in for training: move the LoRA weights and the head, then save delta and head."""
    delta_model = LoraModel(backbone_model=model)
    perturb(delta_model)
    with torch.no_grad():
        model.classifier.weight.add_(0.5)
    delta_model.freeze_module(exclude=["deltas", "classifier"])
    delta_model.save_finetuned(path)
    return logits(model)


@pytest.fixture
def trained(tmp_path):
    model = tiny_model("bert")
    return tmp_path / "lora", train(model, tmp_path / "lora")


def saved_tensors(path):
    config = json.loads((path / "config.json").read_text())
    return load_file(str(path / config["weights_file"]))


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_float32_lora_loads_onto_the_same_backbone_cast_to_half(trained, dtype):
    path, expected = trained
    backbone = tiny_model("bert").to(dtype)
    delta_model = AutoDeltaModel.from_finetuned(path, backbone_model=backbone)
    assert {p.dtype for p in delta_model.parameters()} == {dtype}  # the delta follows the backbone
    tensors = saved_tensors(path)
    for name, tensor in delta_model.delta_state_dict().items():
        assert torch.equal(tensor, tensors[name].to(dtype))
    assert torch.equal(backbone.classifier.weight, tensors["classifier.weight"].to(dtype))
    out = logits(backbone)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), expected, atol=TOLERANCE[dtype], rtol=0)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_float32_lora_loads_onto_the_same_weights_read_from_disk_in_half(trained, tmp_path, dtype):
    path, expected = trained
    tiny_model("bert").save_pretrained(tmp_path / "backbone")  # the weights it was trained on, as a real checkpoint
    backbone = AutoModelForSequenceClassification.from_pretrained(tmp_path / "backbone", dtype=dtype)
    AutoDeltaModel.from_finetuned(path, backbone_model=backbone)
    torch.testing.assert_close(logits(backbone).float(), expected, atol=TOLERANCE[dtype], rtol=0)


def test_a_lora_trained_in_bfloat16_loads_onto_the_float32_weights(tmp_path):
    expected = train(tiny_model("bert").to(torch.bfloat16), tmp_path / "lora")
    backbone = tiny_model("bert")
    delta_model = AutoDeltaModel.from_finetuned(tmp_path / "lora", backbone_model=backbone)
    assert {p.dtype for p in delta_model.parameters()} == {torch.float32}
    torch.testing.assert_close(logits(backbone), expected.float(), atol=TOLERANCE[torch.bfloat16], rtol=0)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_other_weights_in_half_are_still_another_backbone(trained, dtype):
    path, _ = trained
    with pytest.raises(BackboneMismatchError, match="trained on another backbone"):
        AutoDeltaModel.from_finetuned(path, backbone_model=tiny_model("bert", seed=1).to(dtype))
