"""OFT against PEFT 0.21.2, the oracle: same parameters, same outputs, attached and merged, on four architectures."""

import pytest
import torch
from oft_helpers import PEFT_TARGETS, check_merge_like_peft, copy_oft, fresh, max_error, peft_oft, peft_oft_blocks, run

from opendelta_oft import OFTModel

pytest.importorskip("peft")

ARCHS = tuple(PEFT_TARGETS)
TOLERANCE = 1e-5
OPTIONS = {
    "neumann": {},
    "exact": {"use_cayley_neumann": False},
    "neumann3": {"num_cayley_neumann_terms": 3},
    "coft": {"coft": True, "eps": 1e-2},
    "shared": {"block_share": True},
    "r": {"r": 2, "oft_block_size": 0},
}
OURS = {"r": {"oft_block_size": 16}}
"""Our options where PEFT's differ: PEFT's ``r`` (blocks per layer) is ``oft_block_size = 32 / r`` here."""


def ours_like_peft(arch, model, **options):
    return OFTModel(model, modified_modules=PEFT_TARGETS[arch], **{"oft_block_size": 8, **options})


@pytest.mark.parametrize("option", tuple(OPTIONS))
@pytest.mark.parametrize("kind", ARCHS)
def test_forward_equals_peft_with_the_same_parameters(kind, option):
    model = fresh(kind)
    bare = run(model, kind)
    peft_model = peft_oft(model, kind, **OPTIONS[option])
    delta_model = ours_like_peft(kind, model, **OURS.get(option, OPTIONS[option]))
    blocks = peft_oft_blocks(peft_model)
    assert {t.name for t in delta_model.targets} == set(blocks)  # PEFT's matching rules, on both sides
    copy_oft(blocks, delta_model)
    expected, ours = run(peft_model, kind), run(model, kind)
    assert not torch.allclose(expected, bare)
    assert max_error(ours, expected) <= TOLERANCE
    if option == "coft":  # both projected their parameters in place onto the same ball
        ours_blocks = {t.name: i.delta.oft_R for t, i in delta_model.placements()}
        for name, weight in peft_oft_blocks(peft_model).items():
            torch.testing.assert_close(ours_blocks[name], weight, rtol=0, atol=1e-7)


@pytest.mark.parametrize("option", ("neumann", "exact"))
@pytest.mark.parametrize("kind", ARCHS)
def test_merge_equals_peft_merge_and_unload_and_unmerge_gives_the_backbone_back(kind, option):
    model = fresh(kind)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    peft_model = peft_oft(model, kind, seed=1, **OPTIONS[option])
    delta_model = ours_like_peft(kind, model, **OPTIONS[option])
    copy_oft(peft_oft_blocks(peft_model), delta_model)
    check_merge_like_peft(kind, model, weights, peft_model, delta_model, "oft")
