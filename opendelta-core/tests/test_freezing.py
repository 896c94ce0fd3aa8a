import torch

from opendelta.freezing import freeze_module
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
