"""OFT and BOFT on a quantized backbone, through core's quantization backend API (a toy int8 backend here).

Both size their deltas with ``linear_features``/``factory_kwargs`` and merge from the backend's dequantized weight;
BOFT runs the quantized layer's own forward on the rotated input.
"""

import pytest
import torch
from torch import nn

import opendelta
from opendelta.errors import OpenDeltaQuantizationWarning
from opendelta.plugin_api import QuantizationBackend
from opendelta.registry import reload
from opendelta_oft import BOFTModel, OFTModel


class TensorInt8Linear(nn.Module):
    """``y = x (q s)^T + b`` with one scale ``s`` for the whole int8 weight ``q`` (a toy, not an ``nn.Linear``)."""

    def __init__(self, out_features, in_features, seed):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.in_features, self.out_features = in_features, out_features
        self.store(torch.randn(out_features, in_features, generator=generator))
        self.bias = nn.Parameter(torch.randn(out_features, generator=generator), requires_grad=False)

    def store(self, weight):
        self.scale = weight.abs().max() / 127
        self.weight = nn.Parameter(torch.round(weight / self.scale).to(torch.int8), requires_grad=False)

    def forward(self, x):
        return x @ (self.weight.float() * self.scale).t() + self.bias


class TensorInt8Backend(QuantizationBackend):
    name = "toy per-tensor int8 (oft tests)"
    package = ""

    def layer_types(self):
        return (TensorInt8Linear,)

    def handles(self, module):
        return isinstance(module, TensorInt8Linear)

    def dequantize(self, module):
        return module.weight.float() * module.scale

    def requantize_problem(self, module):
        return None

    def requantize(self, module, weight):
        module.store(weight)

    def saved_state(self, module):
        return {"weight": module.weight, "scale": module.scale}

    def restore(self, module, state):
        module.weight, module.scale = state["weight"], state["scale"]


class Plugin:
    @opendelta.hookimpl
    def register_quantization_backends(self, register):
        register(TensorInt8Backend())


@pytest.fixture
def int8_backend():
    reload()
    opendelta.plugins.load_plugins()
    plugin = Plugin()
    opendelta.plugins.pm.register(plugin, name="toy_int8_oft")
    try:
        yield
    finally:
        opendelta.plugins.pm.unregister(plugin)
        reload()


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second = TensorInt8Linear(8, 16, seed=0), TensorInt8Linear(4, 8, seed=1)

    def forward(self, x):
        return self.second(torch.tanh(self.first(x)))


@pytest.mark.usefixtures("int8_backend")
@pytest.mark.parametrize(
    "make",
    [
        lambda net: OFTModel(net, modified_modules=["first", "second"], oft_block_size=4, init_weights=False),
        lambda net: BOFTModel(net, modified_modules=["first", "second"], boft_n_butterfly_factor=2, init_weights=False),
    ],
    ids=("oft", "boft"),
)
def test_attach_merge_unmerge_and_dequantized_unload_on_quantized_layers(make):
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(2))
    net = Net()
    with torch.no_grad():
        bare = net(x)
    storage = net.first.weight
    delta_model = make(net)
    with torch.no_grad():
        attached = net(x)
        assert not torch.allclose(attached, bare)
        with pytest.warns(OpenDeltaQuantizationWarning):
            delta_model.merge()
        torch.testing.assert_close(net(x), attached, rtol=0.1, atol=0.1)  # requantized: int8 rounding
        delta_model.unmerge()
        assert net.first.weight is storage
        torch.testing.assert_close(net(x), attached, rtol=1e-5, atol=1e-5)
        delta_model.merge_and_unload(dequantize=True)
        assert isinstance(net.first, nn.Linear) and isinstance(net.second, nn.Linear)
        torch.testing.assert_close(net(x), attached, rtol=1e-5, atol=1e-5)
