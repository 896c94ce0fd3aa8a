"""LoKr against PEFT 0.21.2, the oracle: same factors, same outputs (eval, a seeded training step, merged)."""

import pytest
import torch
from lokr_helpers import (
    PEFT_TARGETS,
    copy_factors,
    fresh,
    ours_like_peft,
    peft_factors,
    peft_factors_with_grads,
    peft_lokr,
    run,
)

from opendelta.testing import model_output_tensor, tiny_inputs

pytest.importorskip("peft")

ARCHS = tuple(PEFT_TARGETS)
TOLERANCE = 1e-5


def max_error(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("kind", ARCHS)
@pytest.mark.parametrize(
    "options",
    [{}, {"decompose_both": False, "decompose_factor": 2, "r": 2}, {"init_weights": "lycoris"}],
    ids=["decompose-both", "factor-2", "lycoris-init"],
)
def test_forward_equals_peft_with_the_same_factors(kind, options):
    model = fresh(kind)
    bare = run(model, kind)
    peft_model = peft_lokr(model, kind, **options)
    delta_model = ours_like_peft(model, kind, **options)
    copy_factors(peft_factors(peft_model), delta_model)  # the same factors exist, of the same shapes
    expected, ours = run(peft_model, kind), run(model, kind)
    assert max_error(expected, bare) > 1e-3
    assert max_error(ours, expected) <= TOLERANCE


def test_the_factorings_cover_full_and_decomposed_factors():
    layouts = set()
    for kind in ARCHS:
        delta_model = ours_like_peft(fresh(kind), kind)
        layouts |= {(d.w1_decomposed, d.w2_decomposed) for d in delta_model.deltas}
    assert layouts == {(True, True), (False, True), (False, False)}  # decomposed w1 needs a decomposed w2 here


@pytest.mark.parametrize("kind", ARCHS)
@pytest.mark.parametrize("scale", [False, True], ids=["unscaled", "scaled"])
def test_a_seeded_training_step_with_rank_and_module_dropout_equals_peft(kind, scale):
    options = {"rank_dropout": 0.4, "module_dropout": 0.3, "rank_dropout_scale": scale}
    model = fresh(kind)
    peft_model = peft_lokr(model, kind, seed=4, **options)
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
    peft_model = peft_lokr(model, kind, seed=1)
    delta_model = ours_like_peft(model, kind)
    copy_factors(peft_factors(peft_model), delta_model)
    attached = run(model, kind)
    expected = run(peft_model.merge_and_unload(), kind)
    assert max_error(attached, expected) <= TOLERANCE
    delta_model.merge()
    assert not any("lokr" in n for n in dict(model.named_modules()))
    assert max_error(run(model, kind), expected) <= TOLERANCE
    delta_model.unmerge()
    for name, param in model.named_parameters():
        if "lokr" not in name:
            torch.testing.assert_close(param, weights[name], rtol=0, atol=1e-6, msg=name)
    assert max_error(run(model, kind), attached) <= TOLERANCE
    delta_model.merge_and_unload()
    assert max_error(run(model, kind), expected) <= TOLERANCE


@pytest.mark.parametrize("kind", ("bert", "llama"))
def test_the_factors_gradients_equal_peft_s(kind):
    model = fresh(kind)
    peft_model = peft_lokr(model, kind, seed=6)
    delta_model = ours_like_peft(model, kind)
    copy_factors(peft_factors(peft_model), delta_model)
    for net in (peft_model, model):
        model_output_tensor(net(**tiny_inputs(kind))).square().sum().backward()
    theirs = {f"{n}.{f}": t.grad for n, fs in peft_factors_with_grads(peft_model).items() for f, t in fs.items()}
    ours = {f"{t.name}.{n}": p.grad for t, i in delta_model.placements() for n, p in i.delta.named_parameters()}
    assert set(ours) == set(theirs)
    assert max(max_error(ours[k], theirs[k]) for k in ours) <= TOLERANCE
    assert all(g.abs().sum() > 0 for g in ours.values())
