"""Per-task heads (``modules_to_save``) with the toy method: copies, dispatching, routing, freezing, errors."""

import copy
import inspect
import pickle

import pytest
import torch
from toy_method import ToyConfig, ToyModel

from opendelta import DeltaConfigError, ModuleNotFoundInStructureError, route_rows
from opendelta.task_heads import HeadDispatcher
from opendelta.testing import perturb, tiny_inputs, tiny_model

CLS = "BertForSequenceClassification"


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def two_tasks(model):
    """Two toy delta models with their own heads on ``classifier``, perturbed differently; both attached."""
    first = ToyModel(model, modules_to_save=["classifier"])
    perturb(first, seed=1, scale=0.5)
    second = ToyModel(model, modules_to_save=["classifier"])
    perturb(second, seed=2, scale=0.5)
    return first, second


def alone(task, others, model, inputs):
    for other in others:
        other.detach()
    try:
        task.attach()
        return logits(model, inputs)
    finally:
        for other in others:
            other.attach()


def test_the_copy_computes_instead_of_the_original():
    model = tiny_model("bert", CLS)
    inputs = tiny_inputs("bert", batch=3)
    original = model.classifier
    task = ToyModel(model, modules_to_save=["classifier"])
    calls = []
    original.register_forward_hook(lambda *_: calls.append(1))
    pooled = []
    model.bert.pooler.register_forward_hook(lambda _m, _a, out: pooled.append(out))
    perturb(task, seed=1, scale=0.5)
    head = next(h.copy for h in task._heads)
    out = logits(model, inputs)
    assert calls == []  # the original head never runs while the copy stands in for it
    assert isinstance(model.classifier, HeadDispatcher) and model.classifier.original is original
    assert head is not original and any(head is d for d in task.deltas)
    with torch.no_grad():
        assert torch.equal(out, head(pooled[-1]))
        assert not torch.equal(out, original(pooled[-1]))


def test_detaching_every_task_gives_back_the_bare_model_bit_for_bit():
    model = tiny_model("bert", CLS)
    inputs = tiny_inputs("bert", batch=3)
    bare = logits(model, inputs)
    original = model.classifier
    before = {k: v.clone() for k, v in model.state_dict().items()}
    first, second = two_tasks(model)
    first.freeze_module(exclude=["deltas"])
    loss = model(**inputs).logits.sum()
    loss.backward()
    with torch.no_grad():
        for p in first.parameters():
            p.add_(p.grad if p.grad is not None else 0)
    second.detach()
    first.detach()
    assert model.classifier is original
    assert torch.equal(logits(model, inputs), bare)
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], v) for k, v in before.items())


def each_alone(batch):
    """A backbone with two tasks attached, its inputs, and each task's logits with it alone attached."""
    model = tiny_model("bert", CLS)
    inputs = tiny_inputs("bert", batch=batch)
    first, second = two_tasks(model)
    return model, inputs, first, second, alone(first, [second], model, inputs), alone(second, [first], model, inputs)


def test_the_most_recently_attached_head_applies_and_detaching_falls_back():
    model, inputs, first, second, only_first, only_second = each_alone(3)
    assert not torch.allclose(only_first, only_second)
    first.detach()
    first.attach()  # first is now the most recent: its head applies (with both models' other deltas)
    both_first_head = logits(model, inputs)
    second.detach()
    assert torch.equal(logits(model, inputs), only_first)
    second.attach()
    assert not torch.equal(logits(model, inputs), both_first_head)  # second's head again
    first.detach()
    assert torch.equal(logits(model, inputs), only_second)


def test_routed_rows_use_their_own_head():
    model, inputs, first, second, only_first, only_second = each_alone(4)
    first.detach()
    second.detach()
    bare = logits(model, inputs)
    first.attach()
    second.attach()
    with route_rows(model, [first, second, None, first]):
        routed = logits(model, inputs)
    torch.testing.assert_close(routed[[0, 3]], only_first[[0, 3]])
    torch.testing.assert_close(routed[1], only_second[1])
    torch.testing.assert_close(routed[2], bare[2])


def test_rows_of_a_model_without_a_head_get_the_unrouted_head():
    model = tiny_model("bert", CLS)
    inputs = tiny_inputs("bert", batch=2)
    headless = ToyModel(model)
    perturb(headless, seed=3, scale=0.5)
    with_head = ToyModel(model, modules_to_save=["classifier"])
    perturb(with_head, seed=4, scale=0.5)
    only_with_head = alone(with_head, [headless], model, inputs)
    with route_rows(model, [headless, None]):  # with_head is not routed: it applies to every row, head included
        routed = logits(model, inputs)
    headless.detach()
    torch.testing.assert_close(routed[1], only_with_head[1])
    with_head.detach()
    headless.attach()
    alone_headless = logits(model, inputs)
    with_head.attach()
    assert not torch.allclose(routed[0], alone_headless[0])  # with_head's deltas and head apply to row 0 too


def test_training_reaches_the_copy_not_the_original():
    model = tiny_model("bert", CLS)
    inputs = tiny_inputs("bert", batch=2)
    original = model.classifier
    task = ToyModel(model, modules_to_save=["classifier"])
    task.freeze_module(exclude=["deltas"])
    model(**inputs).logits.sum().backward()
    head = task._heads[0].copy
    assert head.weight.requires_grad and head.weight.grad is not None and head.weight.grad.abs().sum() > 0
    assert not original.weight.requires_grad and original.weight.grad is None
    names = set(task.delta_state_dict())
    assert {"classifier.task_head.weight", "classifier.task_head.bias"} <= names


def test_freezing_a_detached_head_matches_freezing_it_attached():
    model = tiny_model("bert", CLS)
    task = ToyModel(model, modules_to_save=["classifier"])
    head = task._heads[0].copy
    head.requires_grad_(False)
    task.detach()
    task.freeze_module(exclude=["deltas"])
    assert head.weight.requires_grad


def test_deepcopy_and_pickle_of_the_backbone_keep_each_head():
    model = tiny_model("bert", CLS)
    inputs = tiny_inputs("bert", batch=3)
    first, second = two_tasks(model)
    expected = logits(model, inputs)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert torch.equal(logits(clone, inputs), expected)
        assert clone.classifier.original is not model.classifier.original
    copied = copy.deepcopy(second)  # copies its backbone along, with first's head in it
    copied.detach()
    only_first = alone(first, [second], model, inputs)
    torch.testing.assert_close(logits(copied.backbone_model, inputs), only_first)


def test_a_head_on_a_module_of_a_detached_dispatcher_joins_it():
    model = tiny_model("bert", CLS)
    inputs = tiny_inputs("bert", batch=2)
    first = ToyModel(model, modules_to_save=["classifier"])
    perturb(first, seed=1, scale=0.5)
    dispatcher = model.classifier
    first.detach()
    second = ToyModel(model, modules_to_save=["classifier"])
    assert model.classifier is dispatcher
    second.detach()
    first.attach()
    assert model.classifier is dispatcher
    assert list(dispatcher.heads._modules.values()) == [first._heads[0].copy]
    assert logits(model, inputs).shape == (2, 3)


def test_modules_to_save_is_keyword_only_and_defaults_to_none():
    assert ToyConfig().modules_to_save is None
    assert ToyConfig.from_dict({"width": 0}).modules_to_save is None  # a checkpoint written before the field
    assert inspect.signature(ToyModel).parameters["modules_to_save"].kind is inspect.Parameter.KEYWORD_ONLY
    assert "modules_to_save" not in ToyModel.positional_names()


def unchanged(model, call):
    before = {n: type(m) for n, m in model.named_modules()}
    call()
    assert {n: type(m) for n, m in model.named_modules()} == before


def test_a_name_that_matches_nothing_is_refused_with_the_closest_names():
    model = tiny_model("bert", CLS)

    def build():
        with pytest.raises(ModuleNotFoundInStructureError, match=r"'clasifier' matches no module.*'classifier'"):
            ToyModel(model, modules_to_save=["clasifier"])

    unchanged(model, build)


def test_a_head_on_a_module_the_same_model_modifies_is_refused():
    model = tiny_model("bert", CLS)

    def build():
        with pytest.raises(DeltaConfigError, match=r"modules_to_save names 'bert.pooler'.*own deltas modify"):
            ToyModel(model, modified_modules=["pooler.dense"], modules_to_save=["pooler"])

    unchanged(model, build)


def test_nested_heads_are_refused():
    model = tiny_model("bert", CLS)

    def build():
        with pytest.raises(DeltaConfigError, match="one inside the other"):
            ToyModel(model, modules_to_save=["pooler", "pooler.dense"])

    unchanged(model, build)


def test_a_head_on_a_module_carrying_another_models_deltas_is_refused():
    model = tiny_model("bert", CLS)
    ToyModel(model, modified_modules=["pooler.dense"])

    def build():
        with pytest.raises(DeltaConfigError, match="carries another delta model's deltas"):
            ToyModel(model, modules_to_save=["pooler"])

    unchanged(model, build)


def test_a_wrong_type_is_refused_by_the_config():
    with pytest.raises(DeltaConfigError, match="modules_to_save"):
        ToyConfig(modules_to_save="classifier")
