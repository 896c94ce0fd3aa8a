"""VeRA against PEFT 0.21.2, the oracle: same matrices, same vectors, same outputs, attached and merged."""

import pytest
import torch
from vera_helpers import PEFT_TARGETS, R, copy_vectors, fresh, max_error, peft_projections, peft_vectors, peft_vera, run

from opendelta_vera import VeraModel

pytest.importorskip("peft")

ARCHS = tuple(PEFT_TARGETS)
TOLERANCE = 1e-5


def ours_like_peft(arch, model, **options):
    return VeraModel(model, modified_modules=PEFT_TARGETS[arch], r=R, **options)


@pytest.mark.parametrize("kind", ARCHS)
def test_forward_equals_peft_with_the_same_vectors_and_the_shared_matrices_are_peft_s_bit_for_bit(kind):
    model = fresh(kind)
    bare = run(model, kind)
    peft_model = peft_vera(model, kind)
    delta_model = ours_like_peft(kind, model)
    vectors = peft_vectors(peft_model)
    assert {t.name for t in delta_model.targets} == set(vectors)  # PEFT's matching rules, on both sides
    owner = delta_model.deltas[0]
    for ours, theirs in zip((owner.vera_A, owner.vera_B), peft_projections(peft_model), strict=True):
        assert torch.equal(ours, theirs)  # drawn from the same key by the same algorithm, sized over all targets
    assert len({(d.in_features, d.out_features) for d in delta_model.deltas}) > 1  # layers read different slices
    copy_vectors(vectors, delta_model)
    expected, ours = run(peft_model, kind), run(model, kind)
    assert max_error(expected, bare) > 100 * TOLERANCE  # the delta matters
    assert max_error(ours, expected) <= TOLERANCE


@pytest.mark.parametrize("kind", ARCHS)
def test_merge_equals_peft_merge_and_unload_and_unmerge_gives_the_backbone_back(kind):
    model = fresh(kind)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    peft_model = peft_vera(model, kind, seed=1, projection_prng_key=7)
    delta_model = ours_like_peft(kind, model, projection_prng_key=7)
    copy_vectors(peft_vectors(peft_model), delta_model)
    attached = run(model, kind)
    expected = run(peft_model.merge_and_unload(), kind)
    assert max_error(attached, expected) <= TOLERANCE
    delta_model.merge()
    assert not any("vera" in n for n in dict(model.named_modules()))
    assert max_error(run(model, kind), expected) <= TOLERANCE
    delta_model.unmerge()
    for name, param in model.named_parameters():
        if "vera" not in name:
            torch.testing.assert_close(param, weights[name], rtol=0, atol=1e-6, msg=name)
    assert max_error(run(model, kind), attached) <= TOLERANCE
    delta_model.merge_and_unload()
    assert max_error(run(model, kind), expected) <= TOLERANCE


def test_gpt2_defaults_update_only_the_q_and_v_rows_of_the_fused_c_attn_as_peft_with_k_rows_at_zero():
    model = fresh("gpt2")
    peft_model = peft_vera(model, "gpt2", seed=2)
    delta_model = VeraModel(model, r=R)  # attn.q, attn.v: slices of c_attn
    assert {t.parts for t in delta_model.targets} == {(0, 2)}
    width = model.config.n_embd
    with torch.no_grad():
        for name, module in peft_model.named_modules():
            if name.endswith("attn.c_attn"):
                module.vera_lambda_b["default"][width : 2 * width] = 0.0  # k not updated, as ours leaves it
            elif name.endswith("mlp.c_proj") and hasattr(module, "vera_lambda_b"):
                module.vera_lambda_b["default"].zero_()  # not among our defaults
    # PEFT sized its matrices by c_attn and c_proj (in 37), ours by c_attn alone (in 32): take PEFT's slices
    owner = delta_model.deltas[0]
    vera_a, vera_b = peft_projections(peft_model)
    assert owner.vera_A.shape == (R, width) and owner.vera_B.shape == vera_b.shape
    with torch.no_grad():
        owner.vera_A.copy_(vera_a[:, :width])
        owner.vera_B.copy_(vera_b)
    copy_vectors({k: v for k, v in peft_vectors(peft_model).items() if "c_attn" in k}, delta_model)
    assert max_error(run(model, "gpt2"), run(peft_model, "gpt2")) <= TOLERANCE
    expected = run(peft_model.merge_and_unload(), "gpt2")
    delta_model.merge()
    assert max_error(run(model, "gpt2"), expected) <= TOLERANCE
