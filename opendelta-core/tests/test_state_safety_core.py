"""State safety of core's own mechanisms, with test-only methods: the orders and moves no shipped plugin exercises.

Replacements are the one insertion whose detach/attach order matters; merging moves a delta in front of sequential
deltas added before it; a move of the backbone reaches only attached deltas; freezing reaches only attached
parameters. Each either works exactly or refuses with a DeltaStateError, changing nothing.
"""

import copy

import pytest
import torch
from test_merging import MergeableToy
from torch import nn
from toy_method import ToyModel

from opendelta import DeltaStateError
from opendelta.testing import model_output_tensor, perturb, tiny_inputs, tiny_model


class Wrap(nn.Module):
    """Stands in for the module it wraps: ``m(x) * (1 + s)``, a replacement keeping the original inside."""

    wrapped_name = "inner"

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.s = nn.Parameter(torch.zeros(()))

    def forward(self, *args, **kwargs):
        return self.inner(*args, **kwargs) * (1 + self.s)


class WrapToy(ToyModel):
    insertion = "replace"

    def _build_delta(self, target):
        return Wrap(target.module)


FIRST = "bert.encoder.layer.0.attention.output.dense"
SECOND = "bert.encoder.layer.1.attention.output.dense"


def run(model):
    with torch.no_grad():
        return model_output_tensor(model(**tiny_inputs("bert")))


def state(model):
    """What a refused call must leave as it was: outputs, and which module sits where."""
    return run(model).tolist(), [(n, type(m).__name__) for n, m in model.named_modules()]


def swap(model, name, new):
    """The user's own surgery on the backbone (a quantizer swapping a layer), behind the delta model's back."""
    parent, _, child = name.rpartition(".")
    old = model.get_submodule(name)
    setattr(model.get_submodule(parent), child, new)
    return old


def test_a_replacement_swapped_out_behind_its_back_is_refused_and_the_others_stay_as_they_were(toy):
    model = tiny_model("bert")
    pristine = copy.deepcopy(model)
    delta_model = WrapToy(model, modified_modules=[FIRST, SECOND])
    with torch.no_grad():  # not perturb(): delta_model.parameters() holds the wrapped originals too
        for delta, value in zip(delta_model.deltas, (0.3, -0.2), strict=True):
            delta.s.fill_(value)
    ours = swap(model, FIRST, Wrap(model.get_submodule(FIRST)))  # a no-op stand-in: outputs unchanged
    before = state(model)
    with pytest.raises(DeltaStateError, match="replaced it since; detach that one first"):
        delta_model.detach()  # SECOND came out first: it must be back
    assert delta_model.attached and state(model) == before
    swap(model, FIRST, ours)
    delta_model.detach()
    assert torch.equal(run(model), run(pristine))
    swap(model, SECOND, nn.Linear(32, 32))
    before = state(model)
    with pytest.raises(DeltaStateError, match="is not the one it replaced"):
        delta_model.attach()  # FIRST went in first: it must be out again
    assert not delta_model.attached and state(model) == before


def test_a_merge_that_would_run_before_an_older_sequential_delta_is_refused(toy):
    model = tiny_model("bert")
    older = ToyModel(model)  # h * (1 + s) after the same modules: not additive, order matters
    perturb(older, seed=1)
    mergeable = MergeableToy(model)
    perturb(mergeable, seed=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = run(model)
    with pytest.raises(DeltaStateError, match="Nothing was merged"):
        mergeable.merge()
    assert mergeable.attached and not mergeable.merged and torch.equal(run(model), out)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    older.detach()  # without it the merge is exact; re-attaching it while merged would reorder, so it is refused
    alone = run(model)
    mergeable.merge()
    torch.testing.assert_close(run(model), alone)
    with pytest.raises(DeltaStateError, match="unmerge"):
        older.attach()
    assert not older.attached
    torch.testing.assert_close(run(model), alone)
    mergeable.unmerge()
    older.attach()
    assert torch.equal(run(model), out)
    assert not any("_opendelta_merged" in vars(m) for m in model.modules())


def test_a_merge_after_the_older_sequential_deltas_is_exact(toy):
    model = tiny_model("bert")
    mergeable = MergeableToy(model)  # added first: runs first, as a merged delta does
    perturb(mergeable, seed=2)
    later = ToyModel(model)
    perturb(later, seed=1)
    out = run(model)
    mergeable.merge()
    torch.testing.assert_close(run(model), out)
    later.detach()  # a younger delta comes and goes freely around a merged one
    later.attach()
    torch.testing.assert_close(run(model), out)


@pytest.mark.parametrize(
    "exclude",
    [None, [], ["classifier"], ["deltas", "classifier"], ["layer.1.attention.output.dense.toy"]],
    ids=["config", "nothing", "head", "deltas-and-head", "one-delta-by-name"],
)
def test_freezing_while_detached_then_attaching_equals_attaching_then_freezing(toy, exclude):
    def flags(model):
        return {n: p.requires_grad for n, p in model.named_parameters()}

    reference = tiny_model("bert")
    ToyModel(reference).freeze_module(exclude=exclude)
    model = tiny_model("bert")
    delta_model = ToyModel(model)
    delta_model.detach()
    delta_model.freeze_module(exclude=exclude)
    assert flags(model) == {n: "classifier" in n and "classifier" in str(exclude) for n in flags(model)}
    delta_model.attach()
    assert flags(model) == flags(reference)
    assert list(model.state_dict()) == list(reference.state_dict())


def test_attach_moves_a_delta_as_the_backbone_moved_while_it_was_out_and_nothing_else(toy):
    model = tiny_model("bert")
    delta_model = ToyModel(model)
    delta_model.detach()
    delta_model.double()  # the user's own choice for the deltas, with the backbone where it was: kept
    delta_model.attach()
    assert {p.dtype for p in delta_model.parameters()} == {torch.float64}
    delta_model.detach()
    model.to("meta")  # a device move, testable without an accelerator; the deltas' own dtype stays theirs
    delta_model.attach()
    assert {(p.device.type, p.dtype) for p in delta_model.parameters()} == {("meta", torch.float64)}


def test_unmerge_after_a_delta_was_reshaped_while_merged_refuses_and_changes_nothing(toy):
    model = tiny_model("bert")
    mergeable = MergeableToy(model)
    perturb(mergeable, seed=2)
    attached = run(model)
    mergeable.merge()
    merged = {k: v.clone() for k, v in model.state_dict().items()}
    mergeable.deltas[0].c = nn.Parameter(torch.zeros(3))  # the user's surgery on a merged delta
    with pytest.raises(DeltaStateError, match="other names or shapes while it was merged"):
        mergeable.unmerge()
    assert mergeable.merged
    assert all(torch.equal(v, merged[k]) for k, v in model.state_dict().items())
    torch.testing.assert_close(run(model), attached)
