"""The shared building blocks: the two adapter layouts, activations and initialisers."""

import pytest
import torch
from torch import nn

from opendelta.layers import ACTIVATIONS, INITIALISERS, BottleneckAdapter, SamplerAdapter, get_activation, init_weight_


def test_bottleneck_adapter_is_h_plus_up_act_down_h_under_the_original_names():
    torch.manual_seed(0)
    adapter = BottleneckAdapter(6, 3, "relu")
    for p in adapter.parameters():
        nn.init.normal_(p)
    h = torch.randn(2, 4, 6)
    block = adapter.modulelist
    assert list(dict(block.named_children())) == ["down_proj", "non_linear", "up_proj"]
    torch.testing.assert_close(adapter(h), h + block.up_proj(torch.relu(block.down_proj(h))))


def test_bottleneck_adapter_without_residual_is_scaled_and_may_change_width():
    torch.manual_seed(0)
    adapter = BottleneckAdapter(6, 3, "tanh", out_features=5, residual=False, scale=4.0)
    h = torch.randn(2, 6)
    block = adapter.modulelist
    torch.testing.assert_close(adapter(h), 4.0 * block.up_proj(torch.tanh(block.down_proj(h))))
    with pytest.raises(ValueError, match="out_features == in_features"):
        BottleneckAdapter(6, 3, out_features=5)


def test_fresh_bottleneck_adapter_is_near_identity_and_exact_with_zero_up():
    h = torch.randn(3, 8)
    assert (BottleneckAdapter(8, 4)(h) - h).abs().max() < 0.05
    assert torch.equal(BottleneckAdapter(8, 4, zero_up=True)(h), h)


def test_sampler_adapter_uses_the_samplers_it_is_given():
    down, up = nn.Linear(6, 2), nn.Linear(2, 6)
    adapter = SamplerAdapter(down, up, "gelu")
    h = torch.randn(4, 6)
    assert adapter.down_sampler is down and adapter.up_sampler is up
    torch.testing.assert_close(adapter(h), h + up(nn.functional.gelu(down(h))))


def test_activations_are_fresh_modules_and_unknown_names_list_the_known_ones():
    assert get_activation("ReLU") is not get_activation("relu")
    for name in ACTIVATIONS:
        assert isinstance(get_activation(name), nn.Module)
    with pytest.raises(ValueError, match="gelu_new"):
        get_activation("gleu")


@pytest.mark.parametrize("method", INITIALISERS)
def test_every_initialiser_fills_the_tensor(method):
    tensor = torch.full((16, 8), float("nan"))
    init_weight_(tensor, method, std=0.02)
    assert tensor.isfinite().all()
    if method == "zeros":
        assert torch.count_nonzero(tensor) == 0
    elif method == "uniform":
        assert tensor.abs().max() <= 0.02
    else:
        assert tensor.std() > 0


def test_unknown_initialiser_is_named():
    with pytest.raises(ValueError, match="glorot-uniform"):
        init_weight_(torch.empty(2, 2), "xavier")
