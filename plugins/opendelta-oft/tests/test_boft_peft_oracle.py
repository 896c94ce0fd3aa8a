"""BOFT against PEFT 0.21.2, the oracle: same parameters, same outputs, attached and merged, on four architectures.

One butterfly factor is PEFT's own CPU path; more factors run PEFT's multi-factor path with its CUDA block-diagonal
kernel replaced by the same computation in PyTorch (``PythonFbd``).
"""

import pytest
import torch
from oft_helpers import (
    PEFT_TARGETS,
    check_merge_like_peft,
    copy_boft,
    fresh,
    max_error,
    peft_boft,
    peft_boft_tensors,
    run,
)

from opendelta_oft import BOFTModel

pytest.importorskip("peft")

ARCHS = tuple(PEFT_TARGETS)
TOLERANCE = 1e-5
OPTIONS = {
    "one_factor": {},
    "two_factors": {"boft_n_butterfly_factor": 2},
    "three_factors_by_num": {"boft_block_size": 0, "boft_block_num": 8, "boft_n_butterfly_factor": 3},
}
OURS = {"three_factors_by_num": {"boft_block_size": 4, "boft_n_butterfly_factor": 3}}
"""Our options where PEFT's differ: PEFT's ``boft_block_num`` is ``boft_block_size = 32 / boft_block_num`` here."""


def ours_like_peft(arch, model, **options):
    return BOFTModel(model, modified_modules=PEFT_TARGETS[arch], **{"boft_block_size": 4, **options})


def _peft(model, kind, option, monkeypatch, seed=0):
    patched = monkeypatch if OPTIONS[option].get("boft_n_butterfly_factor", 1) > 1 else None
    peft_model = peft_boft(model, kind, seed=seed, monkeypatch=patched, **OPTIONS[option])
    factors = {t[0].shape[0] for t in peft_boft_tensors(peft_model).values()}
    assert factors == {OPTIONS[option].get("boft_n_butterfly_factor", 1)}  # PEFT really ran that many
    return peft_model


@pytest.mark.parametrize("option", tuple(OPTIONS))
@pytest.mark.parametrize("kind", ARCHS)
def test_forward_equals_peft_with_the_same_parameters(kind, option, monkeypatch):
    model = fresh(kind)
    bare = run(model, kind)
    peft_model = _peft(model, kind, option, monkeypatch)
    delta_model = ours_like_peft(kind, model, **OURS.get(option, OPTIONS[option]))
    tensors = peft_boft_tensors(peft_model)
    assert {t.name for t in delta_model.targets} == set(tensors)
    copy_boft(tensors, delta_model)
    expected, ours = run(peft_model, kind), run(model, kind)
    assert not torch.allclose(expected, bare)
    assert max_error(ours, expected) <= TOLERANCE


@pytest.mark.parametrize("option", ("one_factor", "two_factors"))
@pytest.mark.parametrize("kind", ARCHS)
def test_merge_equals_peft_merge_and_unload_and_unmerge_gives_the_backbone_back(kind, option, monkeypatch):
    model = fresh(kind)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    peft_model = _peft(model, kind, option, monkeypatch, seed=1)
    delta_model = ours_like_peft(kind, model, **OPTIONS[option])
    copy_boft(peft_boft_tensors(peft_model), delta_model)
    check_merge_like_peft(kind, model, weights, peft_model, delta_model, "boft")
