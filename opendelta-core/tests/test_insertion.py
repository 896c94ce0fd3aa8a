import copy
import inspect
import pickle

import pytest
import torch
from torch import nn

from opendelta.errors import DeltaStateError
from opendelta.insertion import insert_parallel_module, insert_sequential_module, replace_module


class AddConst(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = nn.Parameter(torch.tensor(float(c)))

    def forward(self, x):
        return x + self.c


class Times(nn.Module):
    def __init__(self, k):
        super().__init__()
        self.k = nn.Parameter(torch.tensor(float(k)))

    def forward(self, x):
        return x * self.k


class KeywordOnly(nn.Module):
    """Called like OPT's attention: keywords only, returns a tuple."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 3)

    def forward(self, *, hidden_states, attention_mask=None):
        return self.linear(hidden_states), None


def linear():
    torch.manual_seed(0)
    return nn.Linear(3, 3)


X = torch.ones(2, 3)


def test_after_deltas_run_in_the_order_added():
    layer = linear()
    base = layer(X)
    insert_sequential_module(layer, AddConst(1), "d")
    insert_sequential_module(layer, Times(2), "d")
    assert torch.equal(layer(X), (base + 1) * 2)


def test_before_deltas_run_last_added_first():
    layer = linear()
    insert_sequential_module(layer, AddConst(1), "d", position="before")
    insert_sequential_module(layer, Times(2), "d", position="before")
    assert torch.allclose(layer(X), linear()(X * 2 + 1))


def test_parallel_adds_delta_of_the_input():
    layer = linear()
    insert_parallel_module(layer, Times(3), "p")
    assert torch.allclose(layer(X), linear()(X) + 3 * X)


def test_detach_in_any_order_then_everything_is_as_before():
    layer = linear()
    base, keys = layer(X), list(layer.state_dict())
    a = insert_sequential_module(layer, AddConst(1), "d")
    b = insert_sequential_module(layer, Times(2), "d")
    c = insert_parallel_module(layer, Times(5), "p")
    full = layer(X)
    a.detach()
    assert torch.allclose(layer(X), base * 2 + 5 * X)
    c.detach()
    b.detach()
    assert torch.equal(layer(X), base)
    assert list(layer.state_dict()) == keys
    assert not layer._forward_hooks and not layer._forward_pre_hooks
    assert not hasattr(layer, "_opendelta_slots")
    for insertion in (c, a, b):
        insertion.attach()
    assert torch.equal(layer(X), full)  # the original order comes back whatever the re-attach order


def test_twice_is_a_clear_error():
    insertion = insert_sequential_module(linear(), AddConst(1))
    with pytest.raises(DeltaStateError, match="already attached"):
        insertion.attach()
    insertion.detach()
    with pytest.raises(DeltaStateError, match="already detached"):
        insertion.detach()


def test_keyword_calls_and_tuple_outputs():
    module = KeywordOnly()
    base = module(hidden_states=X)[0]
    insert_parallel_module(module, Times(2), "p")
    insert_sequential_module(module, AddConst(1), "s")
    out, extra = module(hidden_states=X, attention_mask=None)
    assert extra is None and torch.allclose(out, base + 2 * X + 1)


def test_class_docstring_and_signature_are_untouched():
    layer = linear()
    signature, doc = inspect.signature(layer.forward), layer.forward.__doc__
    insert_parallel_module(layer, Times(2))
    assert type(layer) is nn.Linear
    assert inspect.signature(layer.forward) == signature and layer.forward.__doc__ == doc


def test_replace_module_swaps_and_restores():
    parent = nn.Sequential(linear())
    original = parent[0]
    new = nn.Sequential(original, Times(2))
    insertion = replace_module(parent, "0", original, new, wrapped="0")
    assert parent[0] is new and new.__doc__ == original.__doc__
    assert torch.allclose(parent(X), original(X) * 2)
    insertion.detach()
    assert parent[0] is original


def test_deepcopy_runs_its_own_deltas():
    model = nn.Sequential(linear())
    insertion = insert_sequential_module(model[0], AddConst(1), "d")
    clone = copy.deepcopy(model)
    expected = model(X)
    with torch.no_grad():
        clone[0].d.c.fill_(10)
    assert torch.equal(model(X), expected)
    assert torch.allclose(clone(X), linear()(X) + 10)
    insertion.detach()
    assert torch.allclose(clone(X), linear()(X) + 10)


def test_pickle_round_trip_keeps_deltas():
    model = nn.Sequential(linear())
    insert_parallel_module(model[0], Times(3), "p")
    again = pickle.loads(pickle.dumps(model))
    assert torch.equal(again(X), model(X))


def test_delta_follows_the_hosts_eval_mode():
    layer = linear().eval()
    insert_sequential_module(layer, nn.Dropout(0.9), "drop")
    assert torch.equal(layer(X), linear()(X))


def test_spanning_parallel_delta_adds_f_of_the_first_input_to_the_second_output():
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 3))
    base = block(X)
    insertion = insert_parallel_module(block[0], Times(3), "p", output_module=block[2])
    assert "p" in dict(block[2].named_children()) and "p" not in dict(block[0].named_children())
    assert torch.allclose(block(X), base + 3 * X)
    again = pickle.loads(pickle.dumps(block))
    assert torch.allclose(again(X), base + 3 * X)
    insertion.detach()
    assert torch.equal(block(X), base)
    for layer in (block[0], block[2]):
        assert not layer._forward_hooks and not layer._forward_pre_hooks and not hasattr(layer, "_opendelta_slots")
    insertion.attach()
    assert torch.allclose(block(X), base + 3 * X)


def test_spanning_delta_without_its_input_is_a_clear_error():
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    insert_parallel_module(block[0], Times(3), "p", output_module=block[1])
    with pytest.raises(DeltaStateError, match="did not run before"):
        block[1](X)


def test_a_spanning_delta_sees_the_input_after_the_before_deltas_like_a_plain_parallel_one():
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    first, second = (nn.functional.linear(X * 2, block[0].weight, block[0].bias), block[1])
    insert_sequential_module(block[0], Times(2), "b", position="before")
    insert_parallel_module(block[0], Times(5), "span", output_module=block[1])
    with torch.no_grad():
        expected = nn.functional.linear(first, second.weight, second.bias) + 5 * (2 * X)
        assert torch.allclose(block(X), expected)
