"""LoHa against PEFT 0.21.2, the oracle: same factors, same outputs (eval, a seeded training step, merged)."""

import pytest
import torch
from loha_helpers import (
    PEFT_TARGETS,
    copy_factors,
    fresh,
    ours_like_peft,
    peft_factors,
    peft_factors_with_grads,
    peft_loha,
    run,
)

from opendelta.testing import model_output_tensor, tiny_inputs
from opendelta_loha import LoHaModel

pytest.importorskip("peft")

ARCHS = tuple(PEFT_TARGETS)
TOLERANCE = 1e-5


def max_error(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("kind", ARCHS)
def test_forward_equals_peft_with_the_same_factors(kind):
    model = fresh(kind)
    bare = run(model, kind)
    peft_model = peft_loha(model, kind)
    delta_model = ours_like_peft(model, kind)
    factors = peft_factors(peft_model)
    copy_factors(factors, delta_model)
    ranks = {d.r for d in delta_model.deltas}
    assert len(ranks) == 2  # rank_pattern applied to some targets, as PEFT does
    expected, ours = run(peft_model, kind), run(model, kind)
    assert max_error(expected, bare) > 1e-3
    assert max_error(ours, expected) <= TOLERANCE


@pytest.mark.parametrize("kind", ARCHS)
def test_a_seeded_training_step_with_rank_and_module_dropout_equals_peft(kind):
    options = {"rank_dropout": 0.4, "module_dropout": 0.3}
    model = fresh(kind)
    peft_model = peft_loha(model, kind, seed=4, **options)
    delta_model = ours_like_peft(model, kind, **options)
    copy_factors(peft_factors(peft_model), delta_model)
    outputs = []
    for net in (peft_model, model):
        net.train()
        torch.manual_seed(11)
        with torch.no_grad():
            outputs.append(model_output_tensor(net(**tiny_inputs(kind))))
        net.eval()
    assert max_error(*outputs) <= TOLERANCE
    torch.manual_seed(12)
    model.train()
    with torch.no_grad():
        dropped = model_output_tensor(model(**tiny_inputs(kind)))
    assert max_error(dropped, outputs[1]) > 1e-4  # the masks are random: another seed, another output
    assert max_error(run(model.eval(), kind), run(peft_model, kind)) <= TOLERANCE  # eval: exact, no dropout


@pytest.mark.parametrize("kind", ARCHS)
def test_merge_equals_peft_merge_and_unload_and_unmerge_gives_the_backbone_back(kind):
    model = fresh(kind)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    peft_model = peft_loha(model, kind, seed=1)
    delta_model = ours_like_peft(model, kind)
    copy_factors(peft_factors(peft_model), delta_model)
    attached = run(model, kind)
    expected = run(peft_model.merge_and_unload(), kind)
    assert max_error(attached, expected) <= TOLERANCE
    delta_model.merge()
    assert not any("loha" in n for n in dict(model.named_modules()))
    assert max_error(run(model, kind), expected) <= TOLERANCE
    delta_model.unmerge()
    for name, param in model.named_parameters():
        if "loha" not in name:
            torch.testing.assert_close(param, weights[name], rtol=0, atol=1e-6, msg=name)
    assert max_error(run(model, kind), attached) <= TOLERANCE
    delta_model.merge_and_unload()
    assert max_error(run(model, kind), expected) <= TOLERANCE


def test_gpt2_defaults_update_only_the_q_and_v_rows_of_the_fused_c_attn_as_peft_with_zero_k_rows():
    model = fresh("gpt2")
    peft_model = peft_loha(model, "gpt2", seed=2)
    delta_model = LoHaModel(model, r=4, alpha=6, alpha_pattern={"c_attn": 5.0})  # attn.q, attn.v: c_attn rows
    assert {t.parts for t in delta_model.targets} == {(0, 2)}
    width = model.config.n_embd
    with torch.no_grad():
        for name, module in peft_model.named_modules():
            if name.endswith("attn.c_attn"):
                module.hada_w1_a["default"][width : 2 * width] = 0.0  # k rows: no update, as ours
            if name.endswith("mlp.c_fc") and hasattr(module, "hada_w2_b"):
                module.hada_w2_b["default"].zero_()  # ours leaves the feed-forward alone
    factors = {k: v for k, v in peft_factors(peft_model).items() if k.endswith("c_attn")}
    copy_factors(factors, delta_model)
    expected = run(peft_model, "gpt2")
    assert max_error(run(model, "gpt2"), expected) <= TOLERANCE
    delta_model.merge()
    assert max_error(run(model, "gpt2"), run(peft_model.merge_and_unload(), "gpt2")) <= TOLERANCE


@pytest.mark.parametrize("kind", ("bert", "llama"))
def test_the_factors_gradients_equal_peft_s(kind):
    model = fresh(kind)
    peft_model = peft_loha(model, kind, seed=6)
    delta_model = ours_like_peft(model, kind)
    copy_factors(peft_factors(peft_model), delta_model)
    for net in (peft_model, model):
        model_output_tensor(net(**tiny_inputs(kind))).square().sum().backward()
    theirs = {f"{n}.{f}": t.grad for n, fs in peft_factors_with_grads(peft_model).items() for f, t in fs.items()}
    ours = {f"{t.name}.{n}": p.grad for t, i in delta_model.placements() for n, p in i.delta.named_parameters()}
    assert set(ours) == set(theirs)
    assert max(max_error(ours[k], theirs[k]) for k in ours) <= TOLERANCE
    assert all(g.abs().sum() > 0 for g in ours.values())
