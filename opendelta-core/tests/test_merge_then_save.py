"""Merge, then save (issue 12, item 2): never a checkpoint that applies the delta twice, never an empty delta model.

A merged delta folds ``delta`` into its module's parameters. Saving those parameters beside the delta (they require
grad) would load as ``W + delta`` with the delta added again on top, under a hash that is not the backbone's: such a
save is refused and names the fix. With them frozen, a merged save records the delta and the backbone's own hash,
and loads once. After ``merge_and_unload()`` every call on the emptied delta model raises ``DeltaStateError``.
"""

from __future__ import annotations

import pytest
import torch
from test_merging import MergeableToy

from opendelta import DeltaStateError
from opendelta.testing import model_output_tensor, perturb, tiny_inputs, tiny_model


def run(model):
    model.eval()
    with torch.no_grad():
        return model_output_tensor(model(**tiny_inputs("bert")))


def merged_with(exclude):
    """A tiny BERT with a perturbed mergeable delta, frozen except ``exclude``, its outputs, then merged."""
    model = tiny_model("bert")
    delta_model = MergeableToy(model)
    perturb(delta_model, scale=0.2)
    delta_model.freeze_module(exclude=exclude)
    expected = run(model)
    assert delta_model.merge() > 0
    return model, delta_model, expected


@pytest.mark.parametrize(
    "exclude",
    [None, ["deltas", "attention.output.dense"], ["deltas", "classifier", "layer.0.output.dense.bias"]],
    ids=["whole-backbone", "merged-modules", "one-merged-bias"],
)
def test_a_merged_save_of_trainable_merged_parameters_is_refused_before_writing(toy, tmp_path, exclude):
    model, delta_model, _ = merged_with(["deltas"] if exclude is None else exclude)
    if exclude is None:
        for param in model.parameters():
            param.requires_grad_(True)
    folder = tmp_path / "ckpt"
    with pytest.raises(DeltaStateError, match=r"unmerge\(\).*freeze") as info:
        delta_model.save_finetuned(folder)
    assert "bias" in str(info.value) and "twice" in str(info.value)
    assert not folder.exists() or not any(folder.iterdir()), "a refused save wrote something"
    assert delta_model.merged, "refusing changed the delta model's state"


def test_an_explicit_state_dict_holding_a_merged_parameter_is_refused(toy, tmp_path):
    model, delta_model, _ = merged_with(["deltas"])
    name = "bert.encoder.layer.0.output.dense.bias"
    tensors = {**delta_model.delta_state_dict(), name: model.get_parameter(name).detach()}
    with pytest.raises(DeltaStateError, match=name.replace(".", r"\.")):
        delta_model.save_finetuned(tmp_path / "ckpt", state_dict=tensors)


def test_unmerge_then_save_round_trips_the_trainable_backbone_once(toy, tmp_path):
    model, delta_model, _ = merged_with(["deltas", "attention.output.dense", "classifier"])
    delta_model.unmerge()  # the fix the refusal names
    with torch.no_grad():  # the trainable backbone part was trained too
        model.bert.encoder.layer[0].attention.output.dense.weight.mul_(1.5)
    expected = run(model)
    delta_model.save_finetuned(tmp_path / "ckpt")
    fresh = tiny_model("bert")
    loaded = MergeableToy.from_finetuned(tmp_path / "ckpt", fresh)  # its own backbone: the hash checks out
    torch.testing.assert_close(run(fresh), expected)
    loaded.merge()
    torch.testing.assert_close(run(fresh), expected)


def test_a_merged_save_with_the_merged_modules_frozen_loads_the_delta_once(toy, tmp_path):
    model, delta_model, _ = merged_with(["deltas", "classifier"])  # a trained head, merged modules frozen
    with torch.no_grad():
        model.classifier.weight.add_(0.5)  # the head was trained: it is saved, the merged biases are not
    expected = run(model)
    delta_model.save_finetuned(tmp_path / "ckpt")
    fresh = tiny_model("bert")
    MergeableToy.from_finetuned(tmp_path / "ckpt", fresh)  # no BackboneMismatchError: the pre-merge hash
    torch.testing.assert_close(run(fresh), expected)  # applied once: twice would differ
    for name, param in fresh.named_parameters():
        if name.endswith("output.dense.bias"):
            torch.testing.assert_close(param, tiny_model("bert").get_parameter(name))


def unloaded(tmp_path):
    model, delta_model, expected = merged_with(["deltas"])
    assert delta_model.merge_and_unload() is model
    return model, delta_model, expected


CALLS = {
    "save_finetuned": lambda d, path: d.save_finetuned(path),
    "save_finetuned-state_dict": lambda d, path: d.save_finetuned(path, state_dict={}),
    "delta_state_dict": lambda d, path: d.delta_state_dict(),
    "attach": lambda d, path: d.attach(),
    "detach": lambda d, path: d.detach(),
    "merge": lambda d, path: d.merge(),
    "unmerge": lambda d, path: d.unmerge(),
    "merge_and_unload": lambda d, path: d.merge_and_unload(),
    "freeze_module": lambda d, path: d.freeze_module(),
}


@pytest.mark.parametrize("call", CALLS.values(), ids=CALLS.keys())
def test_every_call_after_merge_and_unload_raises_delta_state_error(toy, tmp_path, call):
    model, delta_model, expected = unloaded(tmp_path)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    with pytest.raises(DeltaStateError, match=r"after merge_and_unload\(\).*save_pretrained"):
        call(delta_model, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()
    torch.testing.assert_close(run(model), expected)  # the plain model is untouched
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
