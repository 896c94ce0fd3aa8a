"""LN tuning against PEFT 0.21.2, the oracle: same trained norms, same outputs, attached and merged; detach exact."""

import pytest
import torch
from ln_tuning_helpers import PEFT_TARGETS, copy_offsets, fresh, peft_ln_tuning, peft_offsets, run

from opendelta_ln_tuning import LNTuningModel

pytest.importorskip("peft")

ARCHS = tuple(PEFT_TARGETS)
TOLERANCE = 1e-5


def ours_like_peft(offsets, model):
    return LNTuningModel(model, modified_modules=sorted({name for name, _ in offsets}))


def max_error(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("kind", ARCHS)
def test_forward_equals_peft_with_the_same_trained_norms_and_detach_is_exact(kind):
    model = fresh(kind)
    bare = run(model, kind)
    weights = {n: p.detach().clone() for n, p in model.state_dict().items()}
    peft_model = peft_ln_tuning(model, kind)
    offsets = peft_offsets(peft_model)
    assert any(p == "bias" for _, p in offsets) == (kind in ("bert", "gpt2"))  # RMS norms have no bias
    delta_model = ours_like_peft(offsets, model)
    copy_offsets(offsets, delta_model)
    expected, ours = run(peft_model, kind), run(model, kind)
    assert not torch.allclose(expected, bare)
    error = max_error(ours, expected)
    print(f"{kind}: forward max abs error vs PEFT {error:.3g}")
    assert error <= TOLERANCE
    with peft_model.disable_adapter():
        assert max_error(run(peft_model, kind), bare) <= TOLERANCE
    delta_model.detach()
    assert torch.equal(run(model, kind), bare)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, weights[name]), name
    delta_model.attach()
    assert max_error(run(model, kind), expected) <= TOLERANCE


@pytest.mark.parametrize("kind", ARCHS)
def test_merge_equals_peft_merge_and_unload_and_unmerge_gives_the_backbone_back(kind):
    model = fresh(kind)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    peft_model = peft_ln_tuning(model, kind, seed=1)
    offsets = peft_offsets(peft_model)
    delta_model = ours_like_peft(offsets, model)
    copy_offsets(offsets, delta_model)
    attached = run(model, kind)
    expected = run(peft_model.merge_and_unload(), kind)
    error = max_error(attached, expected)
    print(f"{kind}: attached vs PEFT merge_and_unload max abs error {error:.3g}")
    assert error <= TOLERANCE
    delta_model.merge()
    assert not any("ln_tuning" in n for n in dict(model.named_modules()))
    error = max_error(run(model, kind), expected)
    print(f"{kind}: merged vs PEFT merge_and_unload max abs error {error:.3g}")
    assert error <= TOLERANCE
    delta_model.unmerge()
    for name, param in model.named_parameters():
        if "ln_tuning" not in name:
            torch.testing.assert_close(param, weights[name], rtol=0, atol=1e-6, msg=name)
    assert max_error(run(model, kind), attached) <= TOLERANCE
    delta_model.merge_and_unload()
    assert max_error(run(model, kind), expected) <= TOLERANCE


@pytest.mark.parametrize("kind", ARCHS)
def test_the_defaults_train_every_layer_norm_peft_targets_in_the_blocks(kind):
    model = fresh(kind)
    peft_names = {name for name, _ in peft_offsets(peft_ln_tuning(model, kind))}
    delta_model = LNTuningModel(model)
    ours = {t.name for t in delta_model.targets}
    assert ours and ours <= peft_names
    blocks = {n for n in peft_names if any(c.isdigit() for c in n.split("."))}
    assert blocks <= ours, sorted(blocks - ours)
    assert all(d.offset.requires_grad and not d.offset.any() for d in delta_model.deltas)
