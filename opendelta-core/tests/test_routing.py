"""Per-row routing in core, with the test-only toy method: rows go through their own delta only."""

import pytest
import torch
from toy_method import ToyModel

from opendelta import DeltaStateError, route_rows
from opendelta.routing import current_routing
from opendelta.testing import model_output_tensor, perturb, tiny_inputs, tiny_model


def run(model, inputs):
    with torch.no_grad():
        return model_output_tensor(model(**inputs))


def test_rows_get_their_own_delta_and_the_batch_may_repeat_rows(toy):
    model = tiny_model("bert")
    first, second = ToyModel(model), ToyModel(model)
    perturb(first, seed=1)
    perturb(second, seed=2)
    inputs = tiny_inputs("bert", batch=2)
    with route_rows(model, [first, second]) as routing:
        routed = run(model, inputs)
        doubled = run(model, {k: v.repeat_interleave(2, 0) for k, v in inputs.items()})
    second.detach()
    torch.testing.assert_close(routed[0], run(model, inputs)[0])
    second.attach()
    first.detach()
    torch.testing.assert_close(routed[1], run(model, inputs)[1])
    torch.testing.assert_close(doubled[::2], routed)
    assert routing.owners == [0, 1]


def test_a_batch_that_is_no_multiple_of_the_rows_is_refused(toy):
    model = tiny_model("bert")
    delta = ToyModel(model)
    with pytest.raises(DeltaStateError, match="multiple"), route_rows(model, [delta, None, None]):
        run(model, tiny_inputs("bert", batch=2))
    with pytest.raises(DeltaStateError, match="one entry per batch row"), route_rows(model, []):
        pass


def test_a_second_routing_in_the_same_thread_is_refused_and_the_first_is_cleaned_up(toy):
    model = tiny_model("bert")
    delta = ToyModel(model)
    with route_rows(model, [delta]):
        with pytest.raises(DeltaStateError, match="already active"), route_rows(model, [None]):
            pass
        assert current_routing() is not None
    assert current_routing() is None
    with route_rows(model, [delta]):  # usable again
        pass


def count_calls(monkeypatch, module, name):
    """Count the calls of ``module.name`` (still calling it); the count is ``[n]``."""
    calls, real = [0], getattr(module, name)

    def counted(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def low_rank_tasks(count, ranks=(2,)):
    """``count`` low-rank toy tasks (ranks cycling through ``ranks``) on one tiny BERT, each with nonzero factors."""
    from toy_method import ToyLowRankModel

    model = tiny_model("bert")
    tasks = [ToyLowRankModel(model, rank=ranks[i % len(ranks)]) for i in range(count)]
    for seed, task in enumerate(tasks):
        perturb(task, seed=seed, scale=0.3)
    return model, tasks


def alone(model, tasks, task, inputs):
    """The outputs with only ``task`` attached (``None``: the bare backbone)."""
    for other in tasks:
        if other is not task:
            other.detach()
    try:
        return run(model, inputs)
    finally:
        for other in tasks:
            if other is not task:
                other.attach()


@pytest.mark.parametrize("batched_from", [2, 99], ids=["gathered", "blockwise"])
@pytest.mark.parametrize("order", ["grouped", "interleaved"])
def test_many_low_rank_tasks_each_row_equals_its_task_alone(toy, monkeypatch, batched_from, order):
    import opendelta.row_groups

    monkeypatch.setattr(opendelta.row_groups, "BATCHED_FROM", batched_from)
    gathered = count_calls(monkeypatch, opendelta.row_groups, "_gathered_low_rank")
    model, tasks = low_rank_tasks(5, ranks=(2, 4, 1))
    picks = [0, 0, 1, 2, 3, 4, None, 4] if order == "grouped" else [4, None, 0, 2, 0, 1, 3, 2]
    plan = [None if i is None else tasks[i] for i in picks]
    inputs = tiny_inputs("bert", batch=len(plan))
    with route_rows(model, plan):
        routed = run(model, inputs)
    for row, task in enumerate(plan):
        torch.testing.assert_close(routed[row], alone(model, tasks, task, inputs)[row], rtol=1e-5, atol=1e-5)
    assert (gathered[0] > 0) == (batched_from == 2)  # the path named is the one taken


@pytest.mark.parametrize("batched_from", [2, 99], ids=["gathered", "blockwise"])
def test_routed_training_gives_the_gradients_of_separate_passes(toy, monkeypatch, batched_from):
    import opendelta.row_groups

    monkeypatch.setattr(opendelta.row_groups, "BATCHED_FROM", batched_from)
    model, tasks = low_rank_tasks(3, ranks=(2, 3))
    plan = [tasks[2], tasks[0], tasks[1], tasks[0]]
    inputs = tiny_inputs("bert", batch=len(plan))
    with route_rows(model, plan):
        model_output_tensor(model(**inputs)).pow(2).sum().backward()
    routed = [[p.grad.clone() for p in task.parameters() if p.requires_grad] for task in tasks]
    model.zero_grad(set_to_none=True)
    for task in tasks:
        rows = [i for i, t in enumerate(plan) if t is task]
        others = [t for t in tasks if t is not task]
        for other in others:
            other.detach()
        model_output_tensor(model(**{k: v[rows] for k, v in inputs.items()})).pow(2).sum().backward()
        for other in others:
            other.attach()
    for task, grads in zip(tasks, routed, strict=True):
        separate = [p.grad for p in task.parameters() if p.requires_grad]
        assert separate and all(g is not None for g in separate)
        for got, want in zip(grads, separate, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_stacked_factors_follow_an_in_place_change_within_one_context(toy, monkeypatch):
    import opendelta.row_groups

    monkeypatch.setattr(opendelta.row_groups, "BATCHED_FROM", 2)
    model, tasks = low_rank_tasks(3)
    inputs = tiny_inputs("bert", batch=3)
    with route_rows(model, tasks):
        before = run(model, inputs)
        with torch.no_grad():
            next(p for n, p in tasks[1].named_parameters() if n.endswith(".b")).mul_(3)
        after = run(model, inputs)
    assert torch.equal(before[0], after[0]) and torch.equal(before[2], after[2])
    assert not torch.allclose(before[1], after[1])
    torch.testing.assert_close(after[1], alone(model, tasks, tasks[1], inputs)[1], rtol=1e-5, atol=1e-5)


def test_a_plan_is_the_threads_own_a_plain_forward_elsewhere_is_not_routed(toy):
    import threading

    model, tasks = low_rank_tasks(2)
    inputs = tiny_inputs("bert", batch=2)
    everything = run(model, inputs)  # both tasks on every row
    inside, done, seen = threading.Event(), threading.Event(), {}

    def routed():
        with route_rows(model, [tasks[0], tasks[1]]):
            inside.set()
            done.wait(timeout=30)
            seen["routed"] = run(model, inputs)

    thread = threading.Thread(target=routed)
    thread.start()
    assert inside.wait(timeout=30)
    seen["plain"] = run(model, inputs)  # while the other thread is inside its route_rows
    with route_rows(model, [tasks[1], tasks[0]]):  # a plan of this thread's own, at the same time
        seen["mine"] = run(model, inputs)
    done.set()
    thread.join(timeout=30)
    assert torch.equal(seen["plain"], everything)
    torch.testing.assert_close(seen["routed"][0], alone(model, tasks, tasks[0], inputs)[0])
    torch.testing.assert_close(seen["routed"][1], alone(model, tasks, tasks[1], inputs)[1])
    torch.testing.assert_close(seen["mine"][0], alone(model, tasks, tasks[1], inputs)[0])
    torch.testing.assert_close(seen["mine"][1], alone(model, tasks, tasks[0], inputs)[1])


def test_threads_serving_their_own_plans_at_once_each_get_their_rows(toy):
    from concurrent.futures import ThreadPoolExecutor

    model, tasks = low_rank_tasks(3)
    inputs = tiny_inputs("bert", batch=4)
    a, b, c = tasks  # every plan routes all three, so a row's expectation is its task alone
    plans = [[a, b, c, None], [c, None, a, b], [None, b, c, a]]
    expected = [
        torch.stack([alone(model, tasks, task, inputs)[row] for row, task in enumerate(plan)]) for plan in plans
    ]

    def serve(which):
        with route_rows(model, plans[which]):
            return which, run(model, inputs)

    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(serve, [i % 3 for i in range(24)]))
    for which, got in results:
        torch.testing.assert_close(got, expected[which], rtol=1e-5, atol=1e-5)


def test_unlisted_delta_models_apply_to_every_row_or_with_no_rows_to_none(toy):
    model, tasks = low_rank_tasks(3)
    inputs = tiny_inputs("bert", batch=2)
    everything = run(model, inputs)
    with route_rows(model, [tasks[0], None]):  # tasks 1 and 2 are shared: every row
        shared = run(model, inputs)
    with route_rows(model, [tasks[0], None], unlisted="no_rows"):  # tenants: only the rows' own
        own = run(model, inputs)
    tasks[0].detach()
    without_first = run(model, inputs)
    tasks[0].attach()
    torch.testing.assert_close(shared[0], everything[0])
    torch.testing.assert_close(shared[1], without_first[1])
    torch.testing.assert_close(own[0], alone(model, tasks, tasks[0], inputs)[0])
    torch.testing.assert_close(own[1], alone(model, tasks, None, inputs)[1])
    with pytest.raises(ValueError, match="no_rows"), route_rows(model, [tasks[0]], unlisted="none"):
        pass
