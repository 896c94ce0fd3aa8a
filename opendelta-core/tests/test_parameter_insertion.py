"""The "parameter" placement: a delta changes a stacked weight as its module's forward reads it, and nothing else.

A toy experts module (a 3-D parameter indexed per expert inside its own forward, like transformers 5's) stands in
for the real ones, which the LoRA plugin's tests cover on Mixtral, Qwen-MoE and OLMoE.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

from opendelta.expert_stacks import StackLayout, is_expert_list, stack_layout, stacked_parameters
from opendelta.parameter_insertion import insert_parameter_delta


class ToyExperts(nn.Module):
    """Expert ``e`` computes ``x @ weight[e].T`` for the rows routed to it (``route``: one expert per row)."""

    def __init__(self, experts: int = 3, out: int = 5, inner: int = 4) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(experts, out, inner))
        self.bias = nn.Parameter(torch.randn(experts, out))  # 2-D: not a stacked weight
        self.fail = False

    def forward(self, x: torch.Tensor, route: torch.Tensor) -> torch.Tensor:
        if self.fail:
            raise RuntimeError("the forward failed")
        return torch.stack([x[i] @ self.weight[e].T + self.bias[e] for i, e in enumerate(route.tolist())])


class AddOffset(nn.Module):
    """``weight + offset`` (one trainable offset per expert slice)."""

    def __init__(self, shape: torch.Size) -> None:
        super().__init__()
        self.offset = nn.Parameter(torch.randn(shape))

    def updated(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.offset


class Double(nn.Module):
    def updated(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * 2


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(6, 4, generator=generator), torch.tensor([0, 2, 1, 2, 0, 0])


def _reference(experts: ToyExperts, weight: torch.Tensor) -> torch.Tensor:
    """What a bare module of the same biases whose stored weight is ``weight`` computes."""
    bare = ToyExperts(*experts.weight.shape)
    with torch.no_grad():
        bare.weight.copy_(weight)
        bare.bias.copy_(experts.bias)
    return bare(*_inputs())


def test_the_forward_reads_the_changed_weight_and_each_row_its_own_expert():
    torch.manual_seed(0)
    experts = ToyExperts()
    delta = AddOffset(experts.weight.shape)
    insert_parameter_delta(experts, "weight", delta, "offset")
    with torch.no_grad():
        torch.testing.assert_close(experts(*_inputs()), _reference(experts, experts.weight + delta.offset))


def test_the_stored_parameter_state_dict_and_its_order_stay_the_bare_modules():
    torch.manual_seed(0)
    experts = ToyExperts()
    stored, pointer, keys = experts.weight.detach().clone(), experts.weight.data_ptr(), list(experts.state_dict())
    insertion = insert_parameter_delta(experts, "weight", AddOffset(experts.weight.shape), "offset")
    experts(*_inputs())
    assert "weight" not in experts.__dict__  # only while the forward runs
    assert torch.equal(experts.weight, stored) and experts.weight.data_ptr() == pointer
    assert [k for k in experts.state_dict() if not k.startswith("offset")] == keys
    insertion.detach()
    assert list(experts.state_dict()) == keys and not experts._forward_hooks and not experts._forward_pre_hooks


def test_gradients_reach_the_delta_not_the_frozen_weight():
    torch.manual_seed(0)
    experts = ToyExperts()
    experts.weight.requires_grad_(False)
    delta = AddOffset(experts.weight.shape)
    insert_parameter_delta(experts, "weight", delta, "offset")
    experts(*_inputs()).sum().backward()
    assert experts.weight.grad is None
    assert delta.offset.grad[[0, 1, 2]].abs().sum() > 0


def test_two_deltas_on_one_parameter_apply_in_the_order_they_were_added():
    torch.manual_seed(0)
    experts = ToyExperts()
    offset = AddOffset(experts.weight.shape)
    insert_parameter_delta(experts, "weight", offset, "offset")
    doubled = insert_parameter_delta(experts, "weight", Double(), "double")
    with torch.no_grad():
        torch.testing.assert_close(experts(*_inputs()), _reference(experts, (experts.weight + offset.offset) * 2))
        doubled.detach()
        torch.testing.assert_close(experts(*_inputs()), _reference(experts, experts.weight + offset.offset))


def test_a_forward_that_raised_leaves_nothing_once_detached():
    torch.manual_seed(0)
    experts = ToyExperts()
    bare = experts(*_inputs())
    insertion = insert_parameter_delta(experts, "weight", AddOffset(experts.weight.shape), "offset")
    experts.fail = True
    with pytest.raises(RuntimeError, match="the forward failed"):
        experts(*_inputs())
    insertion.detach()
    experts.fail = False
    assert "weight" not in experts.__dict__ and torch.equal(experts(*_inputs()), bare)


def test_copies_and_pickles_carry_the_delta():
    torch.manual_seed(0)
    experts = ToyExperts()
    insert_parameter_delta(experts, "weight", AddOffset(experts.weight.shape), "offset")
    with torch.no_grad():
        expected = experts(*_inputs())
        for copied in (copy.deepcopy(experts), pickle.loads(pickle.dumps(experts))):
            assert torch.equal(copied(*_inputs()), expected)


def test_a_missing_parameter_or_a_delta_without_updated_is_refused_by_name():
    experts = ToyExperts()
    with pytest.raises(ValueError, match=r"no parameter 'wieght'.*\['bias', 'weight'\]"):
        insert_parameter_delta(experts, "wieght", Double(), "double")
    with pytest.raises(TypeError, match=r"Linear cannot change ToyExperts\.weight.*updated\(weight\)"):
        insert_parameter_delta(experts, "weight", nn.Linear(2, 2), "linear")
    assert not experts._forward_pre_hooks and not experts._modules


def test_stacks_and_their_layout_are_recognised():
    experts = ToyExperts(experts=3, out=5, inner=4)
    assert list(stacked_parameters(experts)) == ["weight"]
    assert stack_layout(experts, "weight") == StackLayout(3, 4, 5, False)
    experts.is_transposed = True  # transformers' flag for [experts, in, out] slices
    assert stack_layout(experts, "weight") == StackLayout(3, 5, 4, True)
    with pytest.raises(ValueError, match=r"bias is not a stacked expert weight.*\['weight'\]"):
        stack_layout(experts, "bias")
    assert stacked_parameters(nn.Linear(2, 3)) == {}
    assert is_expert_list("model.layers.0.mlp.experts", nn.ModuleList([nn.Linear(2, 2)]))
    assert not is_expert_list("model.layers", nn.ModuleList([nn.Linear(2, 2)]))
