"""State safety of every installed delta method (issue 7.5): each sequence of state changes works or refuses clearly.

Detaching or attaching twice, several delta models taken out and put back in every order, freezing while detached,
moving the backbone's dtype with deltas in or out, copying and pickling the backbone or the delta model, merging
interleaved with all of these: each either gives exactly what the attached reference (or, detached, the pristine
backbone: a deep copy taken before any delta was added) gives, or raises a DeltaStateError that leaves the state as
it was. The conformance battery (``opendelta.testing.suites``) covers one detach/attach round trip; this file covers
what comes around it. Core's own mechanisms with test-only methods: ``opendelta-core/tests/test_state_safety_core``.
"""

from __future__ import annotations

import copy
import io
import itertools
import pickle
import re

import pytest
import torch

from opendelta import DeltaStateError, get_method, list_methods
from opendelta.insertion import delta_parameter_names
from opendelta.testing import Pristine, model_output_tensor, perturb, tiny_inputs, tiny_model

METHODS = [spec.name for spec in list_methods()]
ARCHS = ("bert", "gpt2", "t5")  # encoder, decoder-only with a fused attention, encoder-decoder
NEIGHBOURS = tuple(m for m in ("bitfit", "lora") if m in METHODS)
"""The delta models added before and after the one under test: BitFit puts a delta after every linear layer and
layer norm, LoRA one beside the query/value projections, so they share modules with every method."""

every_method = pytest.mark.parametrize("method", METHODS)
every_arch = pytest.mark.parametrize("arch", ARCHS)


def out(model, arch):
    with torch.no_grad():
        return model_output_tensor(model(**tiny_inputs(arch)))


def build(model, method, seed):
    """``method`` on ``model`` with weights that depend on ``seed`` only, not on what was built before."""
    torch.manual_seed(1000 + seed)
    delta_model = get_method(method).model_cls(model)
    perturb(delta_model, seed=seed)
    return delta_model


def setup(method, arch):
    """The backbone, its pristine copy, the delta model, and the attached reference output."""
    model = tiny_model(arch)
    pristine = copy.deepcopy(model)
    delta_model = build(model, method, seed=1)
    return model, pristine, delta_model, out(model, arch)


def assert_pristine(model, pristine, arch):
    """``model`` is ``pristine`` again: outputs, state_dict, modules, hooks, flags, and no attribute of ours left."""
    assert torch.equal(out(model, arch), out(pristine, arch))
    Pristine.of(pristine).assert_unchanged(model)


def assert_same_tensors(model, reference):
    state, expected = model.state_dict(), reference.state_dict()
    assert list(state) == list(expected)
    assert all(torch.equal(state[k], v) for k, v in expected.items())


@every_arch
@every_method
def test_detach_and_attach_twice_are_no_ops_that_change_nothing(method, arch):
    model, pristine, delta_model, attached = setup(method, arch)
    delta_model.detach()
    assert_pristine(model, pristine, arch)
    delta_model.detach()  # a no-op, as in OpenDelta 0.3.2
    assert not delta_model.attached
    assert_pristine(model, pristine, arch)
    delta_model.attach()
    assert torch.equal(out(model, arch), attached)
    delta_model.attach()
    assert delta_model.attached and torch.equal(out(model, arch), attached)
    delta_model.detach()
    assert_pristine(model, pristine, arch)


@every_arch
@every_method
def test_detach_leaves_the_backbone_config_as_it_was(method, arch):
    """Nor does a forward pass with the deltas in change it (``save_pretrained`` would write that into config.json)."""
    model, pristine, delta_model, _attached = setup(method, arch)  # setup ran a forward pass

    def configs(backbone):  # T5's stacks hold copies of the model's config
        return {n: m.config.to_dict() for n, m in backbone.named_modules() if hasattr(vars(m).get("config"), "to_dict")}

    assert configs(model) == configs(pristine)
    delta_model.detach()
    assert configs(model) == configs(pristine)


@every_arch
@every_method
def test_several_delta_models_detach_and_attach_in_every_order(method, arch):
    """The method between two others on one backbone; every order out and back in gives the oracle's outputs.

    The oracle for a set of attached delta models is a fresh backbone with only those, built in the same order.
    """
    methods = [*NEIGHBOURS[:1], method, *NEIGHBOURS[1:]]
    model = tiny_model(arch)
    pristine = copy.deepcopy(model)
    delta_models = [build(model, m, seed) for seed, m in enumerate(methods)]
    oracles: dict[frozenset[int], torch.Tensor] = {}

    def expected(attached):
        key = frozenset(attached)
        if key not in oracles:
            fresh = copy.deepcopy(pristine)
            for seed, m in enumerate(methods):
                if seed in key:
                    build(fresh, m, seed)
            oracles[key] = out(fresh, arch)
        return oracles[key]

    assert torch.equal(out(model, arch), expected(range(len(methods))))
    for order in itertools.permutations(range(len(methods))):
        attached = set(order)
        for index in order:
            delta_models[index].detach()
            attached.discard(index)
            assert torch.equal(out(model, arch), expected(attached)), f"detached {order}, at {index}"
        assert_pristine(model, pristine, arch)
        for index in order:
            delta_models[index].attach()
            attached.add(index)
            assert torch.equal(out(model, arch), expected(attached)), f"attached {order}, at {index}"


@every_arch
@every_method
def test_reattaching_where_a_second_delta_model_of_the_method_now_is(method, arch):
    """A method the backbone takes once per module (a prefix per attention) refuses the second delta model when it
    is built, and likewise the first's attach() once the second took its place; any other method then runs both as
    built in that order (or fails as that does: two 100-token prompts do not fit in 128 positions)."""
    model, pristine, first, attached = setup(method, arch)
    try:
        build(model, method, seed=2).detach()
        exclusive = False
    except DeltaStateError:
        exclusive = True
    first.detach()
    second = build(model, method, seed=3)
    with_second = out(model, arch)
    if exclusive:
        with pytest.raises(DeltaStateError, match="detach that delta model first"):
            first.attach()
        assert not first.attached and torch.equal(out(model, arch), with_second)
        second.detach()
        first.attach()
        assert torch.equal(out(model, arch), attached)
        first.detach()
        assert_pristine(model, pristine, arch)
        return
    first.attach()
    oracle = copy.deepcopy(pristine)
    build(oracle, method, seed=1)
    build(oracle, method, seed=3)
    try:
        expected = out(oracle, arch)
    except DeltaStateError as error:
        with pytest.raises(DeltaStateError, match=re.escape(str(error))):
            out(model, arch)
    else:
        assert torch.equal(out(model, arch), expected)
    first.detach()
    second.detach()
    assert_pristine(model, pristine, arch)


@every_arch
@every_method
def test_freezing_while_detached_then_attaching_equals_attaching_then_freezing(method, arch):
    reference, _pristine, frozen_attached, _attached = setup(method, arch)
    frozen_attached.freeze_module()
    model, _pristine, delta_model, _attached = setup(method, arch)
    delta_model.detach()
    delta_model.freeze_module()
    assert not any(p.requires_grad for p in model.parameters()), "the detached deltas are not the backbone's"
    assert all(p.requires_grad for p in delta_model.parameters())
    delta_model.attach()
    assert [(n, p.requires_grad) for n, p in model.named_parameters()] == [
        (n, p.requires_grad) for n, p in reference.named_parameters()
    ]
    assert list(model.state_dict()) == list(reference.state_dict())


@every_arch
@every_method
@pytest.mark.parametrize(
    ("move", "dtype"),
    [
        ("detached", torch.float64),
        ("detached", torch.bfloat16),
        ("detached", torch.float16),
        ("attached", torch.float64),
    ],
    ids=["detached-float64", "detached-bfloat16", "detached-half", "attached-float64"],
)
def test_a_backbone_moved_to_another_dtype_runs_its_deltas_in_it(method, arch, move, dtype):
    """Moved with the deltas out, attach() moves them as ``.to()`` would have: outputs equal the moved model's."""
    model, pristine, delta_model, attached = setup(method, arch)
    moved = copy.deepcopy(model).to(dtype)  # the attached reference, moved with its deltas in
    if move == "attached":
        model.to(dtype)
        torch.testing.assert_close(out(model, arch).float(), attached, rtol=1e-4, atol=1e-5)
        delta_model.detach()
    else:
        delta_model.detach()
        model.half() if dtype is torch.float16 else model.to(dtype)
    assert_pristine(model, pristine.to(dtype), arch)
    delta_model.attach()
    assert {p.dtype for p in delta_model.parameters() if p.is_floating_point()} == {dtype}
    assert torch.equal(out(model, arch), out(moved, arch))
    assert_same_tensors(model, moved)


@every_arch
@every_method
def test_copies_of_a_backbone_with_deltas_run_their_own(method, arch):
    """deepcopy, pickle and torch.save of the whole module: independent models with working deltas; the delta
    model keeps controlling the original only, and refuses a copy with a message saying what to do instead."""
    model, pristine, delta_model, attached = setup(method, arch)
    saved = io.BytesIO()
    torch.save(model, saved)
    saved.seek(0)
    copies = [copy.deepcopy(model), pickle.loads(pickle.dumps(model)), torch.load(saved, weights_only=False)]
    pointers = {p.data_ptr() for p in model.parameters()}
    for clone in copies:
        assert torch.equal(out(clone, arch), attached)
        assert_same_tensors(clone, model)
        assert not pointers & {p.data_ptr() for p in clone.parameters()}
        assert delta_parameter_names(clone) == delta_parameter_names(model)
    delta_model.detach()
    assert_pristine(model, pristine, arch)
    with pytest.raises(DeltaStateError, match="deepcopy"):
        delta_model.attach(copies[0])
    assert not delta_model.attached
    assert_pristine(model, pristine, arch)
    for clone in copies:
        assert torch.equal(out(clone, arch), attached)
    with torch.no_grad():  # a copy's deltas are its own
        for name, param in copies[0].named_parameters():
            if name in delta_parameter_names(copies[0]):
                param.add_(1.0)
    delta_model.attach()
    assert torch.equal(out(model, arch), attached)


@every_arch
@every_method
def test_a_copied_or_pickled_delta_model_brings_its_backbone_along_and_controls_that_one(method, arch):
    """A delta model and its backbone are one object graph: copying the delta model copies both, consistently."""
    model, pristine, delta_model, attached = setup(method, arch)
    for again in (copy.deepcopy(delta_model), pickle.loads(pickle.dumps(delta_model))):
        assert again.attached and again.backbone_model is not model
        assert torch.equal(out(again.backbone_model, arch), attached)
        again.detach()
        assert_pristine(again.backbone_model, pristine, arch)
        assert delta_model.attached and torch.equal(out(model, arch), attached)
        again.attach()
        assert torch.equal(out(again.backbone_model, arch), attached)
    pair = copy.deepcopy((model, delta_model))  # copied together: the copy's delta model holds the copied backbone
    assert pair[1].backbone_model is pair[0]
    delta_model.detach()
    detached_copy = copy.deepcopy(delta_model)
    assert not detached_copy.attached
    detached_copy.attach()
    assert torch.equal(out(detached_copy.backbone_model, arch), attached)
    assert_pristine(model, pristine, arch)


def _mergeable(delta_model):
    from opendelta.merging import is_mergeable

    return any(is_mergeable(i.delta, i.host) for i in delta_model.insertions())


@every_arch
@every_method
def test_merge_and_unmerge_interleaved_with_detach_attach_copies_and_moves(method, arch):
    """Unmerged weights come back to within float rounding (``opendelta.merging``); every refusal changes nothing."""
    model, pristine, delta_model, attached = setup(method, arch)

    def assert_close_to_pristine(backbone):
        state, expected = backbone.state_dict(), pristine.state_dict()
        assert list(state) == list(expected)
        for name, value in expected.items():
            torch.testing.assert_close(state[name], value, msg=name)

    with pytest.raises(DeltaStateError, match="is not merged"):
        delta_model.unmerge()
    if not _mergeable(delta_model):
        with pytest.raises(DeltaStateError, match="no delta that can be folded"):
            delta_model.merge()
        assert delta_model.attached and not delta_model.merged and torch.equal(out(model, arch), attached)
        return
    moved = copy.deepcopy(model).to(torch.float64)
    assert delta_model.merge() > 0 and delta_model.merge() == 0
    torch.testing.assert_close(out(model, arch), attached)
    with pytest.raises(DeltaStateError, match="unmerge"):
        delta_model.attach()
    assert delta_model.merged
    torch.testing.assert_close(out(model, arch), attached)

    copied = copy.deepcopy(delta_model)  # merged bookkeeping travels with the copy: parameters merging created go
    copied.unmerge()
    copied.detach()
    assert_close_to_pristine(copied.backbone_model)

    trained = {k: v.clone() for k, v in delta_model.state_dict().items()}
    perturb(delta_model, seed=7)  # changed while merged: unmerge takes out what merge put in
    changed = {k: v.clone() for k, v in delta_model.state_dict().items()}
    delta_model.unmerge()
    assert all(torch.equal(v, changed[k]) for k, v in delta_model.state_dict().items())
    delta_model.detach()
    assert_close_to_pristine(model)
    with pytest.raises(DeltaStateError, match="attach\\(\\) it before merging"):
        delta_model.merge()
    assert not delta_model.merged
    torch.testing.assert_close(out(model, arch), out(pristine, arch))

    delta_model.load_state_dict(trained)  # the weights of ``moved`` again
    delta_model.attach()
    delta_model.merge()
    model.to(torch.float64)  # moved while merged: the deltas, outside, follow at unmerge
    delta_model.unmerge()  # the float32 rounding of the merge stays: float32 tolerances
    tolerance = {"rtol": 1.3e-6, "atol": 1e-5}
    torch.testing.assert_close(out(model, arch), out(moved, arch), **tolerance)
    assert {p.dtype for p in delta_model.parameters() if p.is_floating_point()} == {torch.float64}
    delta_model.merge()
    delta_model.detach()  # unmerges first
    assert not delta_model.merged and not delta_model.attached
    torch.testing.assert_close(out(model, arch), out(pristine.to(torch.float64), arch), **tolerance)
