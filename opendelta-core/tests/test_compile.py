"""torch.compile: no graph break caused by the hooks, and attach/detach states compile once each, correctly."""

import torch
from toy_method import ToyModel

from opendelta import route_rows
from opendelta.testing import model_output_tensor, perturb, tiny_inputs, tiny_model


def test_the_delta_hooks_cause_no_graph_break(toy):
    model = tiny_model("bert")
    perturb(ToyModel(model))
    explanation = torch._dynamo.explain(model)(**tiny_inputs("bert"))
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_switching_states_under_compile_is_correct_and_reuses_compiled_graphs(toy):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model, bare = tiny_model("bert"), tiny_model("bert")
    first, second = ToyModel(model), ToyModel(model)
    perturb(first, seed=1)
    perturb(second, seed=2)
    inputs = tiny_inputs("bert")
    with torch.no_grad():
        attached = model_output_tensor(model(**inputs))
        compiled = torch.compile(model, backend="eager")  # dynamo's graphs, without code generation (fast)
        outputs = [model_output_tensor(compiled(**inputs))]
        first.detach()
        second.detach()
        outputs.append(model_output_tensor(compiled(**inputs)))
        first.attach()
        second.attach()
        outputs.append(model_output_tensor(compiled(**inputs)))
        graphs = counters["stats"]["unique_graphs"]
        first.detach()
        second.detach()
        outputs.append(model_output_tensor(compiled(**inputs)))
        first.attach()
        second.attach()
        with route_rows(model, [first, second]):
            routed = model_output_tensor(compiled(**inputs))
            eager_routed = model_output_tensor(model(**inputs))
    assert torch.allclose(outputs[0], attached) and torch.allclose(outputs[2], attached)
    bare_out = model_output_tensor(bare(**inputs))
    assert torch.allclose(outputs[1], bare_out) and torch.allclose(outputs[3], bare_out)
    assert graphs == 2, "one graph per state, reused when the state comes back"
    assert torch.allclose(routed, eager_routed) and not torch.allclose(routed, attached)


def test_the_gathered_low_rank_product_compiles_and_matches_eager(toy):
    from toy_method import ToyLowRankModel

    torch._dynamo.reset()
    model = tiny_model("bert")
    tasks = [ToyLowRankModel(model, rank=r) for r in (1, 2, 3)]
    for seed, task in enumerate(tasks):
        perturb(task, seed=seed, scale=0.3)
    inputs = tiny_inputs("bert", batch=4)
    plan = [tasks[2], None, tasks[0], tasks[1]]
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad(), route_rows(model, plan):
        eager = model_output_tensor(model(**inputs))
        routed = model_output_tensor(compiled(**inputs))
        again = model_output_tensor(compiled(**inputs))
    torch.testing.assert_close(routed, eager)
    torch.testing.assert_close(again, eager)
