"""Issue 14, point 6: the pseudo forward pass that sizes deltas (manual 1.14.3, FAQ 3) on 0.3.2-style backbones.

A user's ``nn.Module`` wrapper holding transformers models in eval mode keeps every module's mode; a wrapper
whose forward cannot run (or that has none, like the original's ``Mymodel(a, b)``) is sized through each
transformers model's own ``dummy_inputs``; inputs for the pass are given as a constructor argument (transformers'
``dummy_inputs`` is a read-only property, so the FAQ's ``setattr`` cannot work there) or, on a plain module, as the
attribute.
"""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from torch import nn

from opendelta import (
    AdapterModel,
    AutoDeltaConfig,
    AutoDeltaModel,
    CompacterModel,
    LowRankAdapterModel,
    ParallelAdapterModel,
)
from opendelta.errors import DeltaConfigError, ShapeInferenceError
from opendelta.testing.tiny_models import HIDDEN_SIZE, tiny_inputs, tiny_model

# the methods that size their deltas by a pseudo pass, on BERT modules whose type does not tell their sizes
PROBING = [
    pytest.param(AdapterModel, ["output"], id="adapter"),
    pytest.param(LowRankAdapterModel, ["output"], id="low_rank_adapter"),
    pytest.param(CompacterModel, ["output"], id="compacter"),
    pytest.param(ParallelAdapterModel, ["attention"], id="parallel_adapter"),
]


class BertWrapper(nn.Module):
    """A user's wrapper: a task head over a transformers encoder, called with ``input_ids``."""

    def __init__(self) -> None:
        super().__init__()
        self.bert = tiny_model("bert", "BertModel")
        self.head = nn.Linear(HIDDEN_SIZE, 2)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.bert(input_ids=input_ids).last_hidden_state)


class T5Wrapper(nn.Module):
    """A wrapped encoder-decoder whose forward takes what T5 cannot be called with alone."""

    def __init__(self) -> None:
        super().__init__()
        self.t5 = tiny_model("t5", "T5Model")

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.t5(**batch).last_hidden_state


class Mymodel(nn.Module):
    """The original's unittest wrapper of two models, with no forward at all."""

    def __init__(self, a: nn.Module, b: nn.Module) -> None:
        super().__init__()
        self.a = a
        self.b = b


class Block(nn.Module):
    """A block whose type does not tell its sizes, so a delta on it needs the pseudo pass."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(HIDDEN_SIZE, HIDDEN_SIZE)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.proj(hidden))


class KeywordOnlyNet(nn.Module):
    """A plain model called as ``model(input_ids=...)`` only: positional token ids fail, and it has no dummy_inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, HIDDEN_SIZE)
        self.block = Block()

    def forward(self, *, input_ids: torch.Tensor) -> torch.Tensor:
        return self.block(self.embed(input_ids))


class FeatureNet(nn.Module):
    """A plain model over float features: the token ids the pass falls back to cannot run it."""

    def __init__(self) -> None:
        super().__init__()
        self.block = Block()

    def forward(self, features: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return self.block(features) * scale


def modes(model: nn.Module) -> dict[str, bool]:
    return {name: module.training for name, module in model.named_modules()}


def adapter_widths(model: nn.Module) -> set[int]:
    """The hidden size each adapter was built for (its down projection's input width)."""
    return {m.in_features for n, m in model.named_modules() if n.endswith("adapter.modulelist.down_proj")}


# ------------------------------------------------------------------------------ 1. train/eval mode restored
@pytest.mark.parametrize("method, modules", PROBING)
def test_probing_leaves_an_eval_model_inside_a_train_wrapper_in_eval(method, modules):
    wrapper = BertWrapper()  # train mode, as a freshly built nn.Module is
    wrapper.bert.eval()
    before = modes(wrapper)
    method(wrapper, modified_modules=modules)
    assert wrapper.training and not wrapper.bert.training
    assert {n: t for n, t in modes(wrapper).items() if n in before} == before


def test_probing_restores_every_module_of_a_mixed_tree():
    wrapper = BertWrapper()
    wrapper.bert.eval()
    wrapper.bert.encoder.layer[0].train()  # root train, child eval, grandchild train, its dropouts eval
    wrapper.bert.encoder.layer[0].attention.self.dropout.eval()
    before = modes(wrapper)
    AdapterModel(wrapper, modified_modules=["output"])
    assert {n: t for n, t in modes(wrapper).items() if n in before} == before


def test_each_new_adapter_follows_the_mode_of_the_module_it_is_on():
    wrapper = BertWrapper()
    wrapper.bert.eval()
    wrapper.bert.encoder.layer[1].train()
    AdapterModel(wrapper, modified_modules=["output"])
    layers = wrapper.bert.encoder.layer
    assert not layers[0].output.adapter.training and layers[1].output.adapter.training


# ------------------------------------------------------------------------------ 2. wrapped models probed
def test_an_adapter_on_a_wrapped_t5_is_sized_from_t5s_own_dummy_inputs():
    wrapper = T5Wrapper().eval()
    delta_model = AdapterModel(wrapper, modified_modules=["DenseReluDense"], bottleneck_dim=4)
    assert len(delta_model.deltas) == 2 * len(wrapper.t5.encoder.block)  # encoder and decoder feed-forwards
    assert adapter_widths(wrapper) == {HIDDEN_SIZE}
    with torch.no_grad():
        out = wrapper(tiny_inputs("t5"))
    assert out.shape[-1] == HIDDEN_SIZE and torch.isfinite(out).all()


def test_a_wrapper_of_two_models_without_forward_is_sized_model_by_model():
    bert, t5 = tiny_model("bert", "BertModel"), tiny_model("t5", "T5Model")
    model = Mymodel(bert, t5)
    config = AutoDeltaConfig.from_dict(
        {"delta_type": "adapter", "modified_modules": ["a.encoder.layer.0.output", "b.encoder.block.0.layer.1"]}
    )
    delta_model = AutoDeltaModel.from_config(config, backbone_model=model)
    assert len(delta_model.deltas) == 2
    assert adapter_widths(model) == {HIDDEN_SIZE}
    with torch.no_grad():
        bert(**tiny_inputs("bert"))
        t5(**tiny_inputs("t5"))


def test_the_wrapper_of_two_models_keeps_their_modes_too():
    bert, t5 = tiny_model("bert", "BertModel"), tiny_model("t5", "T5Model").train()
    model = Mymodel(bert, t5)
    before = modes(model)
    ParallelAdapterModel(model, modified_modules=["a.encoder.layer.0.attention", "b.encoder.block.0.layer.0"])
    assert {n: t for n, t in modes(model).items() if n in before} == before


# ------------------------------------------------------------------------------ 3. inputs for the pass
def test_the_error_advises_a_constructor_argument_that_runs():
    with pytest.raises(ShapeInferenceError) as caught:
        AdapterModel(KeywordOnlyNet(), modified_modules=["block"])
    message = str(caught.value)
    assert "setattr" not in message  # a read-only property on every transformers model
    advice = re.search(r"AdapterModel\(backbone_model, \.\.\., dummy_inputs=(\{[^}]*\})\)", message)
    assert advice, message
    dummy_inputs = eval(advice.group(1), {"torch": torch})  # the example exactly as the message writes it
    model = KeywordOnlyNet()
    AdapterModel(model, modified_modules=["block"], dummy_inputs=dummy_inputs)
    assert adapter_widths(model) == {HIDDEN_SIZE}


def test_the_faqs_setattr_fails_on_transformers_models_and_the_argument_works_instead():
    model = tiny_model("bert", "BertModel")
    with pytest.raises(AttributeError):
        model.dummy_inputs = {"input_ids": torch.tensor([[1, 2, 3]])}
    AdapterModel(model, modified_modules=["output"], dummy_inputs={"input_ids": torch.tensor([[1, 2, 3]])})
    assert adapter_widths(model) == {HIDDEN_SIZE}


@pytest.mark.parametrize(
    "dummy_inputs",
    [
        pytest.param(torch.zeros(1, 3, HIDDEN_SIZE), id="tensor"),
        pytest.param((torch.zeros(1, 3, HIDDEN_SIZE), 2.0), id="tuple"),
        pytest.param({"features": torch.zeros(1, 3, HIDDEN_SIZE)}, id="dict"),
    ],
)
def test_dummy_inputs_as_a_tensor_a_tuple_or_keyword_arguments(dummy_inputs):
    model = FeatureNet()
    LowRankAdapterModel(model, modified_modules=["block"], dummy_inputs=dummy_inputs)
    assert model.block.low_rank_adapter is not None


def test_positional_dummy_inputs_set_as_the_attribute_of_a_plain_module_are_honoured():
    model = FeatureNet()
    model.dummy_inputs = (torch.zeros(1, 3, HIDDEN_SIZE),)
    AdapterModel(model, modified_modules=["block"])
    assert adapter_widths(model) == {HIDDEN_SIZE}


def test_dummy_inputs_the_forward_refuses_are_reported_with_the_reason():
    with pytest.raises(ShapeInferenceError, match=r"unexpected keyword argument 'ids'.*dummy_inputs="):
        AdapterModel(KeywordOnlyNet(), modified_modules=["block"], dummy_inputs={"ids": torch.tensor([[1, 2]])})


def test_dummy_inputs_of_another_kind_are_refused_naming_the_forms():
    with pytest.raises(DeltaConfigError, match="dummy_inputs must be a dict of keyword arguments"):
        AdapterModel(FeatureNet(), modified_modules=["block"], dummy_inputs="input_ids")


def test_dummy_inputs_pass_through_from_config_and_from_finetuned_and_are_never_saved(tmp_path):
    inputs = {"input_ids": torch.tensor([[4, 5, 6]])}
    config = {"delta_type": "adapter", "modified_modules": ["block"], "bottleneck_dim": 4}
    backbone = KeywordOnlyNet()
    AdapterModel.from_config(config, copy.deepcopy(backbone), dummy_inputs=inputs)
    trained = copy.deepcopy(backbone)
    delta_model = AutoDeltaModel.from_config(AutoDeltaConfig.from_dict(config), trained, dummy_inputs=inputs)
    delta_model.freeze_module()
    saved = delta_model.save_finetuned(tmp_path / "ckpt")
    assert "dummy_inputs" not in json.loads((saved / "config.json").read_text())
    for loader in (AdapterModel, AutoDeltaModel):
        model = copy.deepcopy(backbone)
        with pytest.raises(ShapeInferenceError):
            loader.from_finetuned(saved, model)
        loader.from_finetuned(saved, model, dummy_inputs=inputs)
        assert adapter_widths(model) == {HIDDEN_SIZE}
        assert torch.equal(
            model.block.adapter.modulelist.up_proj.weight, trained.block.adapter.modulelist.up_proj.weight
        )
