"""The public plugin contract: class attributes checked when a method is defined, the name written once, the
override points called in order, the optional behaviours as Protocols, and one record of placed deltas."""

import importlib.util
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from torch import nn
from toy_method import Scale

import opendelta
from opendelta import plugin_api
from opendelta.delta_protocols import FusedParallel, Mergeable, WrapsReplaced, class_implements, wrapped_name
from opendelta.errors import DeltaClassError, DeltaConfigError, DeltaStateError, UnsupportedTargetError
from opendelta.insertion import PRIMITIVE_PLACEMENTS, placement_kinds, register_placement
from opendelta.registry import get_method, reload
from opendelta.testing import tiny_inputs, tiny_model

DeltaConfig = plugin_api.DeltaConfig  # the contract's classes, as a plugin sees them


@dataclass(kw_only=True)
class NamedConfig(DeltaConfig):
    delta_type: ClassVar[str] = "named_once"


def _scale_model(**attrs):
    namespace = {"config_class": NamedConfig, "default_modified_modules": ("ff.w2",), "insertion": "after"}
    namespace["_build_delta"] = lambda self, target: Scale(self.features(target.module)[1])
    namespace.update(attrs)
    return type("ScaleModel", (plugin_api.DeltaModel,), namespace)


def test_the_name_is_written_once_on_the_config():
    model_cls = _scale_model()
    assert model_cls.delta_type == "named_once" and model_cls.delta_name == "named_once"
    assert _scale_model(delta_name="other").delta_name == "other"  # a child name of its own stays


def test_a_subclass_with_another_config_takes_that_configs_name():
    @dataclass(kw_only=True)
    class OtherConfig(DeltaConfig):
        delta_type: ClassVar[str] = "other_name"

    sub = type("Sub", (_scale_model(),), {"config_class": OtherConfig})
    assert sub.delta_type == "other_name" and sub.delta_name == "other_name"


def test_a_model_whose_name_disagrees_with_its_config_is_refused_when_defined():
    with pytest.raises(DeltaClassError, match="'named_once'") as caught:
        _scale_model(delta_type="something_else")
    assert isinstance(caught.value, DeltaConfigError) and isinstance(caught.value, TypeError)


@pytest.mark.parametrize(
    ("attrs", "message"),
    [
        ({"insertion": "paralel"}, r"insertion is 'paralel' \(did you mean 'parallel'\?\)"),
        ({"insertion": "sideways"}, "must be one of 'after', 'before', 'parallel', 'replace'"),
        ({"config_class": dict}, "config_class must be a DeltaConfig subclass"),
        ({"delta_name": "not a name"}, "must be a Python identifier"),
        ({"supported_layer_types": nn.Linear}, "supported_layer_types must be None, a tuple"),
    ],
)
def test_bad_class_attributes_are_refused_when_the_class_is_defined(attrs, message):
    with pytest.raises(DeltaClassError, match=message):
        _scale_model(**attrs)


def test_the_placement_kinds_are_the_primitives_then_the_registered_ones():
    assert placement_kinds()[:4] == PRIMITIVE_PLACEMENTS
    assert {"prefix", "prompt"} <= set(placement_kinds())
    with pytest.raises(ValueError, match="already taken"):
        register_placement("after", lambda *a: None)


def test_register_takes_the_model_class_alone(toy):
    class OnePlugin:
        @opendelta.hookimpl
        def register_delta_methods(self, register):
            register(_scale_model())

    reload()
    opendelta.plugins.load_plugins()
    opendelta.plugins.pm.register(OnePlugin(), name="one")
    try:
        spec = get_method("named_once")
        assert spec.config_cls is NamedConfig and spec.model_cls.delta_type == "named_once"
    finally:
        reload()


def test_prepare_runs_once_with_every_target_before_any_delta_is_built():
    calls = []

    def prepare(self, targets):
        calls.append(("prepare", [t.name for t in targets], len(self.deltas)))

    def build(self, target):
        calls.append(("build", target.name))
        return Scale(self.features(target.module)[1])

    delta_model = _scale_model(_prepare=prepare, _build_delta=build)(tiny_model("bert"))
    names = [t.name for t in delta_model.targets]
    assert calls == [("prepare", names, 0), *(("build", n) for n in names)]


def test_supports_is_the_override_point_for_what_a_target_may_be():
    model_cls = _scale_model(supports=lambda self, module: False)
    with pytest.raises(UnsupportedTargetError, match=r"output\.dense"):
        model_cls(tiny_model("bert"))
    assert _scale_model(supported_layer_types=lambda: (nn.Linear,)).layer_types() == (nn.Linear,)


def test_placements_pair_each_target_with_its_delta_and_empty_after_unloading():
    class Bias(nn.Module):
        def __init__(self, features):
            super().__init__()
            self.b = nn.Parameter(torch.zeros(features))

        def forward(self, hidden):
            return hidden + self.b

        def can_merge(self, host: nn.Module) -> bool:
            return isinstance(host, nn.Linear) and host.bias is not None

        def merge_update(self, host: nn.Module) -> Mapping[str, torch.Tensor]:
            return {"bias": self.b}

    delta_model = _scale_model(_build_delta=lambda self, t: Bias(self.features(t.module)[1]))(tiny_model("bert"))
    pairs = list(delta_model.placements())
    assert [t.name for t, _ in pairs] == [t.name for t in delta_model.targets]
    assert [i.delta for _, i in pairs] == list(delta_model.deltas)
    delta_model.merge_and_unload()
    assert list(delta_model.placements()) == []
    with pytest.raises(DeltaStateError, match="after merge_and_unload"):
        delta_model.save_finetuned("never_written")


@pytest.mark.skipif(importlib.util.find_spec("opendelta_lora") is None, reason="needs opendelta-lora")
def test_the_optional_behaviours_are_protocols():
    from opendelta_lora import LoraLayer

    layer = LoraLayer(4, 4, r=1, alpha=1, dropout=0.0)
    assert isinstance(layer, Mergeable) and isinstance(layer, FusedParallel)
    assert class_implements(layer, FusedParallel) and not class_implements(Scale(3), Mergeable)


def test_wrapped_name_reads_the_protocol():
    class Wrapper(nn.Module):
        wrapped_name = "inner"

    assert isinstance(Wrapper(), WrapsReplaced) and wrapped_name(Wrapper()) == "inner"
    assert wrapped_name(Scale(2)) is None


def test_a_placement_kind_changed_after_definition_is_refused_not_replaced():
    model_cls = _scale_model()
    model_cls.insertion = "sideways"
    with pytest.raises(DeltaClassError, match="sideways"):
        model_cls(tiny_model("bert"))


def test_the_plugin_api_is_lazy_and_complete():
    code = (
        "import sys; from opendelta.plugin_api import hookimpl, RegisterDeltaMethod; "
        "import opendelta.plugin_api as api; "
        "print(sorted(n for n in vars(api) if n in api.__all__))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['PLUGIN_API_VERSION', 'RegisterDeltaMethod', 'hookimpl']"  # only what was asked for
    with pytest.raises(AttributeError, match="not part of the plugin contract"):
        plugin_api.insertion
    assert plugin_api.PLUGIN_API_VERSION.count(".") == 1
    model = tiny_model("bert")
    _scale_model()(model)
    with torch.no_grad():
        model(**tiny_inputs("bert"))
