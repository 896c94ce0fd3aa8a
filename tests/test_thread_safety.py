"""Safe under threads (issue 12.8) with real plugins: forwards in some threads, switches in others, no mix, no crash.

LoRA (parallel), Adapter (sequential) and prefix tuning (attention handlers and satellites) on tiny BERT and GPT-2:
every forward returns exactly the output of one whole state, and the model ends where attach()/detach() work. Core's
mechanism with a test-only method, and the step-by-step cases: ``opendelta-core/tests/test_threads.py``.
"""

from __future__ import annotations

import itertools
import threading

import pytest
import torch

from opendelta import get_method, list_methods
from opendelta.testing import model_output_tensor, perturb, tiny_inputs, tiny_model
from opendelta.testing.threads import in_threads, let_others_run, switch_back_and_forth, switching_threads_often

INSTALLED = {spec.name for spec in list_methods()}
METHODS = [m for m in ("lora", "adapter", "prefix") if m in INSTALLED]
ONE_FORWARD_AT_A_TIME = {"prefix"}
"""Methods whose forward passes keep per-call state in shared objects (prefix tuning switches the model config's
attention implementation for the call): two forwards at once interfere even with no switch, a separate limitation;
they are tested with one forward thread beside the switching one."""
FIRST_LAYER = {"bert": "bert.encoder.layer.0", "gpt2": "transformer.h.0"}


@pytest.fixture(autouse=True)
def switch_threads_often():
    """Switch threads every few microseconds (not 5 ms), so that races show within a short test."""
    with switching_threads_often():
        yield


def out(model, arch):
    with torch.no_grad():
        return model_output_tensor(model(**tiny_inputs(arch)))


def build(model, method, seed):
    torch.manual_seed(seed)
    delta_model = get_method(method).model_cls(model)
    perturb(delta_model, seed=seed, scale=0.5)
    return delta_model


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
@pytest.mark.parametrize("method", METHODS)
def test_forwards_while_switching_see_the_attached_or_the_bare_model_exactly(method, arch):
    model = tiny_model(arch).eval()
    delta_model = build(model, method, seed=1)
    on = out(model, arch)
    delta_model.detach()
    off = out(model, arch)
    delta_model.attach()
    assert not torch.equal(on, off)
    stop, seen = threading.Event(), []

    def forwards():
        while not stop.is_set():
            result = out(model, arch)
            seen.append(0 if torch.equal(result, on) else 1 if torch.equal(result, off) else 2)

    def switches():
        switch_back_and_forth(delta_model, 40, seen, stop)

    readers = [forwards] * (1 if method in ONE_FORWARD_AT_A_TIME else 2)
    assert in_threads(*readers, switches) == []
    assert seen and 2 not in seen, f"{seen.count(2)} of {len(seen)} forwards mixed the two states"
    assert delta_model.attached and torch.equal(out(model, arch), on)
    delta_model.detach()
    assert torch.equal(out(model, arch), off)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("start_attached", [True, False], ids=["detach-mid-forward", "attach-mid-forward"])
def test_a_switch_while_a_forward_is_in_its_first_layer_does_not_reach_that_forward(method, start_attached):
    arch = "gpt2"
    model = tiny_model(arch).eval()
    delta_model = build(model, method, seed=2)
    on = out(model, arch)
    delta_model.detach()
    off = out(model, arch)
    if start_attached:
        delta_model.attach()
    entered, switched, outputs = threading.Event(), threading.Event(), []

    def pause(module, args, output):  # the user's own hook: the forward stops in its first layer
        if threading.current_thread() is not threading.main_thread():
            entered.set()
            switched.wait(1.0)  # a detach waits for this forward, so this times out and the forward goes on

    def switch():
        entered.wait(10)
        delta_model.detach() if start_attached else delta_model.attach()
        switched.set()

    handle = model.get_submodule(FIRST_LAYER[arch]).register_forward_hook(pause)
    try:
        assert in_threads(lambda: outputs.append(out(model, arch)), switch) == []
    finally:
        handle.remove()
    assert torch.equal(outputs[0], on if start_attached else off)
    assert torch.equal(out(model, arch), off if start_attached else on)


def test_two_delta_models_switched_from_two_threads_under_forwards():
    """LoRA and an adapter on one backbone, each toggled by its own thread: every forward is one of four states."""
    arch = "bert"
    model = tiny_model(arch).eval()
    lora, adapter = build(model, "lora", seed=3), build(model, "adapter", seed=4)
    references = {}
    for lora_on, adapter_on in itertools.product((True, False), repeat=2):
        for delta_model, wanted in ((lora, lora_on), (adapter, adapter_on)):
            if delta_model.attached != wanted:
                delta_model.attach() if wanted else delta_model.detach()
        references[lora_on, adapter_on] = out(model, arch)
    stop, seen = threading.Event(), []

    def forwards():
        while not stop.is_set():
            result = out(model, arch)
            seen.append(any(torch.equal(result, r) for r in references.values()))

    def toggles(delta_model):
        def run():
            for _ in range(40):
                delta_model.detach() if delta_model.attached else delta_model.attach()
                let_others_run(seen)

        return run

    def both():
        try:
            assert in_threads(toggles(lora), toggles(adapter)) == []
        finally:
            stop.set()

    assert in_threads(forwards, forwards, both) == []
    assert seen and all(seen), f"{seen.count(False)} of {len(seen)} forwards matched no state"
    for delta_model in (lora, adapter):
        if not delta_model.attached:
            delta_model.attach()
    assert torch.equal(out(model, arch), references[True, True])
    lora.attach()  # attaching an attached delta model is a no-op
    assert torch.equal(out(model, arch), references[True, True])
