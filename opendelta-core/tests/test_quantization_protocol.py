"""The quantization protocol with a third-party backend registered through the public hook, core alone installed.

A toy row-wise int8 layer (not an ``nn.Linear`` subclass) and its backend, registered as a plugin would register
them, show what every real backend gets from core: the layer counts as linear (sizes and compute dtype from the
backend), deltas beside it are float, the backbone hash reads its int8 storage, merging requantizes with the loss
reported and unmerging puts the very same storage objects back, a backend that cannot requantize is refused by name
with nothing changed, and ``merge_and_unload(dequantize=True)`` leaves plain ``nn.Linear`` layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from torch import nn

import opendelta
from opendelta import DeltaConfig, DeltaModel, DeltaStateError, Target
from opendelta.errors import OpenDeltaQuantizationWarning
from opendelta.hashing import backbone_hash
from opendelta.plugin_api import QuantizationBackend, factory_kwargs, is_linear, linear_features, stored_update
from opendelta.quantization import backend_of, quantized_modules
from opendelta.registry import reload


class RowInt8Linear(nn.Module):
    """``y = (codes * scale[:, None]) x + b``: int8 codes row-scaled, the simplest weight-only quantization."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.weight = nn.Parameter(torch.empty(0, dtype=torch.int8), requires_grad=False)
        self.register_buffer("scale", torch.empty(0))
        self.quantize(weight)
        self.bias = None if bias is None else nn.Parameter(bias.clone(), requires_grad=False)

    def quantize(self, weight: torch.Tensor) -> None:
        scale = weight.abs().amax(dim=1).clamp_min(1e-8) / 127
        codes = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8)
        self.weight = nn.Parameter(codes, requires_grad=False)  # a new object: the old one stays untouched
        self.scale = scale

    def dequantize(self) -> torch.Tensor:
        return self.weight.to(torch.float32) * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x @ self.dequantize().t()
        return out if self.bias is None else out + self.bias


class RowInt8Backend(QuantizationBackend):
    name = "toy row int8"
    package = ""  # always consulted (a real backend names its library's import)

    def layer_types(self) -> tuple[type[nn.Module], ...]:
        return (RowInt8Linear,)

    def handles(self, module: nn.Module) -> bool:
        return isinstance(module, RowInt8Linear)

    def dequantize(self, module: nn.Module) -> torch.Tensor:
        return module.dequantize()

    def requantize_problem(self, module: nn.Module) -> str | None:
        return None

    def requantize(self, module: nn.Module, weight: torch.Tensor) -> None:
        module.quantize(weight)

    def saved_state(self, module: nn.Module) -> dict:
        return {"weight": module.weight, "scale": module.scale}

    def restore(self, module: nn.Module, state: dict) -> None:
        module.weight, module.scale = state["weight"], state["scale"]


class FrozenBackend(RowInt8Backend):
    """The same layers, from a library that cannot quantize a weight again."""

    def requantize_problem(self, module: nn.Module) -> str | None:
        return "its codebook is fixed at export time"


class LowRank(nn.Module):
    """A LoRA-like update ``x -> x A^T B^T``, mergeable as ``W + B A``."""

    def __init__(self, features: tuple[int, int], **factory: object) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.randn(2, features[0], **factory) * 0.3)
        self.b = nn.Parameter(torch.randn(features[1], 2, **factory) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.a.t() @ self.b.t()

    def can_merge(self, host: nn.Module) -> bool:
        return is_linear(host)

    def merge_update(self, host: nn.Module) -> dict[str, torch.Tensor]:
        return {"weight": stored_update(host, (self.b @ self.a).detach())}


@dataclass(kw_only=True)
class LowRankConfig(DeltaConfig):
    delta_type: ClassVar[str] = "toy_low_rank"


class LowRankModel(DeltaModel):
    config_class = LowRankConfig
    default_modified_modules = ("proj",)
    insertion = "parallel"

    def supports(self, module: nn.Module) -> bool:
        return is_linear(module)

    def _build_delta(self, target: Target) -> nn.Module:
        return LowRank(linear_features(target.module), **factory_kwargs(target.module))


class ToyQuantPlugin:
    def __init__(self, backend: QuantizationBackend) -> None:
        self.backend = backend

    @opendelta.hookimpl
    def register_delta_methods(self, register):
        register(LowRankModel)

    @opendelta.hookimpl
    def register_quantization_backends(self, register):
        register(self.backend)


@pytest.fixture(params=[RowInt8Backend, FrozenBackend], ids=["requantizes", "frozen"])
def backend(request):
    reload()
    opendelta.plugins.load_plugins()
    plugin = ToyQuantPlugin(request.param())
    opendelta.plugins.pm.register(plugin, name="toy_quant")
    try:
        yield plugin.backend
    finally:
        opendelta.plugins.pm.unregister(plugin)
        reload()


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = RowInt8Linear(torch.randn(6, 8), torch.randn(6))
        self.norm = nn.LayerNorm(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x))


X = torch.randn(3, 8)


def _delta(net: Net) -> LowRankModel:
    return LowRankModel(backbone_model=net, modified_modules=["proj"])


def test_a_registered_backend_makes_its_layers_linear(backend: QuantizationBackend) -> None:
    net = Net()
    assert backend_of(net.proj) is backend and is_linear(net.proj)
    assert linear_features(net.proj) == (8, 6)
    assert factory_kwargs(net.proj) == {"device": torch.device("cpu"), "dtype": torch.float32}
    delta = _delta(net)
    assert all(p.dtype == torch.float32 for p in delta.parameters())


def test_the_hash_reads_the_quantized_storage(backend: QuantizationBackend) -> None:
    net = Net()
    first = backbone_hash(net)
    net(X)
    assert backbone_hash(net) == first
    with torch.no_grad():
        net.proj.weight[0, 0] += 1
    assert backbone_hash(net) != first


def test_merge_requantizes_reports_the_loss_and_unmerge_restores_the_same_objects(backend: RowInt8Backend) -> None:
    if isinstance(backend, FrozenBackend):
        pytest.skip("this backend cannot requantize: see the refusal test")
    net = Net()
    delta = _delta(net)
    tuned = net(X).detach()
    old_weight, old_scale = net.proj.weight, net.proj.scale
    with pytest.warns(OpenDeltaQuantizationWarning, match=r"1 quantized layer\(s\) \(toy row int8\).*up to"):
        delta.merge()
    assert net.proj.weight is not old_weight and net.proj.weight.dtype == torch.int8
    torch.testing.assert_close(net(X), tuned, rtol=0, atol=0.05)
    delta.unmerge()
    assert net.proj.weight is old_weight and net.proj.scale is old_scale
    assert torch.equal(net(X).detach(), tuned)


def test_a_backend_that_cannot_requantize_is_refused_by_name_and_nothing_changes(backend: RowInt8Backend) -> None:
    if not isinstance(backend, FrozenBackend):
        pytest.skip("this backend requantizes")
    net = Net()
    delta = _delta(net)
    tuned, weight = net(X).detach(), net.proj.weight
    with pytest.raises(DeltaStateError, match=r"proj \(toy row int8\): its codebook is fixed.*dequantize=True"):
        delta.merge()
    assert net.proj.weight is weight and not delta.merged and delta.attached
    assert torch.equal(net(X).detach(), tuned)


def test_merge_and_unload_dequantize_leaves_plain_linear_layers(backend: QuantizationBackend) -> None:
    net = Net()
    delta = _delta(net)
    tuned = net(X).detach()
    plain = delta.merge_and_unload(dequantize=True)
    assert type(plain.proj) is nn.Linear and not quantized_modules(plain)
    torch.testing.assert_close(plain(X), tuned, rtol=0, atol=1e-6)


def test_an_integer_weight_no_backend_handles_is_refused() -> None:
    from opendelta.quantized_merge import refusals

    layer = nn.Linear(4, 4)
    layer.weight = nn.Parameter(torch.zeros(4, 4, dtype=torch.int8), requires_grad=False)
    problems = refusals([(layer, {"weight": torch.ones(4, 4)})], {id(layer): "encoder.proj"})
    assert problems == [
        "encoder.proj.weight is torch.int8 and no quantization backend handles Linear (register one with the "
        "register_quantization_backends hook)"
    ]
