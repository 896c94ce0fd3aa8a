"""Multi-delta serving: several deltas on one backbone, each batch row through its own (LoRA and adapters)."""

import pytest
import torch

from opendelta import AdapterModel, DeltaStateError, LoraModel, PrefixModel, route_rows
from opendelta.testing import model_output_tensor, perturb, tiny_inputs, tiny_model


def run(model, inputs):
    with torch.no_grad():
        return model_output_tensor(model(**inputs))


def three_tasks(arch, head=None):
    model = tiny_model(arch, head)
    tasks = {
        "lora_a": LoraModel(backbone_model=model, lora_r=4),
        "lora_b": LoraModel(backbone_model=model, lora_r=2),
        "adapter": AdapterModel(backbone_model=model, bottleneck_dim=6),
    }
    for seed, task in enumerate(tasks.values()):
        perturb(task, seed=seed, scale=0.3)
    return model, tasks


def alone(model, tasks, name, inputs):
    """Run with only ``name``'s delta attached (``None``: the bare backbone)."""
    for other, task in tasks.items():
        if other != name:
            task.detach()
    try:
        return run(model, inputs)
    finally:
        for other, task in tasks.items():
            if other != name:
                task.attach()


@pytest.mark.parametrize("arch", ["bert", "gpt2", "t5", "bart", "opt"])
def test_each_row_gets_what_it_gets_with_only_its_delta_attached(arch):
    model, tasks = three_tasks(arch)
    inputs = tiny_inputs(arch, batch=4)
    plan = ["lora_a", None, "adapter", "lora_b"]
    with route_rows(model, [tasks[name] if name else None for name in plan]):
        routed = run(model, inputs)
    for row, name in enumerate(plan):
        expected = alone(model, tasks, name, inputs)[row]
        torch.testing.assert_close(routed[row], expected, rtol=1e-5, atol=1e-5)


def test_unrouted_delta_models_keep_applying_to_every_row():
    model, tasks = three_tasks("bert")
    shared = tasks.pop("adapter")  # attached, but not routed: every row goes through it
    inputs = tiny_inputs("bert", batch=2)
    with route_rows(model, [tasks["lora_a"], tasks["lora_b"]]):
        routed = run(model, inputs)
    for row, name in enumerate(["lora_a", "lora_b"]):
        expected = alone(model, tasks, name, inputs)[row]  # the shared adapter stays attached throughout
        torch.testing.assert_close(routed[row], expected, rtol=1e-5, atol=1e-5)
    shared.detach()
    assert not torch.allclose(routed[0], alone(model, tasks, "lora_a", inputs)[0], atol=1e-5)


def assert_each_row_generates_as_alone(model, tasks, plan, inputs, options, routed):
    """Each routed row's generation equals that prompt generated alone with only its task attached."""
    for row, name in enumerate(plan):
        for other, task in tasks.items():
            if other != name:
                task.detach()
        with torch.no_grad():
            expected = model.generate(**{k: v[row : row + 1] for k, v in inputs.items()}, **options)
        for other, task in tasks.items():
            if other != name:
                task.attach()
        assert torch.equal(routed[row, : expected.shape[1]], expected[0])


@pytest.mark.parametrize("arch, head", [("gpt2", "GPT2LMHeadModel"), ("t5", "T5ForConditionalGeneration")])
@pytest.mark.parametrize("num_beams", [1, 2])
def test_generate_routes_rows_through_beam_search(arch, head, num_beams):
    model, tasks = three_tasks(arch, head)
    inputs = tiny_inputs(arch, batch=4)
    inputs.pop("decoder_input_ids", None)
    if not model.config.is_encoder_decoder:  # unpadded prompts, so that a row alone is the same prompt
        inputs = {"input_ids": inputs["input_ids"][:, :5], "attention_mask": inputs["attention_mask"][:, :5] * 0 + 1}
    plan = ["lora_a", "adapter", None, "lora_b"]
    options = {"max_new_tokens": 4, "do_sample": False, "num_beams": num_beams}
    with route_rows(model, [tasks[name] if name else None for name in plan]), torch.no_grad():
        routed = model.generate(**inputs, **options)
    assert_each_row_generates_as_alone(model, tasks, plan, inputs, options, routed)


def test_switching_the_whole_model_between_deltas_copies_nothing():
    _model, tasks = three_tasks("bert")
    pointers = {name: [p.data_ptr() for p in task.parameters()] for name, task in tasks.items()}
    for task in tasks.values():
        task.detach()
    for task in tasks.values():
        task.attach()
        task.detach()
    assert {name: [p.data_ptr() for p in task.parameters()] for name, task in tasks.items()} == pointers


def test_routing_refuses_what_it_cannot_route():
    model, tasks = three_tasks("bert")
    with pytest.raises(DeltaStateError, match="multiple of the routed rows"):
        with route_rows(model, [tasks["lora_a"], None, None]):
            run(model, tiny_inputs("bert", batch=2))
    tasks["lora_b"].detach()
    with pytest.raises(DeltaStateError, match="detached"):
        with route_rows(model, [tasks["lora_b"]]):
            pass
    prefix = PrefixModel(backbone_model=model, prefix_token_num=2)
    with pytest.raises(DeltaStateError, match="prefix"):
        with route_rows(model, [prefix]):
            pass
    with pytest.raises(DeltaStateError, match="another model"):
        with route_rows(tiny_model("bert"), [tasks["lora_a"]]):
            pass


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_many_lora_tasks_of_mixed_ranks_serve_one_row_each_through_one_gathered_product(arch, monkeypatch):
    """Six LoRA tenants (ranks 1 to 8; GPT-2's fused c_attn: q and v rows only), rows interleaved, one row routed to
    none, and a seventh tenant attached that no row asks for (``unlisted="no_rows"``)."""
    import opendelta.row_groups

    calls, real = [0], opendelta.row_groups._gathered_low_rank

    def counted(*args):
        calls[0] += 1
        return real(*args)

    monkeypatch.setattr(opendelta.row_groups, "_gathered_low_rank", counted)
    model = tiny_model(arch)
    tasks = {f"t{r}": LoraModel(backbone_model=model, lora_r=r) for r in (1, 2, 3, 4, 5, 6, 8)}
    for seed, task in enumerate(tasks.values()):
        perturb(task, seed=seed, scale=0.3)
    plan = ["t3", "t1", None, "t8", "t1", "t6", "t2", "t4"]  # t5 is attached but serves no row
    inputs = tiny_inputs(arch, batch=len(plan))
    with route_rows(model, [tasks[name] if name else None for name in plan], unlisted="no_rows"):
        routed = run(model, inputs)
    assert calls[0] > 0, "six LoRA tasks on a module go through the gathered product"
    for row, name in enumerate(plan):
        torch.testing.assert_close(routed[row], alone(model, tasks, name, inputs)[row], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_beams", [1, 2])
def test_generate_with_many_lora_tenants_equals_each_prompt_alone(num_beams):
    """Four LoRA tenants on a tiny Llama (the gathered product, its stacks kept across decoding steps)."""
    model = tiny_model("llama", "LlamaForCausalLM")
    tasks = {f"t{i}": LoraModel(backbone_model=model, lora_r=1 + i) for i in range(4)}
    for seed, task in enumerate(tasks.values()):
        perturb(task, seed=seed, scale=0.3)
    inputs = tiny_inputs("llama", batch=4)
    inputs = {"input_ids": inputs["input_ids"][:, :5], "attention_mask": inputs["attention_mask"][:, :5] * 0 + 1}
    plan = ["t2", "t0", "t3", "t1"]
    options = {"max_new_tokens": 4, "do_sample": False, "num_beams": num_beams}
    with route_rows(model, [tasks[name] for name in plan]), torch.no_grad():
        routed = model.generate(**inputs, **options)
    assert_each_row_generates_as_alone(model, tasks, plan, inputs, options, routed)
