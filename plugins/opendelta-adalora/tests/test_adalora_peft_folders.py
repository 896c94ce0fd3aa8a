"""PEFT AdaLoRA folders load through ``from_finetuned`` with PEFT's outputs (before and after allocation, pruned),
``save_peft`` writes folders PEFT loads with our outputs, and what cannot be loaded faithfully is refused by name."""

import json

import pytest
import torch
from adalora_helpers import (
    ARCHS,
    SCHEDULE,
    copy_from_peft,
    fresh,
    labelled,
    max_error,
    ours_like_peft,
    peft_adalora,
    run,
)

from opendelta import AutoDeltaModel, CheckpointError
from opendelta.testing import Pristine
from opendelta_adalora import AdaLoraModel

peft = pytest.importorskip("peft")

TOLERANCE = 1e-5
FINAL = SCHEDULE["total_step"] - SCHEDULE["tfinal"]
PEFTS_OWN_WARNING = "ignore:The following rank_pattern keys did not match:RuntimeWarning"
"""PEFT warns so on loading any AdaLoRA folder with a rank_pattern, its own too (LoRA's key matching reads it)."""


def _allocate_peft(peft_model, kind, steps):
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(steps):
        peft_model.base_model(**labelled(kind, seed=step)).loss.backward()
        optimizer.step()
        peft_model.base_model.update_and_allocate(step)
        optimizer.zero_grad()
    return peft_model.eval()


def _allocate_ours(delta_model, model, kind, steps):
    optimizer = torch.optim.AdamW(delta_model.parameters(), lr=1e-2)
    for step in range(steps):
        (model(**labelled(kind, seed=step)).loss + delta_model.orthogonal_regularization()).backward()
        optimizer.step()
        delta_model.update_and_allocate(step)
        optimizer.zero_grad()
    return delta_model


@pytest.mark.parametrize("kind", ARCHS)
@pytest.mark.parametrize("steps", [0, 4, FINAL + 1], ids=["fresh", "budgeting", "allocated"])
def test_a_peft_adalora_folder_loads_with_peft_outputs(kind, steps, tmp_path):
    peft_model = _allocate_peft(peft_adalora(fresh(kind), kind, seed=4), kind, steps)
    expected = run(peft_model, kind)
    peft_model.save_pretrained(tmp_path)
    pattern = json.loads((tmp_path / "adapter_config.json").read_text())["rank_pattern"]
    assert (pattern is None) == (steps == 0)
    model = fresh(kind)
    delta_model = AutoDeltaModel.from_finetuned(tmp_path, backbone_model=model)
    assert type(delta_model) is AdaLoraModel
    assert max_error(run(model, kind), expected) <= TOLERANCE
    if pattern:  # built at the pruned ranks, as PEFT resizes them
        ranks = {n: layer.r for n, layer in delta_model.adalora_layers().items()}
        assert ranks == {k.removesuffix(".lora_E"): sum(v) for k, v in pattern.items()}
        assert sum(ranks.values()) < SCHEDULE["init_r"] * len(ranks)


@pytest.mark.parametrize("kind", ARCHS)
@pytest.mark.filterwarnings(PEFTS_OWN_WARNING)
def test_save_finetuned_after_allocation_keeps_the_pruned_ranks_and_reloads_the_same_outputs(kind, tmp_path):
    model = fresh(kind)
    peft_model = peft_adalora(model, kind, seed=5)
    delta_model = ours_like_peft(kind, model)
    copy_from_peft(peft_model, delta_model)
    _allocate_ours(delta_model, model, kind, FINAL + 1)
    model.eval()
    expected = run(model, kind)
    pattern = delta_model.config.rank_pattern
    assert pattern and all(len(flags) == SCHEDULE["init_r"] for flags in pattern.values())
    delta_model.save_finetuned(tmp_path)
    again = fresh(kind)
    loaded = AutoDeltaModel.from_finetuned(tmp_path, backbone_model=again)
    assert loaded.config.rank_pattern == pattern
    assert {n: layer.r for n, layer in loaded.adalora_layers().items()} == {n: sum(f) for n, f in pattern.items()}
    assert max_error(run(again, kind), expected) <= TOLERANCE
    # and it exports to PEFT from the pruned model as from the masked one
    loaded.save_peft(tmp_path / "peft")
    theirs = peft.PeftModel.from_pretrained(fresh(kind), tmp_path / "peft").eval()
    assert max_error(run(theirs, kind), expected) <= TOLERANCE


@pytest.mark.parametrize("kind", ARCHS)
@pytest.mark.filterwarnings(PEFTS_OWN_WARNING)
@pytest.mark.parametrize("allocated", [False, True], ids=["fresh", "allocated"])
def test_save_peft_reads_back_in_peft_with_our_outputs(kind, allocated, tmp_path):
    model = fresh(kind)
    peft_model = peft_adalora(model, kind, seed=6)
    delta_model = ours_like_peft(kind, model)
    copy_from_peft(peft_model, delta_model)
    if allocated:
        _allocate_ours(delta_model, model, kind, FINAL + 1)
        model.eval()
    expected = run(model, kind)
    delta_model.save_peft(tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (written["rank_pattern"] is not None) == allocated
    theirs = peft.PeftModel.from_pretrained(fresh(kind), tmp_path).eval()
    assert max_error(run(theirs, kind), expected) <= TOLERANCE
    back = AutoDeltaModel.from_finetuned(tmp_path, backbone_model=fresh(kind))
    assert back.config.rank_pattern == delta_model.config.rank_pattern


def test_gpt2_defaults_on_the_q_and_v_slices_export_as_the_whole_c_attn_with_zero_k_rows(tmp_path):
    model = fresh("gpt2")
    delta_model = AdaLoraModel(model, total_step=8, init_r=4)  # attn.q, attn.v: slices of c_attn
    assert {t.parts for t in delta_model.targets} == {(0, 2)}
    with torch.no_grad():
        for param in delta_model.parameters():
            param.copy_(0.3 * torch.randn_like(param))
    expected = run(model, "gpt2")
    delta_model.save_peft(tmp_path)
    theirs = peft.PeftModel.from_pretrained(fresh("gpt2"), tmp_path).eval()
    assert max_error(run(theirs, "gpt2"), expected) <= TOLERANCE


def test_save_peft_needs_a_total_step(tmp_path):
    delta_model = AdaLoraModel(fresh("bert"))
    with pytest.raises(Exception, match="total_step"):
        delta_model.save_peft(tmp_path)
    delta_model.save_peft(tmp_path, total_step=100)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["total_step"] == 100


def _edit(folder, **fields):
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, **fields}))


@pytest.mark.parametrize(
    "fields, named",
    [
        ({"modules_to_save": ["classifier"]}, "modules_to_save"),
        ({"layers_to_transform": [0]}, "layers_to_transform"),
        ({"bias": "all"}, "bias"),
        ({"lora_alpha": 0}, "lora_alpha"),
        ({"some_future_option": 3}, "some_future_option"),
        ({"target_modules": "all-linear"}, "all-linear"),
        ({"target_modules": ["nothing_here"]}, "matches no module"),
        ({"rank_pattern": {"bert.encoder.layer.0.attention.self.query.lora_E": [True]}}, "rank_pattern"),
    ],
)
def test_folders_it_cannot_load_faithfully_are_refused_by_name_and_change_nothing(fields, named, tmp_path):
    peft_adalora(fresh("bert"), "bert").save_pretrained(tmp_path)
    _edit(tmp_path, **fields)
    model = fresh("bert")
    before = Pristine.of(model)
    with pytest.raises(CheckpointError, match=named):
        AutoDeltaModel.from_finetuned(tmp_path, backbone_model=model)
    before.assert_unchanged(model)
