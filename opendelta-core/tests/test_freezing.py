import pytest
import torch

from opendelta.freezing import freeze_module, trainable_only_state_dict
from opendelta.insertion import delta_parameter_names
from opendelta.testing import perturb, tiny_inputs, tiny_model


def test_exclude_deltas_and_classifier(toy):
    model = tiny_model("bert")
    delta_model = toy(model)
    delta_model.freeze_module(exclude=["deltas", "classifier"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == delta_parameter_names(model) | {"classifier.weight", "classifier.bias"}
    assert set(model.state_dict()) == trainable


def test_bias_keyword_keeps_every_bias_trainable():
    model = tiny_model("bert")
    freeze_module(model, exclude=["bias"], set_state_dict=False)
    assert all(p.requires_grad == n.endswith("bias") for n, p in model.named_parameters())
    trainable = sum(1 for p in model.parameters() if p.requires_grad)
    assert len(model.state_dict()) >= sum(1 for _ in model.parameters()) > trainable  # full state_dict kept


def test_trainable_state_dict_restores_with_strict_false(toy):
    model = tiny_model("bert")
    delta_model = toy(model)
    perturb(delta_model)
    delta_model.freeze_module(exclude=["deltas", "classifier"], set_state_dict=True)
    with torch.no_grad():
        model.classifier.weight.add_(1.0)
        expected = model(**tiny_inputs("bert")).logits
    state = model.state_dict()
    fresh = tiny_model("bert")
    toy(fresh)
    result = fresh.load_state_dict(state, strict=False)
    assert not result.unexpected_keys
    with torch.no_grad():
        assert torch.equal(fresh(**tiny_inputs("bert")).logits, expected)


def test_freezing_twice_and_later_parameters_are_not_a_snapshot(toy):
    model = tiny_model("bert")
    delta_model = toy(model)
    delta_model.freeze_module()
    delta_model.freeze_module(exclude=["deltas", "pooler"])
    assert any(k.startswith("bert.pooler") for k in model.state_dict())
    model.extra = torch.nn.Linear(2, 2)  # created after freezing, trainable
    assert "extra.weight" in model.state_dict()


def test_the_trimmed_state_dict_loads_back_strictly_and_a_missing_trainable_key_is_still_reported(toy):
    model = tiny_model("bert")
    delta_model = toy(model)
    delta_model.freeze_module(exclude=["deltas", "classifier"])
    perturb(delta_model)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    frozen_before = model.bert.embeddings.word_embeddings.weight.clone()
    with torch.no_grad():
        for param in delta_model.parameters():
            param.zero_()
    assert model.load_state_dict(saved, strict=True).missing_keys == []  # frozen ones are not "missing"
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    assert torch.equal(model.bert.embeddings.word_embeddings.weight, frozen_before)
    wrapper = torch.nn.Sequential(model)  # loaded under a prefix, as a wrapper or DDP would
    assert wrapper.load_state_dict({f"0.{k}": v for k, v in saved.items()}).missing_keys == []
    dropped = dict(saved)
    dropped.pop("classifier.weight")
    with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict: \"classifier.weight\""):
        model.load_state_dict(dropped, strict=True)


def test_restoring_the_full_state_dict_restores_strict_loading(toy):
    model = tiny_model("bert")
    delta_model = toy(model)
    delta_model.freeze_module(exclude=["deltas"])
    trimmed = model.state_dict()
    trainable_only_state_dict(model, enable=False)
    assert len(model.state_dict()) > len(trimmed)
    with pytest.raises(RuntimeError, match="Missing key"):
        model.load_state_dict(trimmed, strict=True)
