"""What is specific to IA3Model: its exports, which targets are feed-forward, per-row routing, quantized merging."""

import pytest
import torch
from torch import nn

import opendelta
from opendelta import DeltaConfigError, route_rows
from opendelta.errors import OpenDeltaQuantizationWarning
from opendelta.plugin_api import QuantizationBackend
from opendelta.registry import reload
from opendelta.testing import model_output_tensor, tiny_inputs, tiny_model
from opendelta_ia3 import IA3Config, IA3Layer, IA3Model


def test_importable_from_opendelta_once_installed():
    assert opendelta.IA3Model is IA3Model and opendelta.IA3Config is IA3Config
    assert IA3Model.delta_type == "ia3" and IA3Model.delta_name == "ia3"


def _kinds(delta_model):
    return {t.name.split("layer.0.")[-1]: i.kind for t, i in delta_model.placements() if "layer.0." in t.name}


def test_feedforward_modules_decide_input_or_output_scaling():
    defaults = IA3Model(tiny_model("bert"))
    assert _kinds(defaults) == {
        "attention.self.key": "after",
        "attention.self.value": "after",
        "output.dense": "before",
    }
    real = IA3Model(tiny_model("bert"), modified_modules=["value", "layer.0.output.dense"])  # None: ff.w2 ones
    assert _kinds(real) == {"attention.self.value": "after", "output.dense": "before"}
    none = IA3Model(tiny_model("bert"), modified_modules=["value", "output.dense"], feedforward_modules=[])
    assert set(_kinds(none).values()) == {"after"}
    width = {m: {t.name: i.delta.ia3_l.shape[0] for t, i in m.placements()} for m in (none, real)}
    assert width[none]["bert.encoder.layer.0.output.dense"] == 32  # output-scaled: out_features wide
    assert width[real]["bert.encoder.layer.0.output.dense"] == 37  # input-scaled: in_features wide


def test_feedforward_modules_must_be_modified_ones():
    with pytest.raises(DeltaConfigError, match="feedforward_modules"):
        IA3Model(tiny_model("bert"), modified_modules=["value"], feedforward_modules=["output.dense"])


def test_each_routed_row_gets_exactly_what_its_delta_alone_gives():
    model = tiny_model("bert").eval()
    inputs = tiny_inputs("bert")
    first, second = IA3Model(model, init_ia3_weights=False), IA3Model(model, init_ia3_weights=False)
    runs = {}
    for name, other in (("first", second), ("second", first)):
        other.detach()
        with torch.no_grad():
            runs[name] = model_output_tensor(model(**inputs))
        other.attach()
    rows = inputs["input_ids"].shape[0]
    plan = [first if i % 2 == 0 else second for i in range(rows)]
    with torch.no_grad(), route_rows(model, plan):
        routed = model_output_tensor(model(**inputs))
    for i in range(rows):
        torch.testing.assert_close(routed[i], runs["first" if i % 2 == 0 else "second"][i], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------- a quantized backbone
class RowInt8Linear(nn.Module):
    """``y = (codes * scale[:, None]) x + b``: a toy weight-only int8 layer (not an ``nn.Linear``)."""

    def __init__(self, weight, bias):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.quantize(weight)
        self.bias = nn.Parameter(bias.clone(), requires_grad=False)

    def quantize(self, weight):
        scale = weight.abs().amax(dim=1).clamp_min(1e-8) / 127
        self.weight = nn.Parameter(torch.round(weight / scale[:, None]).to(torch.int8), requires_grad=False)
        self.scale = scale

    def dequantize(self):
        return self.weight.to(torch.float32) * self.scale[:, None]

    def forward(self, x):
        return x @ self.dequantize().t() + self.bias


class RowInt8Backend(QuantizationBackend):
    name = "toy row int8 (ia3 tests)"
    package = ""

    def layer_types(self):
        return (RowInt8Linear,)

    def handles(self, module):
        return isinstance(module, RowInt8Linear)

    def dequantize(self, module):
        return module.dequantize()

    def requantize_problem(self, module):
        return None

    def requantize(self, module, weight):
        module.quantize(weight)

    def saved_state(self, module):
        return {"weight": module.weight, "scale": module.scale}

    def restore(self, module, state):
        module.weight, module.scale = state["weight"], state["scale"]


class ToyQuantPlugin:
    @opendelta.hookimpl
    def register_quantization_backends(self, register):
        register(RowInt8Backend())


@pytest.fixture
def toy_backend():
    reload()
    opendelta.plugins.load_plugins()
    plugin = ToyQuantPlugin()
    opendelta.plugins.pm.register(plugin, name="toy_quant_ia3")
    try:
        yield
    finally:
        opendelta.plugins.pm.unregister(plugin)
        reload()


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.up = RowInt8Linear(torch.randn(6, 8, generator=generator), torch.randn(6, generator=generator))
        self.down = RowInt8Linear(torch.randn(4, 6, generator=generator), torch.randn(4, generator=generator))

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


@pytest.mark.usefixtures("toy_backend")
def test_merging_into_quantized_layers_uses_the_dequantized_weight_and_unmerge_restores_the_storage():
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    net = Net()
    storage = net.up.weight
    delta_model = IA3Model(net, modified_modules=["up", "down"], feedforward_modules=["down"], init_ia3_weights=False)
    assert [type(d) for d in delta_model.deltas] == [IA3Layer, IA3Layer] and delta_model.deltas[1].feedforward
    with torch.no_grad():
        attached = net(x)
        with pytest.warns(OpenDeltaQuantizationWarning):
            delta_model.merge()
        torch.testing.assert_close(net(x), attached, rtol=0.1, atol=0.1)  # requantized: int8 rounding
        delta_model.unmerge()
        assert net.up.weight is storage
        torch.testing.assert_close(net(x), attached, rtol=1e-5, atol=1e-5)
        delta_model.merge_and_unload(dequantize=True)
        assert isinstance(net.up, nn.Linear) and isinstance(net.down, nn.Linear)
        torch.testing.assert_close(net(x), attached, rtol=1e-5, atol=1e-5)
