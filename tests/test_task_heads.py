"""Per-task heads (``modules_to_save``) with real methods: two classification tasks on one tiny BERT, an LM head."""

import json

import pytest
import torch

from opendelta import AutoDeltaModel, CheckpointError, DeltaStateError, LoraModel, route_rows
from opendelta.task_heads import HeadDispatcher
from opendelta.testing import perturb, tiny_inputs, tiny_model

CLS = "BertForSequenceClassification"


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def only(task, tasks, model, inputs):
    """The logits with ``task`` alone attached (``None``: none), every task attached again afterwards."""
    for other in tasks:
        other.detach()
    try:
        if task is not None:
            task.attach()
        return logits(model, inputs)
    finally:
        for other in tasks:
            other.attach()


@pytest.fixture
def two_tasks():
    model = tiny_model("bert", CLS)
    first = LoraModel(model, modified_modules=["query"], lora_r=4, modules_to_save=["classifier"])
    perturb(first, seed=1, scale=0.5)
    second = LoraModel(model, modified_modules=["value"], lora_r=2, modules_to_save=["classifier"])
    perturb(second, seed=2, scale=0.5)
    return model, first, second


def test_two_tasks_saved_and_loaded_onto_a_fresh_backbone_give_the_same(two_tasks, tmp_path):
    model, first, second = two_tasks
    inputs = tiny_inputs("bert", batch=3)
    expected = {name: only(t, [first, second], model, inputs) for name, t in (("a", first), ("b", second))}
    assert not torch.allclose(expected["a"], expected["b"])
    for name, task in (("a", first), ("b", second)):
        task.freeze_module(exclude=["deltas"])
        task.save_finetuned(tmp_path / name)
        config = json.loads((tmp_path / name / "config.json").read_text())
        assert config["modules_to_save"] == ["classifier"]
    fresh = tiny_model("bert", CLS)
    bare = logits(fresh, inputs)
    loaded = [AutoDeltaModel.from_finetuned(tmp_path / name, fresh) for name in ("a", "b")]
    assert all(t.config.modules_to_save == ["classifier"] for t in loaded)
    for name, task in zip(("a", "b"), loaded, strict=True):
        torch.testing.assert_close(only(task, loaded, fresh, inputs), expected[name])
    with route_rows(fresh, [loaded[1], None, loaded[0]]):
        routed = logits(fresh, inputs)
    torch.testing.assert_close(routed[0], expected["b"][0])
    torch.testing.assert_close(routed[1], bare[1])
    torch.testing.assert_close(routed[2], expected["a"][2])


def test_detaching_both_gives_the_original_head_bit_for_bit(two_tasks):
    model, first, second = two_tasks
    inputs = tiny_inputs("bert", batch=3)
    first.detach()
    second.detach()
    original = model.classifier
    weight = original.weight.detach().clone()
    bare = logits(model, inputs)
    first.attach()
    second.attach()
    first.freeze_module(exclude=["deltas"])
    optimizer = torch.optim.SGD([p for p in first.parameters() if p.requires_grad], lr=1.0)
    model(**inputs).logits.sum().backward()
    optimizer.step()
    first.detach()
    second.detach()
    assert model.classifier is original and torch.equal(original.weight, weight)
    assert torch.equal(logits(model, inputs), bare)


def test_merge_leaves_the_heads_and_unloading_is_refused(two_tasks):
    model, first, _second = two_tasks
    inputs = tiny_inputs("bert", batch=2)
    before = logits(model, inputs)
    assert first.merge() == 2  # the two query layers; the head copy is not a weight change
    assert isinstance(model.classifier, HeadDispatcher) and len(model.classifier.heads._modules) == 2
    torch.testing.assert_close(logits(model, inputs), before)
    first.unmerge()
    torch.testing.assert_close(logits(model, inputs), before)
    with pytest.raises(DeltaStateError, match="task heads"):
        first.merge_and_unload()
    assert first.attached


def test_an_lm_head_tied_to_the_embeddings_is_untied_in_the_copy():
    model = tiny_model("gpt2", "GPT2LMHeadModel")
    inputs = tiny_inputs("gpt2", batch=2)
    embeddings = model.transformer.wte.weight
    assert model.lm_head.weight is embeddings
    saved = embeddings.detach().clone()
    bare = logits(model, inputs)
    task = LoraModel(model, modified_modules=["c_attn"], modules_to_save=["lm_head"])
    head = task._heads[0].copy
    assert head.weight is not embeddings and torch.equal(head.weight, embeddings)
    task.freeze_module(exclude=["deltas"])
    model(**inputs).logits.pow(2).mean().backward()
    assert head.weight.grad is not None and embeddings.grad is None and not embeddings.requires_grad
    with torch.no_grad():
        head.weight.sub_(head.weight.grad * 100)
    assert not torch.allclose(logits(model, inputs), bare)
    task.detach()
    assert model.lm_head.weight is embeddings and torch.equal(embeddings, saved)
    assert torch.equal(logits(model, inputs), bare)


def test_a_peft_writer_that_does_not_ship_heads_refuses_them(tmp_path):
    from opendelta_loha import LoHaModel

    delta_model = LoHaModel(tiny_model("bert", CLS), modified_modules=["query"], modules_to_save=["classifier"])
    with pytest.raises(CheckpointError, match=r"task heads \(modules_to_save=\['classifier'\]\).*save_finetuned"):
        delta_model.save_peft(tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()
