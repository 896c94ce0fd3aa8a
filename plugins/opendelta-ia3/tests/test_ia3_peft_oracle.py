"""IA3 against PEFT 0.21.2, the oracle: same vectors, same outputs, attached and merged, on four architectures."""

import pytest
import torch
from ia3_helpers import PEFT_TARGETS, copy_vectors, fresh, peft_ia3, peft_vectors, run

from opendelta_ia3 import IA3Model

pytest.importorskip("peft")

ARCHS = tuple(PEFT_TARGETS)
TOLERANCE = 1e-5


def ours_like_peft(arch, model):
    targets, feedforward = PEFT_TARGETS[arch]
    return IA3Model(model, modified_modules=targets, feedforward_modules=feedforward)


def max_error(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("kind", ARCHS)
def test_forward_equals_peft_with_the_same_vectors(kind):
    model = fresh(kind)
    bare = run(model, kind)
    peft_model = peft_ia3(model, kind)
    delta_model = ours_like_peft(kind, model)
    vectors = peft_vectors(peft_model)
    assert {t.name for t in delta_model.targets} == set(vectors)  # PEFT's matching rules, on both sides
    ff = {t.name for t, i in delta_model.placements() if i.kind == "before"}
    assert ff and all(n.endswith(PEFT_TARGETS[kind][1][0]) for n in ff)
    copy_vectors(vectors, delta_model)
    expected, ours = run(peft_model, kind), run(model, kind)
    assert not torch.allclose(expected, bare)
    assert max_error(ours, expected) <= TOLERANCE


@pytest.mark.parametrize("kind", ARCHS)
def test_merge_equals_peft_merge_and_unload_and_unmerge_gives_the_backbone_back(kind):
    model = fresh(kind)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    peft_model = peft_ia3(model, kind, seed=1)
    delta_model = ours_like_peft(kind, model)
    copy_vectors(peft_vectors(peft_model), delta_model)
    attached = run(model, kind)
    expected = run(peft_model.merge_and_unload(), kind)
    assert max_error(attached, expected) <= TOLERANCE
    delta_model.merge()
    assert not any("ia3" in n for n in dict(model.named_modules()))
    assert max_error(run(model, kind), expected) <= TOLERANCE
    delta_model.unmerge()
    for name, param in model.named_parameters():
        if "ia3" not in name:
            torch.testing.assert_close(param, weights[name], rtol=0, atol=1e-6, msg=name)
    assert max_error(run(model, kind), attached) <= TOLERANCE
    delta_model.merge_and_unload()
    assert max_error(run(model, kind), expected) <= TOLERANCE


def test_gpt2_defaults_scale_only_the_k_and_v_slices_of_the_fused_c_attn_as_peft_with_q_at_one():
    model = fresh("gpt2")
    peft_model = peft_ia3(model, "gpt2", seed=2)
    delta_model = IA3Model(model)  # attn.k, attn.v (slices of c_attn) and ff.w2 (mlp.c_proj, input-scaled)
    assert {t.parts for t in delta_model.targets if t.name.endswith("c_attn")} == {(1, 2)}
    width = model.config.n_embd
    with torch.no_grad():
        for name, module in peft_model.named_modules():
            if name.endswith("attn.c_attn"):
                module.ia3_l["default"][:width] = 1.0  # q unscaled, as ours leaves it
    copy_vectors(peft_vectors(peft_model), delta_model)
    assert max_error(run(model, "gpt2"), run(peft_model, "gpt2")) <= TOLERANCE
    expected = run(peft_model.merge_and_unload(), "gpt2")
    delta_model.merge()
    assert max_error(run(model, "gpt2"), expected) <= TOLERANCE
