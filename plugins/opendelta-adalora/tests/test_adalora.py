"""AdaLoRA's own behaviour: defaults, the config's checks, the schedule (against PEFT's), the allocation's errors."""

import subprocess
import sys

import pytest
import torch
from adalora_helpers import fresh, labelled

from opendelta import AutoDeltaModel, DeltaConfigError, DeltaStateError
from opendelta_adalora import AdaLoraConfig, AdaLoraLayer, AdaLoraModel, RankAllocator


def test_the_classic_call_shape_and_the_defaults_modify_every_query_and_value():
    model = fresh("bert")
    delta_model = AdaLoraModel(backbone_model=model, modified_modules=["query"], init_r=6)
    assert [t.name.rsplit(".", 1)[1] for t in delta_model.targets] == ["query", "query"]
    assert all(layer.r == 6 and layer.lora_E.abs().sum() == 0 for layer in delta_model.adalora_layers().values())
    delta_model = AdaLoraModel(fresh("bert"))
    assert sorted({t.name.rsplit(".", 1)[1] for t in delta_model.targets}) == ["query", "value"]


@pytest.mark.parametrize(
    "fields, named",
    [
        ({"total_step": 0}, "total_step"),
        ({"total_step": 10, "tinit": 6, "tfinal": 4}, "budgeting phase"),
        ({"beta1": 1.0}, "beta1"),
        ({"beta2": 0.0}, "beta2"),
        ({"lora_alpha": 0}, "lora_alpha"),
        ({"orth_reg_weight": -1}, "orth_reg_weight"),
        ({"deltaT": 0}, "deltaT"),
        ({"init_r": 0}, "init_r"),
        ({"init_r": 2, "rank_pattern": {"x": [True]}}, "rank_pattern"),
    ],
)
def test_the_config_refuses_by_name(fields, named):
    with pytest.raises(DeltaConfigError, match=named):
        AdaLoraConfig(**fields)


def test_allocating_needs_total_step_and_a_late_step_needs_a_rank_pattern():
    delta_model = AdaLoraModel(fresh("bert"))
    with pytest.raises(DeltaConfigError, match="total_step"):
        delta_model.update_and_allocate(0)
    delta_model.config.total_step = 4
    with pytest.raises(DeltaStateError, match="rank_pattern"):
        delta_model.update_and_allocate(5)


def test_no_allocation_while_merged_and_modules_to_save_is_a_task_head():
    delta_model = AdaLoraModel(fresh("bert"), total_step=4)
    delta_model.merge()
    with pytest.raises(DeltaStateError, match="unmerge"):
        delta_model.update_and_allocate(0)
    assert set(AdaLoraModel(fresh("bert"), modules_to_save=["classifier"]).task_heads()) == {"classifier"}  # core's


def test_importing_the_plugin_leaves_the_trainer_helpers_and_their_transformers_import_for_later():
    code = (
        "import sys, opendelta_adalora; assert 'opendelta_adalora.trainer' not in sys.modules; "
        "opendelta_adalora.AdaLoraCallback; assert 'opendelta_adalora.trainer' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_budget_schedule_is_peft_s_step_by_step():
    peft_layer = pytest.importorskip("peft.tuners.adalora.layer")
    peft = pytest.importorskip("peft")
    schedule = {"init_r": 6, "target_r": 2, "tinit": 3, "tfinal": 5, "deltaT": 3, "total_step": 30}
    theirs = peft.get_peft_model(fresh("bert"), peft.AdaLoraConfig(target_modules=["query", "value"], **schedule))
    allocator = peft_layer.RankAllocator(theirs.base_model.model, theirs.peft_config["default"], "default")
    delta_model = AdaLoraModel(fresh("bert"), modified_modules=["query", "value"], **schedule)
    ours = RankAllocator(delta_model.config, delta_model.adalora_layers())
    assert (ours.init_bgt, ours.target_bgt) == (allocator.init_bgt, allocator.target_bgt) == (24, 8)
    for step in range(32):
        assert ours.budget_schedule(step) == allocator.budget_schedule(step), step


def test_the_rank_pattern_survives_the_config_json_and_builds_pruned_layers():
    pattern = {"bert.encoder.layer.0.attention.self.query": [True, False, True, False]}
    config = AdaLoraConfig(init_r=4, modified_modules=["query"], rank_pattern=pattern)
    again = AdaLoraConfig.from_dict(config.to_dict())
    assert again.rank_pattern == pattern
    delta_model = AdaLoraModel(fresh("bert"), config=again)
    ranks = {n.split(".")[3]: layer.r for n, layer in delta_model.adalora_layers().items()}
    assert ranks == {"0": 2, "1": 4}
    layer = delta_model.adalora_layers()["bert.encoder.layer.0.attention.self.query"]
    assert layer.ranknum == 4.0  # the scale keeps the initial rank
    assert layer.full_pattern([False, True]) == [False, False, True, False]
    assert layer.rows_kept([True, True, False, False]) == [True, False]


def test_a_layer_of_rank_zero_computes_zero_and_merges_nothing():
    layer = AdaLoraLayer(5, 3, init_r=2, alpha=8, pattern=[False, False])
    assert layer.r == 0
    assert torch.equal(layer(torch.randn(4, 5)), torch.zeros(4, 3))
    assert torch.equal(layer.delta_weight(), torch.zeros(3, 5))


def test_allocation_masks_after_tinit_and_a_saved_checkpoint_round_trips(tmp_path):
    model = fresh("llama")
    delta_model = AdaLoraModel(model, init_r=4, target_r=1, tinit=1, tfinal=1, total_step=5)
    delta_model.freeze_module(exclude=["deltas"])
    optimizer = torch.optim.AdamW(delta_model.parameters(), lr=1e-2)
    seen = []
    for step in range(5):
        (model(**labelled("llama", seed=step)).loss + delta_model.orthogonal_regularization()).backward()
        optimizer.step()
        delta_model.update_and_allocate(step)
        optimizer.zero_grad()
        pattern = delta_model.config.rank_pattern
        seen.append(None if pattern is None else sum(sum(flags) for flags in pattern.values()))
    layers = len(delta_model.adalora_layers())
    assert seen[:2] == [None, None]  # tinit, then the first allocation at step 2
    assert seen[-1] == layers  # target_r=1 each on average
    delta_model.save_finetuned(tmp_path)
    loaded = AutoDeltaModel.from_finetuned(tmp_path, backbone_model=fresh("llama"))
    assert sum(layer.r for layer in loaded.adalora_layers().values()) == layers
