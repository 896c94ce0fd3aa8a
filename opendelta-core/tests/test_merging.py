"""Merging deltas into the weights: exact both ways, idempotent, safe, partial, and unloading to a plain model."""

import pytest
import torch
from toy_method import ToyModel

from opendelta import DeltaStateError
from opendelta.hashing import backbone_hash
from opendelta.testing import model_output_tensor, perturb, tiny_inputs, tiny_model


class Offset(torch.nn.Module):
    """``h + c`` after a linear layer: an additive change of its bias, so it can merge."""

    def __init__(self, features):
        super().__init__()
        self.c = torch.nn.Parameter(torch.zeros(features))

    def forward(self, hidden):
        return hidden + self.c

    def can_merge(self, host):
        return isinstance(host, torch.nn.Linear)

    def merge_update(self, host):
        return {"bias": self.c.detach()}


class MergeableToy(ToyModel):
    def _build_delta(self, target):
        return Offset(self.features(target.module)[1])


def run(model):
    with torch.no_grad():
        return model_output_tensor(model(**tiny_inputs("bert")))


def merged_model():
    model = tiny_model("bert")
    delta_model = MergeableToy(model)
    perturb(delta_model, scale=0.2)
    return model, delta_model


def test_merge_gives_the_attached_outputs_with_no_hook_left_and_unmerge_restores(toy):
    model, delta_model = merged_model()
    bare_weights = {k: v.clone() for k, v in model.state_dict().items() if ".toy." not in k}
    attached = run(model)
    assert delta_model.merge() == 4 and delta_model.merged and not delta_model.attached
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    torch.testing.assert_close(run(model), attached)
    assert delta_model.merge() == 0, "merging twice is a no-op"
    delta_model.unmerge()
    assert delta_model.attached and not delta_model.merged
    torch.testing.assert_close(run(model), attached)
    for name, value in bare_weights.items():
        torch.testing.assert_close(model.state_dict()[name], value)


def test_merge_updates_the_same_parameter_objects_and_creates_missing_ones(toy):
    model, delta_model = merged_model()
    dense = model.bert.encoder.layer[0].attention.output.dense
    bias = dense.bias
    delta_model.merge()
    assert dense.bias is bias
    delta_model.unmerge()
    dense.bias = None  # a layer without a bias gets one while merged, and loses it again
    delta_model.merge()
    assert isinstance(dense.bias, torch.nn.Parameter)
    delta_model.unmerge()
    assert dense.bias is None


def test_safe_merge_refuses_nan_and_changes_nothing(toy):
    model, delta_model = merged_model()
    with torch.no_grad():
        delta_model.deltas[1].c[0] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(DeltaStateError, match="NaN or Inf"):
        delta_model.merge(safe_merge=True)
    assert delta_model.attached and not delta_model.merged
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0, equal_nan=True)


def test_detach_of_a_merged_model_unmerges_first_and_attach_needs_unmerge(toy):
    model = tiny_model("bert")
    bare = run(model)
    delta_model = MergeableToy(model)
    perturb(delta_model, scale=0.2)
    delta_model.merge()
    with pytest.raises(DeltaStateError, match="unmerge"):
        delta_model.attach()
    delta_model.detach()
    torch.testing.assert_close(run(model), bare)


def test_saving_a_merged_model_records_the_bare_backbones_hash(toy, tmp_path):
    _model, delta_model = merged_model()
    expected = backbone_hash(tiny_model("bert"))
    delta_model.freeze_module()
    delta_model.merge()
    delta_model.save_finetuned(tmp_path / "merged")
    assert delta_model.config.backbone_hash == expected


def test_a_delta_that_cannot_merge_is_named_and_nothing_changes(toy):
    model = tiny_model("bert")
    delta_model = ToyModel(model)
    with pytest.raises(DeltaStateError, match="no delta that can be folded"):
        delta_model.merge()
    with pytest.raises(DeltaStateError, match="cannot be merged"):
        delta_model.merge_and_unload()
    assert delta_model.attached


def test_merge_and_unload_returns_a_plain_model_that_save_pretrained_writes(toy, tmp_path):
    from transformers import BertForSequenceClassification

    model, delta_model = merged_model()
    delta_model.freeze_module(set_state_dict=True)
    attached = run(model)
    plain = delta_model.merge_and_unload()
    assert plain is model and not list(delta_model.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks or hasattr(m, "toy") for m in plain.modules())
    assert set(plain.state_dict()) == set(tiny_model("bert").state_dict())
    plain.save_pretrained(tmp_path / "plain")
    reloaded = BertForSequenceClassification.from_pretrained(tmp_path / "plain").eval()
    torch.testing.assert_close(run(reloaded), attached)
