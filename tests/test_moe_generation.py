"""Greedy ``generate()`` with the key/value cache equals it without, on the mixture-of-experts decoders' bare models.

The issue reported cached and uncached generations differing on OLMoE. The bare models agree on both transformers
lines (the routers pick the same experts with and without the cache, to float rounding): what differed was ours.
On transformers 4.57, OLMoE's and Qwen2-MoE's attention classes do not compute through the attention interface, so a
prefix goes in through placeholder rows; those rows got no rotary position (a crash before anything was generated)
and, once cached, moved the real tokens' positions up by the prefix length. Both are fixed in core
(``opendelta.sequence``: identity rotation for the rows, positions left alone after a cached prefix); the prefix and
soft-prompt plugins check cache == no cache with each delta on every generating architecture, these included.
"""

import pytest
import torch

from opendelta.testing.tiny_models import GENERATION_HEADS, MOE_ARCHITECTURES, generation_inputs, tiny_model


@pytest.mark.parametrize("arch", MOE_ARCHITECTURES)
@pytest.mark.parametrize("padding", ["left", "none"])
def test_the_bare_model_generates_the_same_with_and_without_the_cache(arch, padding):
    model = tiny_model(arch, GENERATION_HEADS[arch])
    inputs = generation_inputs(arch, model, padding)
    options = {"max_new_tokens": 8, "do_sample": False, "output_scores": True, "return_dict_in_generate": True}
    with torch.no_grad():
        cached = model.generate(**inputs, use_cache=True, **options)
        uncached = model.generate(**inputs, use_cache=False, **options)
    assert torch.equal(cached.sequences, uncached.sequences)
    for with_cache, without in zip(cached.scores, uncached.scores, strict=True):
        torch.testing.assert_close(with_cache, without, rtol=1e-5, atol=1e-5)
