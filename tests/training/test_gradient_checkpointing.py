"""Gradient checkpointing recomputes the layers, deltas included, and gives the gradients computed without it.

Deltas run in forward hooks and child modules of the checkpointed layers, so the recomputation in backward must run
them again (counted here), and every delta gradient must equal the one of an ordinary backward pass, for both
``torch.utils.checkpoint`` implementations. The reentrant one also needs the frozen embeddings' output to require
grad (``ensure_input_grads``); without it the deltas inside the layers get no gradient, shown below.
"""

import pytest
import torch
from torch import nn

from opendelta import get_method
from opendelta.integrations import checkpointing_enabled, enable_gradient_checkpointing, ensure_input_grads
from opendelta.integrations.checkpointing import _has_input_grad_hook
from opendelta.testing import model_output_tensor, tiny_inputs, tiny_model

ARCHS = ("bert", "gpt2", "t5")
METHODS = ("lora", "adapter", "prefix")


def _delta_model(arch, method):
    model = tiny_model(arch)
    torch.manual_seed(1)
    delta = get_method(method).model_cls(model)
    with torch.no_grad():  # move every delta off its (often zero) init so every gradient is non-trivial
        for param in delta.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    delta.freeze_module(exclude=["deltas"])
    model.train()
    return model, delta


def _grads(model, delta, arch):
    loss = model_output_tensor(model(**tiny_inputs(arch))).float().pow(2).mean()
    loss.backward()
    return {name: tensor.grad for name, tensor in _named_delta_params(delta).items()}


def _named_delta_params(delta):
    return dict(delta.named_parameters())


def _count_calls(delta):
    """Count the calls of the first module a delta modifies (its hooks run the delta inside each call)."""
    calls = {"n": 0}

    def count(module, args, output):
        calls["n"] += 1

    next(delta.insertions()).host.register_forward_hook(count)
    return calls


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non_reentrant", "reentrant"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ARCHS)
def test_checkpointed_gradients_equal_plain_gradients(arch, method, use_reentrant):
    plain_model, plain_delta = _delta_model(arch, method)
    plain_calls = _count_calls(plain_delta)
    expected = _grads(plain_model, plain_delta, arch)

    model, delta = _delta_model(arch, method)
    enable_gradient_checkpointing(model, use_reentrant=use_reentrant)
    assert checkpointing_enabled(model)
    calls = _count_calls(delta)
    got = _grads(model, delta, arch)

    assert plain_calls["n"] == 1
    assert calls["n"] == 2, "backward must recompute the modified module, running its delta again"
    assert set(got) == set(expected)
    for name, grad in got.items():
        assert grad is not None, f"{name} got no gradient under checkpointing"
        assert expected[name].abs().max() > 0, f"{name}: the reference gradient is zero, the check would be vacuous"
        torch.testing.assert_close(grad, expected[name], rtol=1e-5, atol=1e-7, msg=name)


def test_transformers_own_switch_with_ensure_input_grads():
    """``model.gradient_checkpointing_enable(...)`` itself, as existing training scripts call it."""
    plain_model, plain_delta = _delta_model("bert", "lora")
    expected = _grads(plain_model, plain_delta, "bert")
    model, delta = _delta_model("bert", "lora")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    ensure_input_grads(model)
    got = _grads(model, delta, "bert")
    for name, grad in got.items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-5, atol=1e-7, msg=name)


def test_reentrant_checkpointing_without_input_grads_trains_no_delta():
    """Why ensure_input_grads exists: transformers 4.57 does not call it for a non-PEFT model (5.x does)."""
    model, _ = _delta_model("bert", "lora")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    if _has_input_grad_hook(model):
        model.disable_input_require_grads()
    with pytest.warns(UserWarning, match="None of the inputs have requires_grad=True"):
        loss = model(**tiny_inputs("bert")).logits.pow(2).mean()
    with pytest.raises(RuntimeError, match="does not require grad"):
        loss.backward()

    assert ensure_input_grads(model) is True
    assert ensure_input_grads(model) is False  # once is enough
    model(**tiny_inputs("bert")).logits.pow(2).mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_trainable_embeddings_need_no_hook():
    model, delta = _delta_model("bert", "lora")
    delta.freeze_module(exclude=["deltas", "word_embeddings"])
    assert ensure_input_grads(model) is False
    assert not _has_input_grad_hook(model)


def test_non_transformers_models_are_refused_with_the_reason():
    with pytest.raises(TypeError, match="get_input_embeddings"):
        ensure_input_grads(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="gradient_checkpointing_enable"):
        enable_gradient_checkpointing(nn.Linear(2, 2))
    _, delta = _delta_model("bert", "lora")
    with pytest.raises(TypeError, match="not a wrapper"):
        ensure_input_grads(delta)
