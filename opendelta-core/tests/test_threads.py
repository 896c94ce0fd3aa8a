"""Safe under threads: a forward pass while another thread switches sees the old or the new state, never a mix.

Real threads on a real (tiny) BERT with the test-only toy method. The looping tests assert only on what each forward
returned and on the final state (no timing); the two step-by-step tests pause a forward pass inside a layer with a
plain forward hook of the user's, so the switch lands mid-forward every time.
"""

import threading

import pytest
import torch
from toy_method import ToyModel

from opendelta import DeltaStateError
from opendelta.testing import model_output_tensor, perturb, tiny_inputs, tiny_model
from opendelta.testing.threads import in_threads, switch_back_and_forth, switching_threads_often

MODULES = ["attention.output.dense", "output.dense"]
LAYER0 = "bert.encoder.layer.0.output"
WAIT = 1.0  # seconds a paused forward waits for a switch that (correctly) waits for it in turn


def run(model):
    with torch.no_grad():
        return model_output_tensor(model(**tiny_inputs("bert")))


@pytest.fixture(autouse=True)
def switch_threads_often():
    """Let the interpreter switch threads every few microseconds (not 5 ms), so that races show in a short test."""
    with switching_threads_often():
        yield


@pytest.fixture
def setup(toy):
    torch.manual_seed(0)
    model = tiny_model("bert").eval()
    delta_model = ToyModel(model, modified_modules=MODULES)
    perturb(delta_model, scale=0.5)
    on = run(model)
    delta_model.detach()
    off = run(model)
    delta_model.attach()
    assert not torch.equal(on, off)
    return model, delta_model, on, off


def assert_consistent(model, delta_model, on, off):
    """Every delta in or every delta out, and attach()/detach() both work from there."""
    flags = {i.attached for i in delta_model.insertions()}
    assert len(flags) == 1, "some deltas attached, some not"
    if not delta_model.attached:
        delta_model.attach()
    assert torch.equal(run(model), on)
    delta_model.detach()
    assert torch.equal(run(model), off)
    delta_model.attach()
    assert torch.equal(run(model), on)


def test_forwards_while_another_thread_switches_see_either_state_exactly(setup):
    model, delta_model, on, off = setup
    stop, seen = threading.Event(), []

    def forwards():
        while not stop.is_set():
            out = run(model)
            seen.append(0 if torch.equal(out, on) else 1 if torch.equal(out, off) else 2)

    def switches():
        switch_back_and_forth(delta_model, 150, seen, stop)

    assert in_threads(forwards, forwards, forwards, switches) == []
    assert seen and 2 not in seen, f"{seen.count(2)} of {len(seen)} forwards mixed the attached and detached states"
    assert_consistent(model, delta_model, on, off)


def test_modules_called_on_their_own_while_switching_never_fail(setup):
    """Outside a backbone forward there is no gate: a hook meeting a delta detached meanwhile skips it."""
    model, delta_model, _on, _off = setup
    host = model.get_submodule(LAYER0 + ".dense")
    x = torch.randn(2, 7, host.in_features)
    with torch.no_grad():
        with_delta = host(x)
        delta_model.detach()
        bare = host(x)
        delta_model.attach()
    stop, seen = threading.Event(), []

    def calls():
        with torch.no_grad():
            while not stop.is_set():
                out = host(x)
                seen.append(torch.equal(out, with_delta) or torch.equal(out, bare))

    def switches():
        switch_back_and_forth(delta_model, 300, seen, stop)

    assert in_threads(calls, calls, switches) == []
    assert seen and all(seen)


def test_attach_and_detach_from_two_threads_serialise(setup):
    model, delta_model, on, off = setup
    refused = []

    def toggles():
        for _ in range(150):
            try:
                delta_model.detach() if delta_model.attached else delta_model.attach()
            except DeltaStateError as error:  # the other thread switched between the check and the call
                assert "already" in str(error), error
                refused.append(error)

    def forwards():
        for _ in range(40):
            out = run(model)
            assert torch.equal(out, on) or torch.equal(out, off)

    assert in_threads(toggles, toggles, forwards) == []
    assert_consistent(model, delta_model, on, off)


def pause_in_layer0(model, entered, resume):
    """A user's forward hook in the first layer: signals ``entered`` and waits (bounded) for ``resume``."""

    def hook(module, args, output):
        if threading.current_thread() is not threading.main_thread():
            entered.set()
            resume.wait(WAIT)

    return model.get_submodule(LAYER0).register_forward_hook(hook)


@pytest.mark.parametrize("start_attached", [True, False], ids=["detach-mid-forward", "attach-mid-forward"])
def test_a_switch_landing_mid_forward_leaves_that_forward_in_the_old_state(setup, start_attached):
    """The first layer has run when the other thread switches: the rest of the forward must not see the switch.

    A detach waits for the running forward (which times out its pause and finishes, attached); an attach onto a
    bare backbone has no forward to wait for (none entered a gate), and the forward goes on seeing no delta.
    """
    model, delta_model, on, off = setup
    if not start_attached:
        delta_model.detach()
    entered, switched, outputs = threading.Event(), threading.Event(), []
    handle = pause_in_layer0(model, entered, switched)
    try:

        def forward():
            outputs.append(run(model))

        def switch():
            entered.wait(10)
            delta_model.detach() if start_attached else delta_model.attach()
            switched.set()

        assert in_threads(forward, switch) == []
    finally:
        handle.remove()
    assert torch.equal(outputs[0], on if start_attached else off)
    assert delta_model.attached is not start_attached
    assert torch.equal(run(model), off if start_attached else on)
    assert_consistent(model, delta_model, on, off)


def test_switching_inside_a_forward_of_the_same_thread_is_refused_not_a_deadlock(setup):
    model, delta_model, on, off = setup
    calls = []

    def hook(module, args, output):
        calls.append(1)
        delta_model.detach()

    handle = model.get_submodule(LAYER0).register_forward_hook(hook)
    try:
        with pytest.raises(DeltaStateError, match=r"inside a forward pass of the same .* in the same thread"):
            errors = in_threads(lambda: run(model))
            raise errors[0] if errors else AssertionError("detach() inside the forward was not refused")
    finally:
        handle.remove()
    assert calls == [1] and delta_model.attached
    assert in_threads(delta_model.detach) == [], "the refused forward left the gate held"
    assert torch.equal(run(model), off)
    assert_consistent(model, delta_model, on, off)


def test_a_forward_that_raises_leaves_the_gate_so_switches_still_run(setup):
    """Bad inputs (a token id past the vocabulary, a wrong dtype) fail inside the forward; the gate is let go."""
    model, delta_model, on, off = setup
    inputs = tiny_inputs("bert")
    bad_inputs = [
        {**inputs, "input_ids": inputs["input_ids"] + 10_000},
        {**inputs, "input_ids": inputs["input_ids"].float()},
        {"input_ids": inputs["input_ids"][0, 0]},
    ]
    for bad in bad_inputs:
        errors = in_threads(lambda bad=bad: model(**bad))
        assert len(errors) == 1 and not isinstance(errors[0], DeltaStateError), errors
    assert in_threads(delta_model.detach) == [], "a failed forward left the gate held"
    assert torch.equal(run(model), off)
    assert_consistent(model, delta_model, on, off)
