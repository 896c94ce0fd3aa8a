"""Issue 14, point 4: a delta method written in OpenDelta 0.3.2's style (manual section 1.20) works unchanged.

The method and its config below are written from the manual's documented API only: a ``BaseDeltaConfig`` subclass
whose ``__init__`` sets its own hyper-parameter, and a ``DeltaBase`` subclass with ``config_class``, ``delta_type``,
``default_modified_modules``, an ``__init__`` that calls ``DeltaBase.__init__`` and ``add_all_delta_to_backbone``, and
``update_module`` that finds its module with ``find_module`` and places a delta with ``insert_sequential_module``
(the delta speaks the manual's sequential protocol: its ``post_forward`` gets the module's whole output),
``insert_parallel_module`` or ``replace_module``.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from torch import nn

from opendelta import BaseDeltaConfig, DeltaBase, DeltaConfigError, DeltaStateError, LoraConfig, OpenDeltaConfigWarning
from opendelta.basemodel import DeltaBase as DeltaBaseFromModule
from opendelta.delta_configs import BaseDeltaConfig as BaseDeltaConfigFromModule
from opendelta.testing.tiny_models import model_output_tensor, tiny_inputs, tiny_model


class MyAdapterConfig(BaseDeltaConfig):
    """0.3.2 style: not a dataclass; the base handles the shared fields."""

    def __init__(self, bottleneck=4, scale=1.0, **kwargs):
        super().__init__(**kwargs)
        self.bottleneck = bottleneck
        self.scale = scale


class MyAdapterLayer(nn.Module):
    """A bottleneck adapter in the manual's sequential protocol: ``post_forward`` gets the whole output."""

    def __init__(self, dim: int, bottleneck: int, scale: float):
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        self.scale = scale
        nn.init.normal_(self.up.weight, std=0.5)  # not the identity at init, so that outputs change visibly

    def post_forward(self, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden + self.scale * self.up(torch.relu(self.down(hidden)))
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


class MyAdapterModel(DeltaBase):
    config_class = MyAdapterConfig
    delta_type = "my_adapter"
    default_modified_modules = ["attn@.v@"]

    def __init__(
        self,
        backbone_model,
        bottleneck=4,
        scale=1.0,
        modified_modules=None,
        exclude_modules=None,
        unfrozen_modules=None,
        common_structure=None,
        interactive_modify=False,
    ):
        DeltaBase.__init__(
            self,
            backbone_model,
            modified_modules=modified_modules,
            exclude_modules=exclude_modules,
            unfrozen_modules=unfrozen_modules,
            common_structure=common_structure,
            interactive_modify=interactive_modify,
        )
        self.bottleneck = bottleneck
        self.scale = scale
        self.delta_modules = nn.ModuleList()
        self.add_all_delta_to_backbone(self.backbone_model, self.modified_modules)

    def update_module(self, module, key):
        _, _, ref = self.find_module(module, key)
        dim = ref.weight.shape[0] if isinstance(ref, nn.Linear) else ref.weight.shape[1]  # GPT-2's Conv1D: (in, out)
        adapter = MyAdapterLayer(dim, self.bottleneck, self.scale)
        self.delta_modules.append(adapter)
        self.insert_sequential_module(ref, delta_module=adapter, delta_name="my_adapter")


class LowRankBranch(nn.Module):
    def __init__(self, in_features: int, out_features: int, rank: int):
        super().__init__()
        self.a = nn.Parameter(torch.randn(rank, in_features) * 0.5)
        self.b = nn.Parameter(torch.randn(out_features, rank) * 0.5)

    def forward(self, x):
        return x @ self.a.T @ self.b.T


@dataclass(kw_only=True)
class MyParallelConfig(BaseDeltaConfig):
    """A config written as ours are (a dataclass): BaseDeltaConfig accepts both styles."""

    delta_type: ClassVar[str] = "my_parallel"
    lora_r: int = 2


class MyParallelModel(DeltaBase):
    config_class = MyParallelConfig
    delta_type = "my_parallel"

    def __init__(self, backbone_model, lora_r=2, modified_modules=None):
        DeltaBase.__init__(self, backbone_model, modified_modules=modified_modules)
        self.lora_r = lora_r
        self.add_all_delta_to_backbone(self.backbone_model, self.modified_modules)

    def update_module(self, module, key):
        _, _, ref = self.find_module(module, key)
        self.insert_parallel_module(ref, delta_module=LowRankBranch(ref.in_features, ref.out_features, self.lora_r))


class ScaledLinear(nn.Module):
    """A replacement that wraps the original linear layer."""

    def __init__(self, original: nn.Linear):
        super().__init__()
        self.original = original
        self.gain = nn.Parameter(torch.full((original.out_features,), 1.5))

    def forward(self, x):
        return self.original(x) * self.gain


class MyReplaceModel(DeltaBase):
    config_class = MyAdapterConfig
    delta_type = "my_replace"

    def __init__(self, backbone_model, modified_modules=None):
        DeltaBase.__init__(self, backbone_model, modified_modules=modified_modules)
        self.delta_modules = nn.ModuleList()
        self.add_all_delta_to_backbone(self.backbone_model, self.modified_modules)

    def update_module(self, module, key):
        parent, child_name, ref = self.find_module(module, key)
        self.replace_module(parent, child_name, ref, ScaledLinear(ref), delta_name="scaled")


def _run(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model_output_tensor(model(**inputs)).clone()


BACKBONES = [("bert", "BertModel", ["attention.output.dense"]), ("gpt2", "GPT2Model", ["mlp.c_proj"])]


def test_the_032_names_are_importable_from_their_032_modules():
    assert DeltaBaseFromModule is DeltaBase and BaseDeltaConfigFromModule is BaseDeltaConfig
    assert isinstance(LoraConfig(), BaseDeltaConfig) and isinstance(MyAdapterConfig(), BaseDeltaConfig)


def test_a_032_style_config_keeps_its_own_hyper_parameters():
    config = MyAdapterConfig(bottleneck=6, modified_modules=["output.dense"])
    assert config.to_dict()["bottleneck"] == 6 and config.to_dict()["modified_modules"] == ["output.dense"]
    again = MyAdapterConfig.from_dict(config.to_dict())
    assert again == config and again.bottleneck == 6 and again != MyAdapterConfig(bottleneck=7)
    assert MyAdapterConfig.defaults()["bottleneck"] == 4 and "scale" in MyAdapterConfig.field_names()
    with pytest.raises(DeltaConfigError, match="bottlenek"):  # a keyword typed in code is a typo
        MyAdapterConfig.from_dict({}, bottlenek=3)
    with pytest.warns(OpenDeltaConfigWarning, match="bottlenek"):  # a namespace's other keys are dropped, as in 0.3.2
        assert MyAdapterConfig.from_dict({"bottlenek": 3}) == MyAdapterConfig()


@pytest.mark.parametrize(("arch", "head", "modules"), BACKBONES)
def test_a_032_style_method_runs_and_gets_freeze_log_detach_attach(arch, head, modules, capsys):
    model = tiny_model(arch, head)
    inputs = tiny_inputs(arch)
    bare = _run(model, inputs)
    delta_model = MyAdapterModel(model, bottleneck=3, modified_modules=modules)
    changed = _run(model, inputs)
    assert not torch.allclose(bare, changed)
    assert delta_model.bottleneck == 3 and delta_model.config.bottleneck == 3
    assert len(delta_model.delta_modules) == 2  # one per tiny layer, in the ModuleList the method keeps
    delta_model.freeze_module(exclude=["deltas"])
    trainable = delta_model.trainable_parameters_names()
    assert trainable and all(".my_adapter." in n for n in trainable)
    delta_model.log()
    assert "my_adapter" in capsys.readouterr().out
    delta_model.detach()
    torch.testing.assert_close(_run(model, inputs), bare, rtol=0, atol=0)
    delta_model.attach()
    torch.testing.assert_close(_run(model, inputs), changed, rtol=0, atol=0)
    with pytest.raises(DeltaStateError, match="folded into the weights"):
        delta_model.merge()


@pytest.mark.parametrize(("arch", "head", "modules"), BACKBONES)
def test_a_032_style_method_saves_and_loads_its_own_hyper_parameters(arch, head, modules, tmp_path):
    model = tiny_model(arch, head)
    inputs = tiny_inputs(arch)
    delta_model = MyAdapterModel(model, bottleneck=5, scale=0.5, modified_modules=modules)
    delta_model.freeze_module()
    with torch.no_grad():
        for p in delta_model.parameters():
            p.add_(0.1)  # "trained"
    expected = _run(model, inputs)
    delta_model.save_finetuned(tmp_path / "ckpt")
    saved = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert saved["delta_type"] == "my_adapter" and saved["bottleneck"] == 5 and saved["scale"] == 0.5
    assert saved["modified_modules"] == modules

    fresh = tiny_model(arch, head)
    loaded = MyAdapterModel.from_finetuned(tmp_path / "ckpt", fresh)
    assert type(loaded) is MyAdapterModel and loaded.bottleneck == 5 and loaded.scale == 0.5
    torch.testing.assert_close(_run(fresh, inputs), expected, rtol=0, atol=0)
    assert loaded.config.backbone_hash == saved["backbone_hash"]


def test_default_modified_modules_in_the_032_spelling_use_the_common_structure():
    model = tiny_model("bert", "BertModel")
    delta_model = MyAdapterModel(model)
    delta_model.freeze_module()
    hosts = sorted({name.rsplit(".my_adapter", 1)[0] for name in delta_model.trainable_parameters_names()})
    assert hosts == [f"encoder.layer.{i}.attention.self.value" for i in range(2)]
    assert delta_model.common_structure is True and delta_model.modified_modules == ["attn.v"]
    assert delta_model.exclude_modules == ["lm_head"] == delta_model.config.exclude_modules  # 0.3.2's default


def test_a_parallel_032_style_method_with_a_dataclass_config(tmp_path):
    model = tiny_model("bert", "BertModel")
    inputs = tiny_inputs("bert")
    bare = _run(model, inputs)
    delta_model = MyParallelModel(model, lora_r=3, modified_modules=["query"])
    changed = _run(model, inputs)
    assert not torch.allclose(bare, changed) and delta_model.config.lora_r == 3
    delta_model.freeze_module()
    delta_model.save_finetuned(tmp_path / "p")
    fresh = tiny_model("bert", "BertModel")
    MyParallelModel.from_finetuned(tmp_path / "p", fresh)
    torch.testing.assert_close(_run(fresh, inputs), changed, rtol=0, atol=0)


def test_a_replacing_032_style_method_keeps_the_wrapped_module_the_backbones(tmp_path):
    model = tiny_model("bert", "BertModel")
    inputs = tiny_inputs("bert")
    bare = _run(model, inputs)
    delta_model = MyReplaceModel(model, modified_modules=["attention.self.value"])
    changed = _run(model, inputs)
    assert not torch.allclose(bare, changed)
    assert len(delta_model.delta_modules) == 2  # 0.3.2's replace_module lists the replacement there
    delta_model.freeze_module()
    assert sorted(delta_model.trainable_parameters_names()) == [
        f"encoder.layer.{i}.attention.self.value.gain" for i in range(2)
    ]
    delta_model.detach()
    torch.testing.assert_close(_run(model, inputs), bare, rtol=0, atol=0)
    delta_model.attach()
    delta_model.save_finetuned(tmp_path / "r")
    fresh = tiny_model("bert", "BertModel")
    MyReplaceModel.from_finetuned(tmp_path / "r", fresh)
    torch.testing.assert_close(_run(fresh, inputs), changed, rtol=0, atol=0)


def test_a_method_whose_config_is_for_another_delta_type_is_refused_when_defined():
    with pytest.raises(DeltaConfigError, match="'lora'"):

        class Mismatched(MyParallelModel):
            config_class = LoraConfig


class InputScale(nn.Module):
    """The manual's other sequential hook: ``pre_forward`` gets the module's call and returns ``(args, kwargs)``."""

    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(3.0))

    def pre_forward(self, hidden, *args, **kwargs):
        return (hidden * self.gain, *args), kwargs


class PlainScale(nn.Module):
    """Neither hook: inserted sequentially, it runs on the output's hidden state."""

    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(0.5))

    def forward(self, hidden):
        return hidden * self.gain


class MyHooksModel(DeltaBase):
    config_class = MyAdapterConfig
    delta_type = "my_hooks"

    def __init__(self, backbone_model, modified_modules=None, method="sequential"):
        DeltaBase.__init__(self, backbone_model, modified_modules=modified_modules)
        self.method = method
        self.add_all_delta_to_backbone(self.backbone_model, self.modified_modules)

    def update_module(self, module, key):
        _, _, ref = self.find_module(module, key)
        delta = PlainScale() if self.method == "plain" else InputScale()
        self.insert_module(ref, method="sequential" if self.method == "plain" else self.method, delta_module=delta)


@pytest.mark.parametrize("method", ["sequential", "before", "plain"])
def test_pre_forward_and_plain_sequential_deltas_change_what_the_module_computes(method):
    model = tiny_model("bert", "BertModel")
    dense = model.encoder.layer[0].output.dense
    x = torch.randn(2, 3, dense.in_features)
    with torch.no_grad():
        bare = dense(x)
        delta_model = MyHooksModel(model, modified_modules=["0.output.dense"], method=method)
        expected = bare * 0.5 if method == "plain" else nn.functional.linear(3 * x, dense.weight, dense.bias)
        torch.testing.assert_close(dense(x), expected)
    delta_model.detach()
    with torch.no_grad():
        torch.testing.assert_close(dense(x), bare, rtol=0, atol=0)


def test_insert_module_refuses_an_unknown_method_and_an_after_delta_without_post_forward():
    with pytest.raises(DeltaConfigError, match="sideways"):
        MyHooksModel(tiny_model("bert", "BertModel"), modified_modules=["output.dense"], method="sideways")
    with pytest.raises(DeltaConfigError, match="post_forward"):
        MyHooksModel(tiny_model("bert", "BertModel"), modified_modules=["output.dense"], method="after")


def test_a_delta_without_parameters_yet_is_refused_with_the_way_to_create_them():
    class Lazy(nn.Module):
        def post_forward(self, output):
            return output

    class LazyModel(MyHooksModel):
        def update_module(self, module, key):
            self.insert_sequential_module(self.find_module(module, key)[2], delta_module=Lazy())

    model = tiny_model("bert", "BertModel")
    with pytest.raises(DeltaConfigError, match=r"self\.features\(ref\)"):
        LazyModel(model, modified_modules=["output.dense"])
    assert not any(hasattr(m, "_opendelta_slots") for m in model.modules())


def test_an_update_module_that_fails_leaves_the_backbone_bare():
    class Failing(MyAdapterModel):
        def update_module(self, module, key):
            if key.startswith("encoder.layer.1"):
                raise RuntimeError("boom")
            super().update_module(module, key)

    model = tiny_model("bert", "BertModel")
    inputs = tiny_inputs("bert")
    bare = _run(model, inputs)
    with pytest.raises(RuntimeError, match="boom"):
        Failing(model, modified_modules=["output.dense"])
    torch.testing.assert_close(_run(model, inputs), bare, rtol=0, atol=0)
    assert not any("my_adapter" in n for n, _ in model.named_modules())


def test_a_deep_copy_of_the_backbone_runs_its_own_032_style_deltas():
    model = tiny_model("bert", "BertModel")
    inputs = tiny_inputs("bert")
    MyAdapterModel(model, modified_modules=["attention.output.dense"])
    copied = copy.deepcopy(model)
    torch.testing.assert_close(_run(copied, inputs), _run(model, inputs), rtol=0, atol=0)
    with torch.no_grad():
        copied.encoder.layer[0].attention.output.dense.my_adapter.up.weight.zero_()
    assert not torch.allclose(_run(copied, inputs), _run(model, inputs))


def test_hyper_parameters_are_read_only_once_built():
    delta_model = MyAdapterModel(tiny_model("bert", "BertModel"), modified_modules=["output.dense"])
    with pytest.raises(DeltaStateError, match="bottleneck"):
        delta_model.bottleneck = 9
    delta_model.unfrozen_modules = ["deltas", "pooler"]
    delta_model.freeze_module()
    assert any(n.startswith("pooler.") for n in delta_model.trainable_parameters_names())
