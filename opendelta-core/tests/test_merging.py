"""Merging deltas into the weights: exact both ways, idempotent, safe, partial, and unloading to a plain model."""

import pytest
import torch
from toy_method import Scale, ToyModel

from opendelta import DeltaStateError
from opendelta.hashing import backbone_hash
from opendelta.testing import model_output_tensor, perturb, tiny_inputs, tiny_model


class MergeableScale(Scale):
    """``h * (1 + s)`` after a linear layer is the linear layer ``diag(1 + s) W, (1 + s) b``."""

    def can_merge(self, host):
        return isinstance(host, torch.nn.Linear)

    def merged_parameters(self, host):
        factor = 1 + self.s.detach()
        return {"weight": host.weight * factor[:, None], "bias": host.bias * factor}

    def unmerged_parameters(self, host):
        factor = 1 + self.s.detach()
        return {"weight": host.weight / factor[:, None], "bias": host.bias / factor}


class MergeableToy(ToyModel):
    def _build_delta(self, target):
        return MergeableScale(self.features(target.module)[1])


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


def test_merge_updates_the_same_parameter_objects(toy):
    model, delta_model = merged_model()
    dense = model.bert.encoder.layer[0].attention.output.dense
    weight = dense.weight
    delta_model.merge()
    assert dense.weight is weight


def test_safe_merge_refuses_nan_and_changes_nothing(toy):
    model, delta_model = merged_model()
    with torch.no_grad():
        delta_model.deltas[1].s[0] = float("nan")
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
