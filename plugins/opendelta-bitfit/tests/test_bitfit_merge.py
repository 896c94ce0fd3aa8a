"""Merging BitFit: b += delta, a new bias where a layer had none, and T5's RMS norms left as deltas."""

import pytest
import torch

from opendelta import DeltaStateError
from opendelta.testing import model_output_tensor, perturb, tiny_inputs, tiny_model
from opendelta_bitfit import BitFitModel


def run(model, arch):
    with torch.no_grad():
        return model_output_tensor(model(**tiny_inputs(arch)))


def test_merge_adds_the_delta_to_existing_biases_exactly_as_attached():
    model = tiny_model("bert")
    query = model.bert.encoder.layer[0].attention.self.query
    bias = query.bias.clone()
    delta_model = BitFitModel(backbone_model=model)
    perturb(delta_model, scale=0.1)
    attached, delta = run(model, "bert"), query.bitfit.bias.detach().clone()
    delta_model.merge()
    torch.testing.assert_close(query.bias, bias + delta)
    torch.testing.assert_close(run(model, "bert"), attached, rtol=1e-5, atol=1e-5)


def test_t5_linears_gain_a_bias_and_its_rms_norms_stay_deltas_until_unmerged():
    model = tiny_model("t5")
    bare_keys = set(model.state_dict())
    delta_model = BitFitModel(backbone_model=model)
    perturb(delta_model, scale=0.1)
    attached = run(model, "t5")
    merged = delta_model.merge()
    norms = [t for t in delta_model.targets if type(t.module).__name__ == "T5LayerNorm"]
    assert norms and merged == len(delta_model.targets) - len(norms)
    assert model.encoder.block[0].layer[0].SelfAttention.q.bias is not None
    assert all(hasattr(t.module, "bitfit") for t in norms), "what cannot merge keeps running as a delta"
    torch.testing.assert_close(run(model, "t5"), attached, rtol=1e-5, atol=1e-5)
    with pytest.raises(DeltaStateError, match="T5LayerNorm"):
        delta_model.merge_and_unload()
    delta_model.unmerge()
    delta_model.detach()
    assert set(model.state_dict()) == bare_keys and model.encoder.block[0].layer[0].SelfAttention.q.bias is None
