"""BitFit's detach()/attach() exactness (which the original could not offer) and its composition with other deltas."""

import pytest
import torch

from opendelta.testing import model_output_tensor, perturb, tiny_inputs, tiny_model
from opendelta_bitfit import BitFitModel


def _run(model, arch):
    with torch.no_grad():
        return model_output_tensor(model(**tiny_inputs(arch)))


@pytest.mark.parametrize("kind", ["bert", "t5", "gpt2"])
def test_detach_after_training_gives_back_the_backbone_exactly_and_attach_the_trained_model(kind):
    arch = kind  # not named arch: the conformance fixtures parametrize that name over every architecture
    model = tiny_model(arch)
    bare_out, bare_keys = _run(model, arch), list(model.state_dict())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    delta_model = BitFitModel(backbone_model=model)
    assert all(p.requires_grad for p in model.parameters())  # building BitFit changes no requires_grad
    delta_model.freeze_module(set_state_dict=False)
    embeddings = model.get_input_embeddings().weight.requires_grad_(True)  # the user unfreezes one backbone tensor
    user_grad = {n: p.requires_grad for n, p in model.named_parameters() if "bitfit" not in n}
    assert sum(user_grad.values()) == 1

    optimizer = torch.optim.Adam(delta_model.parameters(), lr=1e-2)  # the embeddings get gradients, no steps
    model.train()
    for _ in range(3):
        optimizer.zero_grad()
        model_output_tensor(model(**tiny_inputs(arch))).float().pow(2).mean().backward()
        optimizer.step()
    model.eval()
    assert all(torch.count_nonzero(p) > 0 for p in delta_model.parameters())
    trained_out = _run(model, arch)
    assert not torch.equal(trained_out, bare_out)

    delta_model.detach()
    params = dict(model.named_parameters())
    assert params.keys() == before.keys() and list(model.state_dict()) == bare_keys
    assert not any("bitfit" in k for k in [*params, *model.state_dict()])
    for name, value in before.items():
        assert torch.equal(params[name], value), name  # every backbone bias (and weight) as before BitFit
    assert {n: p.requires_grad for n, p in params.items()} == user_grad and embeddings.requires_grad
    assert torch.equal(_run(model, arch), bare_out)

    delta_model.attach()
    assert torch.equal(_run(model, arch), trained_out)
    assert {n: p.requires_grad for n, p in model.named_parameters() if "bitfit" not in n} == user_grad


def test_two_bitfits_on_one_module_run_in_the_order_added_and_detach_independently():
    model = tiny_model("bert")
    query = model.bert.encoder.layer[1].attention.self.query
    first = BitFitModel(backbone_model=model, modified_modules=["1.attention.self.query"])
    second = BitFitModel(backbone_model=model, modified_modules=["1.attention"])
    perturb(first, seed=1)
    perturb(second, seed=2)
    calls = []
    for name in ("bitfit", "bitfit_1"):
        query._modules[name].register_forward_hook(lambda m, i, o, name=name: calls.append(name))
    x = torch.randn(2, 3, query.in_features)
    inner = x @ query.weight.t() + query.bias
    with torch.no_grad():
        torch.testing.assert_close(query(x), inner + query.bitfit.bias + query.bitfit_1.bias)
    assert calls == ["bitfit", "bitfit_1"]
    assert "bert.encoder.layer.1.attention.self.query.bitfit.bias" in second.delta_state_dict()  # stable name

    first.detach()
    with torch.no_grad():
        torch.testing.assert_close(query(x), inner + second.deltas[0].bias)
    first.attach()
    with torch.no_grad():
        torch.testing.assert_close(query(x), inner + first.deltas[0].bias + second.deltas[0].bias)


def test_composes_with_a_parallel_delta_on_the_same_layer():
    opendelta_lora = pytest.importorskip("opendelta_lora")
    model = tiny_model("bert")
    value = model.bert.encoder.layer[0].attention.self.value
    lora = opendelta_lora.LoraModel(backbone_model=model, modified_modules=["0.attention.self.value"], lora_r=2)
    bitfit = BitFitModel(backbone_model=model, modified_modules=["0.attention.self.value"])
    perturb(lora, seed=3)
    perturb(bitfit, seed=4)
    x = torch.randn(2, 3, value.in_features)
    with torch.no_grad():
        expected = x @ value.weight.t() + value.bias + value.lora(x) + value.bitfit.bias
        torch.testing.assert_close(value(x), expected)
        lora.detach()
        torch.testing.assert_close(value(x), x @ value.weight.t() + value.bias + value.bitfit.bias)
