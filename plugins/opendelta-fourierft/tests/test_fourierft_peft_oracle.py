"""FourierFT against PEFT 0.21.2, the oracle: same spectra, same locations, same outputs, attached and merged."""

import pytest
import torch
from fourierft_helpers import (
    N_FREQUENCY,
    PEFT_TARGETS,
    SCALING,
    copy_spectra,
    fresh,
    peft_fourierft,
    peft_layers,
    run,
)

from opendelta_fourierft import FourierFTModel

pytest.importorskip("peft")

ARCHS = tuple(PEFT_TARGETS)
TOLERANCE = 1e-5


def ours_like_peft(arch, model, **options):
    return FourierFTModel(
        model, modified_modules=PEFT_TARGETS[arch], n_frequency=N_FREQUENCY, scaling=SCALING, **options
    )


def max_error(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("kind", ARCHS)
def test_the_locations_drawn_from_the_seed_are_peft_s_bit_for_bit(kind):
    model = fresh(kind)
    peft_model = peft_fourierft(model, kind, random_loc_seed=1234)
    delta_model = ours_like_peft(kind, model, random_loc_seed=1234)
    layers = peft_layers(peft_model)
    for target, insertion in delta_model.placements():
        assert torch.equal(insertion.delta.indices, layers[target.name].indices["default"]), target.name


@pytest.mark.parametrize("kind", ARCHS)
def test_forward_equals_peft_with_the_same_spectra(kind):
    model = fresh(kind)
    bare = run(model, kind)
    peft_model = peft_fourierft(model, kind)
    delta_model = ours_like_peft(kind, model)
    copy_spectra(peft_model, delta_model)
    expected, ours = run(peft_model, kind), run(model, kind)
    assert max_error(expected, bare) > 10 * TOLERANCE  # the delta matters
    assert max_error(ours, expected) <= TOLERANCE


@pytest.mark.parametrize("kind", ARCHS)
def test_merge_equals_peft_merge_and_unload_and_unmerge_gives_the_backbone_back(kind):
    model = fresh(kind)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    peft_model = peft_fourierft(model, kind, seed=1)
    delta_model = ours_like_peft(kind, model)
    copy_spectra(peft_model, delta_model)
    attached = run(model, kind)
    expected = run(peft_model.merge_and_unload(), kind)
    assert max_error(attached, expected) <= TOLERANCE
    delta_model.merge()
    assert not any("fourierft" in n for n in dict(model.named_modules()))
    assert max_error(run(model, kind), expected) <= TOLERANCE
    delta_model.unmerge()
    for name, param in model.named_parameters():
        if "fourierft" not in name:
            torch.testing.assert_close(param, weights[name], rtol=0, atol=1e-6, msg=name)
    assert max_error(run(model, kind), attached) <= TOLERANCE
    delta_model.merge_and_unload()
    assert max_error(run(model, kind), expected) <= TOLERANCE


def test_n_frequency_pattern_follows_peft_s_rule():
    pattern = {"value": 64, r"layer\.1\.attention\.self\.query": 96}  # PEFT: re.match(rf".*\.{key}$", name)
    model = fresh("bert")
    peft_model = peft_fourierft(model, "bert", n_frequency_pattern=pattern)
    delta_model = ours_like_peft("bert", model, n_frequency_pattern=pattern)
    sizes = {t.name.removeprefix("bert.encoder."): i.delta.n_frequency for t, i in delta_model.placements()}
    assert sizes == {
        "layer.0.attention.self.query": N_FREQUENCY,
        "layer.0.attention.self.value": 64,
        "layer.1.attention.self.query": 96,
        "layer.1.attention.self.value": 64,
    }
    copy_spectra(peft_model, delta_model)
    assert max_error(run(model, "bert"), run(peft_model, "bert")) <= TOLERANCE
