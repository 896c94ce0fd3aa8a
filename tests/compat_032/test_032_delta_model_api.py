"""Issue 14, point 3: a delta model's attributes and helpers of OpenDelta 0.3.2 (manual sections 1.20.2 and 1.21).

Written from the manual: the hyper-parameters and addressing arguments read back as attributes, the parameter
helpers, ``find_key``/``find_module``, ``create_config_from_model``, ``mark_as_delta``, and the constructors'
positional hyper-parameters in each method's documented signature order.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from torch import nn

from opendelta import (
    AdapterModel,
    BitFitModel,
    CompacterModel,
    DeltaConfig,
    DeltaConfigError,
    DeltaModel,
    DeltaStateError,
    LoraModel,
    Target,
)
from opendelta.testing.tiny_models import tiny_model

MANUAL_ORDER = {
    LoraModel: ["lora_r", "lora_alpha", "lora_dropout", "modified_modules", "unfrozen_modules", "exclude_modules"],
    BitFitModel: ["modified_modules", "exclude_modules", "unfrozen_modules", "common_structure"],
    AdapterModel: ["bottleneck_dim", "non_linearity", "modified_modules", "exclude_modules", "unfrozen_modules"],
    CompacterModel: [
        "modified_modules",
        "exclude_modules",
        "unfrozen_modules",
        "common_structure",
        "interactive_modify",
        "backend",
        "reduction_factor",
        "non_linearity",
    ],
}


@pytest.fixture
def bert() -> nn.Module:
    return tiny_model("bert", "BertModel")


def _delta_numel(delta_model: DeltaModel) -> int:
    return sum(p.numel() for p in delta_model.deltas.parameters())


# ------------------------------------------------------------------------------------------------- attributes
def test_hyper_parameters_and_addressing_arguments_read_back_as_attributes(bert):
    delta_model = LoraModel(bert, lora_r=2, lora_alpha=4, modified_modules=["query"], exclude_modules=["layer.1"])
    assert (delta_model.lora_r, delta_model.lora_alpha, delta_model.lora_dropout) == (2, 4, 0.0)
    assert delta_model.modified_modules == ["query"] and delta_model.exclude_modules == ["layer.1"]
    assert delta_model.unfrozen_modules == ["deltas"] and delta_model.common_structure is None
    adapter = AdapterModel(tiny_model("bert", "BertModel"), bottleneck_dim=6, modified_modules=["output.dense"])
    assert adapter.bottleneck_dim == 6 and adapter.non_linearity == "gelu_new"
    compacter = CompacterModel(tiny_model("bert", "BertModel"), modified_modules=["output.dense"], reduction_factor=8)
    assert compacter.reduction_factor == 8 and compacter.hypercomplex_division == 4


def test_an_unknown_attribute_is_still_an_attribute_error(bert):
    delta_model = LoraModel(bert, modified_modules=["query"])
    with pytest.raises(AttributeError, match="lora_rank"):
        _ = delta_model.lora_rank
    assert not hasattr(delta_model, "bottleneck_dim")


def test_a_built_hyper_parameter_is_read_only_and_says_what_to_do(bert):
    delta_model = LoraModel(bert, lora_r=2, modified_modules=["query"])
    with pytest.raises(DeltaStateError, match=r"build a new delta model with lora_r=4"):
        delta_model.lora_r = 4
    assert delta_model.lora_r == 2 and delta_model.config.lora_r == 2
    with pytest.raises(DeltaStateError, match="modified_modules"):
        delta_model.modified_modules = ["key"]


def test_unfrozen_modules_set_on_the_model_is_what_freeze_module_uses(bert):
    delta_model = LoraModel(bert, modified_modules=["query"])
    delta_model.unfrozen_modules = ["deltas", "pooler"]
    assert delta_model.config.unfrozen_modules == ["deltas", "pooler"]
    delta_model.freeze_module()
    assert {n.split(".")[0] for n in delta_model.trainable_parameters_names()} == {"encoder", "pooler"}
    with pytest.raises(Exception, match="unfrozen_modules"):
        delta_model.unfrozen_modules = "pooler"


def test_delta_modules_holds_the_delta_layers_as_0_3_2_did(bert):
    delta_model = LoraModel(bert, modified_modules=["query", "value"])
    assert isinstance(delta_model.delta_modules, nn.ModuleList) and len(delta_model.delta_modules) == 4
    hosts = [i.host for i in delta_model.insertions()]
    assert [h.lora for h in hosts] == list(delta_model.delta_modules)


# ------------------------------------------------------------------------------------------ parameter helpers
@pytest.mark.parametrize(
    "build",
    [
        lambda m: LoraModel(m, modified_modules=["query"]),
        lambda m: AdapterModel(m, modified_modules=["output.dense"]),
        lambda m: BitFitModel(m, modified_modules=["attention"]),
        lambda m: CompacterModel(m, modified_modules=["output.dense"]),
    ],
    ids=["lora", "adapter", "bitfit", "compacter"],
)
def test_parameter_helpers_count_and_name_what_they_say(bert, build):
    delta_model = build(bert)
    delta_model.freeze_module(exclude=["deltas"])
    trainable = delta_model.trainable_parameters_names()
    frozen = delta_model.frozen_parameters_names()
    every = [n for n, _ in bert.named_parameters()]
    assert trainable and set(trainable).isdisjoint(frozen) and sorted(trainable + frozen) == sorted(every)
    assert delta_model.num_trainable_parameters() == _delta_numel(delta_model) == delta_model.num_total_parameters()
    assert delta_model.num_total_parameters(bert) == sum(p.numel() for p in bert.parameters())
    assert delta_model.num_trainable_parameters(bert) == sum(p.numel() for p in bert.parameters() if p.requires_grad)
    wanted = {id(p) for p in delta_model.deltas.parameters()}
    assert {id(p) for p in delta_model.trainable_parameters()} == wanted
    torch.optim.SGD(delta_model.trainable_parameters(), lr=0.1)  # what 0.3.2 scripts hand an optimizer


# ------------------------------------------------------------------------------------------------- addressing
def test_find_key_follows_name_based_addressing(bert):
    delta_model = LoraModel(bert, modified_modules=["query"], exclude_modules=["layer.1"])
    assert delta_model.find_key("encoder.layer.0.attention.self.query", ["query"])
    assert delta_model.find_key("encoder.layer.0.attention.self.query", ["self.query", "key"])
    assert not delta_model.find_key("encoder.layer.0.attention.self.query", ["uery"])
    assert not delta_model.find_key("encoder.layer.1.attention.self.query", ["query"])  # excluded
    assert delta_model.find_key("encoder.layer.0.attention.self.query", [r"[r][0-9]\.attention\.self\.query"])


def test_find_key_matches_common_names_with_common_structure():
    model = tiny_model("bert", "BertModel")
    delta_model = LoraModel(model, modified_modules=["attn.q"], common_structure=True)
    assert delta_model.find_key("encoder.layer.0.attention.self.query", ["attn.q"])
    assert not delta_model.find_key("encoder.layer.0.attention.self.key", ["attn.q"])
    with_defaults = LoraModel(tiny_model("bert", "BertModel"))  # the defaults are common names, as in 0.3.2
    assert with_defaults.find_key("encoder.layer.1.attention.self.value", ["attn.v"])
    assert not with_defaults.find_key("encoder.layer.1.attention.self.value", ["attn.q"])


def test_find_module_returns_parent_child_name_and_module(bert):
    delta_model = LoraModel(bert, modified_modules=["query"])
    parent, name, module = delta_model.find_module(bert, "encoder.layer.0.attention.self.query")
    assert parent is bert.encoder.layer[0].attention.self and name == "query" and module is parent.query


def test_create_config_from_model_gives_the_config_the_model_was_built_with(bert):
    delta_model = LoraModel(bert, lora_r=3, modified_modules=["query"])
    config = delta_model.create_config_from_model()
    assert config is delta_model.config and config.lora_r == 3 and config.modified_modules == ["query"]
    assert config.backbone_class == "BertModel"


def test_mark_as_delta_marks_this_models_deltas_and_refuses_backbone_modules(bert):
    delta_model = AdapterModel(bert, modified_modules=["output.dense"])
    for p in delta_model.deltas.parameters():
        del p._is_delta
    delta_model.mark_as_delta()
    assert all(getattr(p, "_is_delta", False) for p in delta_model.deltas.parameters())
    delta_model.mark_as_delta(delta_model.delta_modules[0])
    with pytest.raises(DeltaStateError, match="not part of"):
        delta_model.mark_as_delta(bert.pooler)


def test_set_active_state_dict_keeps_only_trainable_parameters(bert):
    delta_model = LoraModel(bert, modified_modules=["query"])
    for p in bert.parameters():
        p.requires_grad = False
    for p in delta_model.deltas.parameters():
        p.requires_grad = True
    delta_model.set_active_state_dict()
    assert bert.state_dict() and all(".lora." in k for k in bert.state_dict())


# ---------------------------------------------------------------------------------------------- positionals
def test_positional_hyper_parameters_follow_the_manuals_order(bert):
    assert LoraModel(bert, 4, modified_modules=["query"]).lora_r == 4
    second = LoraModel(tiny_model("bert", "BertModel"), 4, 8, 0.0, ["query"])
    assert (second.lora_r, second.lora_alpha, second.modified_modules) == (4, 8, ["query"])
    assert BitFitModel(tiny_model("bert", "BertModel"), ["attention"]).modified_modules == ["attention"]
    compacter = CompacterModel(tiny_model("bert", "BertModel"), ["output.dense"], None, None, None, False, "hf", 8)
    assert compacter.modified_modules == ["output.dense"] and compacter.reduction_factor == 8
    assert AdapterModel(tiny_model("bert", "BertModel"), 12, "relu", ["output.dense"]).bottleneck_dim == 12


@pytest.mark.parametrize("cls", list(MANUAL_ORDER), ids=lambda c: c.__name__)
def test_the_signature_shows_the_order_the_constructor_binds(cls):
    params = list(inspect.signature(cls).parameters.values())
    assert params[0].name == "backbone_model"
    order = MANUAL_ORDER[cls]
    assert [p.name for p in params[1 : 1 + len(order)]] == order
    assert all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params[: 1 + len(order)])
    keyword_only = [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]
    assert "backbone_hash" in keyword_only
    assert set(cls.config_class.field_names()) <= {p.name for p in params}


def test_too_many_positionals_and_a_value_given_twice_are_refused(bert):
    with pytest.raises(TypeError, match="at most 9 positional"):
        LoraModel(bert, *([None] * 10))
    with pytest.raises(TypeError, match="multiple values for argument 'lora_r'"):
        LoraModel(bert, 4, lora_r=8, modified_modules=["query"])
    assert not any("lora" in n for n, _ in bert.named_modules())


@dataclass(kw_only=True)
class _ScaleConfig(DeltaConfig):
    delta_type: ClassVar[str] = "compat_scale"
    gain: float = 2.0


class _Scale(nn.Module):
    def __init__(self, gain: float):
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(gain))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden * self.gain


class _ScaleModel(DeltaModel):
    config_class = _ScaleConfig
    delta_type = "compat_scale"
    identity_at_init = False

    def _build_delta(self, target: Target) -> nn.Module:
        return _Scale(self.config.gain)


def test_without_a_declared_order_the_positionals_follow_the_config_fields(bert):
    names = list(inspect.signature(_ScaleModel).parameters)
    fields = ["modified_modules", "exclude_modules", "unfrozen_modules", "common_structure", "gain"]
    assert names[:6] == ["backbone_model", *fields]
    delta_model = _ScaleModel(bert, ["query"], None, ["deltas"], None, 3.0)
    assert delta_model.gain == 3.0 and delta_model.modified_modules == ["query"]


def test_a_declared_order_naming_an_unknown_field_is_refused_when_the_class_is_defined():
    with pytest.raises(DeltaConfigError, match="gian"):

        class _Typo(_ScaleModel):
            positional_args = ("gian",)
