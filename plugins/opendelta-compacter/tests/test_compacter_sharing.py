"""Compacter's sharing options (refused by the original) and its fixed rule: identity, counting, save/load, detach."""

import torch
from torch import nn

from opendelta import AutoDeltaModel, count_parameters
from opendelta.testing import perturb, tiny_inputs, tiny_model
from opendelta_compacter import CompacterModel


def run(model, arch):
    with torch.no_grad():
        return model(**tiny_inputs(arch)).logits


def shared_model(arch="bart", **kwargs):
    model = tiny_model(arch)
    delta_model = CompacterModel(backbone_model=model, shared_phm_rule=True, shared_W_phm=True, **kwargs)
    return model, delta_model


def test_shared_rule_and_blocks_are_one_tensor_each_across_layers():
    _model, delta_model = shared_model()
    downs = [d.down_sampler for d in delta_model.deltas]
    ups = [d.up_sampler for d in delta_model.deltas]
    assert len(downs) == 8
    rule = downs[0].phm_rule
    assert all(s.phm_rule is rule for s in downs + ups)  # one rule for every projection
    assert all(d.W_left is downs[0].W_left and d.W_right is downs[0].W_right for d in downs)
    assert all(u.W_left is ups[0].W_left and u.W_right is ups[0].W_right for u in ups)
    assert ups[0].W_left is not downs[0].W_left
    assert len({id(d.b) for d in downs + ups}) == 16  # biases stay per layer


def test_shared_parameters_are_counted_and_trained_once():
    model, delta_model = shared_model()
    unique = 64 + (4 * 8 * 1 + 4 * 1 * 1) + (4 * 1 * 1 + 4 * 1 * 8) + 8 * (4 + 32)  # rule, W down, W up, biases
    assert sum(p.numel() for p in delta_model.parameters()) == unique
    assert count_parameters(model).delta == unique
    unshared = CompacterModel(backbone_model=tiny_model("bart"))
    assert sum(p.numel() for p in unshared.parameters()) == 8 * 236
    delta_model.freeze_module()
    perturb(delta_model)
    model.train()
    model(**tiny_inputs("bart")).logits.pow(2).mean().backward()
    rule = delta_model.deltas[0].down_sampler.phm_rule
    assert rule.requires_grad and rule.grad is not None and rule.grad.abs().sum() > 0
    # the gradient of a shared tensor sums every layer's contribution: detaching all but one layer changes it
    full = rule.grad.clone()
    rule.grad = None
    for insertion in list(delta_model.insertions())[1:]:
        insertion.detach()
    model(**tiny_inputs("bart")).logits.pow(2).mean().backward()
    assert not torch.allclose(rule.grad, full)


def test_save_and_load_with_sharing_restores_one_shared_tensor(tmp_path):
    model, delta_model = shared_model("t5")
    delta_model.freeze_module()
    perturb(delta_model)
    expected = run(model, "t5")
    state = delta_model.delta_state_dict()
    rules = [k for k in state if k.endswith("phm_rule")]
    assert len(rules) == 16 and all(torch.equal(state[k], state[rules[0]]) for k in rules)
    delta_model.save_finetuned(tmp_path / "delta")
    fresh = tiny_model("t5")
    loaded = AutoDeltaModel.from_finetuned(tmp_path / "delta", backbone_model=fresh)
    assert torch.equal(run(fresh, "t5"), expected)
    downs = [d.down_sampler for d in loaded.deltas]
    assert all(d.phm_rule is downs[0].phm_rule and d.W_left is downs[0].W_left for d in downs)
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in delta_model.parameters())


def test_detach_and_attach_keep_sharing_and_are_exact():
    model = tiny_model("bert")
    bare = run(model, "bert")
    delta_model = CompacterModel(backbone_model=model, shared_phm_rule=True, shared_W_phm=True)
    perturb(delta_model)
    attached = run(model, "bert")
    names = [n for n, _ in model.named_parameters()]
    delta_model.detach()
    assert torch.equal(run(model, "bert"), bare)
    delta_model.attach()
    assert torch.equal(run(model, "bert"), attached)
    assert [n for n, _ in model.named_parameters()] == names
    rule = delta_model.deltas[0].down_sampler.phm_rule
    assert all(d.up_sampler.phm_rule is rule for d in delta_model.deltas)
    with torch.no_grad():
        rule.mul_(3.0)  # one change reaches every layer
    assert not torch.equal(run(model, "bert"), attached)


def test_fixed_rule_is_a_saved_buffer_not_a_delta_parameter(tmp_path):
    model = tiny_model("roberta")
    delta_model = CompacterModel(backbone_model=model, learn_phm=False, shared_phm_rule=True)
    rule = delta_model.deltas[0].down_sampler.phm_rule
    assert not isinstance(rule, nn.Parameter) and not rule.requires_grad
    assert all(d.up_sampler.phm_rule is rule for d in delta_model.deltas)
    assert all(p is not rule for p in delta_model.parameters())
    delta_model.freeze_module()
    assert not rule.requires_grad
    perturb(delta_model)
    expected = run(model, "roberta")
    assert any(k.endswith("down_sampler.phm_rule") for k in delta_model.delta_state_dict())
    delta_model.save_finetuned(tmp_path / "delta")
    fresh = tiny_model("roberta")
    loaded = AutoDeltaModel.from_finetuned(tmp_path / "delta", backbone_model=fresh)
    assert torch.equal(loaded.deltas[0].down_sampler.phm_rule, rule)  # the random fixed rule came back
    assert torch.equal(run(fresh, "roberta"), expected)
