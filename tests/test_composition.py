"""Several delta models on one backbone and on one module (manual sections 1.7 and 1.8), with LoRA."""

import copy

import torch

from opendelta import LoraModel
from opendelta.testing import perturb, tiny_inputs, tiny_model


def run(model):
    with torch.no_grad():
        return model(**tiny_inputs("bart")).logits


def test_two_loras_on_one_module_compose_and_detach_in_any_order():
    model = tiny_model("bart")
    bare = run(model)
    first = LoraModel(backbone_model=model, modified_modules=["fc2"])
    perturb(first, seed=1)
    only_first = run(model)
    second = LoraModel(backbone_model=model, modified_modules=["fc2"], lora_r=2)
    perturb(second, seed=2)
    both = run(model)
    fc2 = model.model.encoder.layers[0].fc2
    assert {"lora", "lora_1"} <= set(dict(fc2.named_children()))
    first.detach()  # detach the first-added one first: the other keeps working
    second.detach()
    assert torch.equal(run(model), bare)
    first.attach()
    assert torch.equal(run(model), only_first)
    second.attach()
    torch.testing.assert_close(run(model), both, rtol=0, atol=1e-6)


def test_multitask_serving_switches_deltas_without_copies():
    model = tiny_model("bart")
    task_a = LoraModel(backbone_model=model, modified_modules=["fc2"])
    perturb(task_a, seed=3)
    out_a = run(model)
    task_a.detach()
    task_b = LoraModel(backbone_model=model, modified_modules=["fc1"])
    perturb(task_b, seed=4)
    out_b = run(model)
    task_b.detach()
    task_a.attach()
    assert torch.equal(run(model), out_a)
    task_a.detach()
    task_b.attach()
    assert torch.equal(run(model), out_b)


def test_deepcopy_of_a_modified_model_carries_its_own_deltas():
    model = tiny_model("gpt2")
    delta_model = LoraModel(backbone_model=model)
    perturb(delta_model)
    clone = copy.deepcopy(model)
    inputs = tiny_inputs("gpt2")
    with torch.no_grad():
        expected = model(**inputs).logits
        assert torch.equal(clone(**inputs).logits, expected)
        delta_model.detach()
        assert torch.equal(clone(**inputs).logits, expected)
        assert not torch.equal(model(**inputs).logits, expected)
