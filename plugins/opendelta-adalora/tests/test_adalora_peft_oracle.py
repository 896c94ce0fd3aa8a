"""AdaLoRA against PEFT 0.21.2, the oracle: same tensors, same outputs, merged, and the same training run."""

import pytest
import torch
from adalora_helpers import (
    ARCHS,
    copy_from_peft,
    fresh,
    labelled,
    max_error,
    ours_like_peft,
    peft_adalora,
    peft_layers,
    run,
)

from opendelta_adalora import AdaLoraModel

pytest.importorskip("peft")

TOLERANCE = 1e-5


@pytest.mark.parametrize("kind", ARCHS)
def test_forward_equals_peft_with_the_same_tensors(kind):
    model = fresh(kind)
    bare = run(model, kind)
    peft_model = peft_adalora(model, kind)
    delta_model = ours_like_peft(kind, model)
    assert set(delta_model.adalora_layers()) == set(peft_layers(peft_model))  # PEFT's matching, on both sides
    copy_from_peft(peft_model, delta_model)
    expected, ours = run(peft_model, kind), run(model, kind)
    assert max_error(expected, bare) > 1e-3
    assert max_error(ours, expected) <= TOLERANCE


@pytest.mark.parametrize("kind", ARCHS)
def test_orthogonal_regularization_is_the_term_peft_adds_to_the_loss(kind):
    model = fresh(kind)
    peft_model = peft_adalora(model, kind, seed=1)
    delta_model = ours_like_peft(kind, model)
    copy_from_peft(peft_model, delta_model)
    inputs = labelled(kind)
    with torch.no_grad():
        peft_loss = peft_model.base_model(**inputs).loss  # AdaLoraModel.forward adds orth_reg_weight * regulariser
        plain = model(**inputs).loss
    ours = plain + delta_model.orthogonal_regularization()
    assert abs(ours.item() - peft_loss.item()) <= TOLERANCE
    assert delta_model.orthogonal_regularization().item() > 0.01


@pytest.mark.parametrize("kind", ARCHS)
def test_merge_equals_peft_merge_and_unload_and_unmerge_gives_the_backbone_back(kind):
    model = fresh(kind)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    peft_model = peft_adalora(model, kind, seed=2)
    delta_model = ours_like_peft(kind, model)
    copy_from_peft(peft_model, delta_model)
    attached = run(model, kind)
    expected = run(peft_model.merge_and_unload(), kind)
    assert max_error(attached, expected) <= TOLERANCE
    delta_model.merge()
    assert max_error(run(model, kind), expected) <= TOLERANCE
    delta_model.unmerge()
    for name, param in model.named_parameters():
        if "adalora" not in name:
            torch.testing.assert_close(param, weights[name], rtol=0, atol=1e-6, msg=name)
    delta_model.merge_and_unload()
    assert max_error(run(model, kind), expected) <= TOLERANCE


def _train_both(kind, steps, **schedule):
    """The same seeded steps through PEFT and ours: loss (with the regulariser), backward, step, allocate."""
    model = fresh(kind)
    peft_model = peft_adalora(model, kind, seed=3, **schedule)
    delta_model = ours_like_peft(kind, model, **schedule)
    copy_from_peft(peft_model, delta_model)
    theirs_params = [p for n, p in peft_model.named_parameters() if p.requires_grad]
    ours_params = list(delta_model.parameters())
    theirs_opt = torch.optim.AdamW(theirs_params, lr=1e-2)
    ours_opt = torch.optim.AdamW(ours_params, lr=1e-2)
    history = []
    for step in range(steps):
        inputs = labelled(kind, seed=step)
        peft_model.base_model(**inputs).loss.backward()
        theirs_opt.step()
        peft_model.base_model.update_and_allocate(step)
        theirs_opt.zero_grad()
        (model(**inputs).loss + delta_model.orthogonal_regularization()).backward()
        ours_opt.step()
        delta_model.update_and_allocate(step)
        ours_opt.zero_grad()
        history.append((peft_model.peft_config["default"].rank_pattern, delta_model.config.rank_pattern))
    return peft_model, delta_model, model, history


def _peft_pattern(pattern):
    return None if pattern is None else {k.removesuffix(".lora_E.default"): v for k, v in pattern.items()}


@pytest.mark.parametrize("kind", ARCHS)
def test_training_with_update_and_allocate_matches_peft_masks_rank_pattern_and_parameters(kind):
    peft_model, delta_model, model, history = _train_both(kind, steps=8)
    for step, (theirs, ours) in enumerate(history):
        assert _peft_pattern(theirs) == ours, f"step {step}"
    final = delta_model.config.rank_pattern
    kept = sum(sum(flags) for flags in final.values())
    assert kept == 2 * len(final)  # the target budget, target_r per layer on average
    theirs = peft_layers(peft_model)
    worst = 0.0
    for name, layer in delta_model.adalora_layers().items():
        for part in ("lora_A", "lora_E", "lora_B"):
            worst = max(worst, max_error(getattr(layer, part), getattr(theirs[name], part)["default"]))
        zeros = (layer.lora_E.view(-1) == 0).tolist()
        assert zeros == [not keep for keep in final[name]]  # pruned triplets have E = 0, kept ones not
    assert worst <= TOLERANCE
    assert max_error(run(model, kind), run(peft_model, kind)) <= TOLERANCE


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_a_schedule_masking_every_third_step_from_the_start_matches_peft_too(kind):
    schedule = {"tinit": 0, "tfinal": 3, "deltaT": 3, "total_step": 12, "init_r": 5, "target_r": 1}
    peft_model, delta_model, _, history = _train_both(kind, steps=12, **schedule)
    assert [_peft_pattern(theirs) for theirs, _ in history] == [ours for _, ours in history]
    assert [ours is None for _, ours in history][:3] == [True, True, True]  # first masking at step 3
    theirs = peft_layers(peft_model)
    for name, layer in delta_model.adalora_layers().items():
        for part in ("lora_A", "lora_E", "lora_B"):
            assert max_error(getattr(layer, part), getattr(theirs[name], part)["default"]) <= TOLERANCE
    assert sum(sum(flags) for flags in delta_model.config.rank_pattern.values()) == len(theirs)


def test_without_update_and_allocate_it_is_plain_svd_lora_and_trains():
    model = fresh("bert")
    delta_model = AdaLoraModel(model)  # no total_step: no allocation, every rank kept
    before = run(model, "bert")
    optimizer = torch.optim.AdamW(delta_model.parameters(), lr=1e-2)
    for step in range(3):
        (model(**labelled("bert", seed=step)).loss + delta_model.orthogonal_regularization()).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert max_error(run(model, "bert"), before) > 1e-6
    assert delta_model.config.rank_pattern is None
    assert all(layer.r == 12 for layer in delta_model.adalora_layers().values())
