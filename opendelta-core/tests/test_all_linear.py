"""``modified_modules="all-linear"``: every linear layer inside the blocks, never a head, mapped or not."""

import pytest
import torch
from torch import nn
from toy_method import ToyConfig

from opendelta import ModuleNotFoundInStructureError
from opendelta.targets import resolve_targets
from opendelta.testing import tiny_model


def _all_linear(model, **kwargs):
    return [t.name for t in resolve_targets(model, "all-linear", kwargs.get("exclude"), (), None, "Test")]


def test_a_llama_gets_every_projection_of_every_block_and_not_the_lm_head():
    names = _all_linear(tiny_model("llama", "LlamaForCausalLM"))
    projections = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    expected = {f"model.layers.{i}.{'self_attn' if p[0] in 'qkvo' else 'mlp'}.{p}" for i in (0, 1) for p in projections}
    assert set(names) == expected and len(names) == len(expected)


def test_bert_keeps_its_pooler_and_classifier_out():
    """PEFT's "all-linear" takes the pooler (and the classifier unless task_type is SEQ_CLS); the blocks are what
    a delta is for."""
    names = _all_linear(tiny_model("bert"))
    assert len(names) == 12 and all(n.startswith("bert.encoder.layer.") for n in names)


def test_gpt2_s_conv1d_layers_count_as_linear():
    names = _all_linear(tiny_model("gpt2", "GPT2LMHeadModel"))
    assert {n.rsplit(".", 1)[1] for n in names} == {"c_attn", "c_proj", "c_fc"} and len(names) == 8


class PlainTransformer(nn.Module):
    """No config, no mapping: the blocks are found as the ModuleList of one repeated class."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.layers = nn.ModuleList(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True) for _ in range(2))
        self.head = nn.Linear(8, 10)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(ids)
        for layer in self.layers:
            hidden = layer(hidden)
        return self.head(hidden)


def test_an_unmapped_plain_module_uses_its_repeated_layers():
    names = _all_linear(PlainTransformer())
    assert names == [f"layers.{i}.{n}" for i in (0, 1) for n in ("self_attn.out_proj", "linear1", "linear2")]


def test_exclusions_apply_and_excluding_everything_is_an_error():
    model = tiny_model("llama", "LlamaForCausalLM")
    kept = _all_linear(model, exclude=["mlp"])
    assert kept and not any(".mlp." in n for n in kept)
    with pytest.raises(ModuleNotFoundInStructureError, match="excluded all of them"):
        _all_linear(model, exclude=["layers"])


def test_a_model_without_blocks_is_refused_by_name():
    with pytest.raises(ModuleNotFoundInStructureError, match="found no repeated blocks in Sequential"):
        _all_linear(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)))


def test_the_keyword_attaches_saves_and_reloads(toy, tmp_path):
    model = tiny_model("llama", "LlamaForCausalLM")
    delta_model = toy(model, modified_modules="ALL-LINEAR")
    assert delta_model.config.modified_modules == ["all-linear"]  # PEFT's string, kept as a one-entry list
    assert len(delta_model.targets) == 14
    delta_model.freeze_module()
    delta_model.save_finetuned(tmp_path / "ckpt")
    again = toy.from_finetuned(tmp_path / "ckpt", tiny_model("llama", "LlamaForCausalLM"))
    assert [t.name for t in again.targets] == [t.name for t in delta_model.targets]
    assert ToyConfig(modified_modules="all-linear").modified_modules == ["all-linear"]
