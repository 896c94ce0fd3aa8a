"""Core's mapping inference: a model no mapping covers gets one from its module tree, logged, or a clear refusal."""

import logging

import pytest
import torch
import transformers
from torch import nn

from opendelta import StructureNotFoundError
from opendelta.registry import reload, structure_for_model
from opendelta.structure_inference import infer_structure

TINY = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4}


def build(model_type: str, class_name: str, **kwargs) -> nn.Module:
    config = transformers.AutoConfig.for_model(model_type, vocab_size=99, pad_token_id=0, **kwargs)
    return getattr(transformers, class_name)(config)


def names_of(model: nn.Module) -> set[str]:
    structure = structure_for_model(model)
    return {c.name for names in structure.common_names(model).values() for c in names}


@pytest.mark.parametrize(
    "model_type, class_name, kwargs, expected",
    [
        # a BERT-like encoder: q/k/v under attention.self, the output dense under attention.output
        ("electra", "ElectraForSequenceClassification", {**TINY, "embedding_size": 32}, {"attn.q", "ff.w1", "ff.w2"}),
        # q_lin/out_lin/lin1/lin2 under attention/ffn
        (
            "distilbert",
            "DistilBertForSequenceClassification",
            {"dim": 32, "hidden_dim": 37, "n_layers": 2, "n_heads": 4},
            set(),
        ),
        # parallel attention and MLP, the attention output named dense
        ("phi", "PhiForCausalLM", TINY, {"attn.proj", "ff.w1", "ff.w2", "attn.layer_norm"}),
        # GQA, mlp.c_fc/c_proj
        ("starcoder2", "Starcoder2ForCausalLM", {**TINY, "num_key_value_heads": 2}, {"ff.w1", "ff.layer_norm"}),
    ],
)
def test_an_unmapped_transformers_model_gets_a_mapping_from_its_tree(model_type, class_name, kwargs, expected, caplog):
    model = build(model_type, class_name, **kwargs)
    with caplog.at_level(logging.WARNING, logger="opendelta.structure_inference"):
        names = names_of(model)
        names_of(model)  # a second lookup: no second log line
    side = "decoder" if class_name.endswith("CausalLM") else "encoder"
    for role in {"attn.q", "attn.k", "attn.v", "attn.proj", "ff.w1", "ff.w2"} | expected:
        assert {f"{side}.block.0.{role}", f"{side}.block.1.{role}"} <= names, role
    assert "embeddings" in names and ("lm_head.proj" in names) == class_name.endswith("CausalLM")
    logged = [r.getMessage() for r in caplog.records if "inferred a common structure" in r.getMessage()]
    assert len(logged) == 1 and class_name in logged[0] and f"{side}.block = " in logged[0]


def test_a_gated_feed_forward_is_inferred_with_its_aliases():
    model = build("stablelm", "StableLmForCausalLM", **TINY, num_key_value_heads=2)
    structure = structure_for_model(model)
    names = structure.common_names(model)
    assert {c.name for c in names["model.layers.0.mlp.up_proj"]} == {"decoder.block.0.ff.up", "decoder.block.0.ff.w1"}
    assert {c.name for c in names["model.layers.0.mlp.gate_proj"]} == {"decoder.block.0.ff.gate"}
    assert {c.name for c in names["model.norm"]} == {"decoder.layer_norm"}


def test_a_fused_qkv_is_left_unmapped_and_said_so(caplog):
    """BLOOM's query_key_value interleaves heads (as GPT-NeoX's, which is mapped): three equal parts would be wrong."""
    model = build("bloom", "BloomForCausalLM", **TINY)
    with caplog.at_level(logging.WARNING, logger="opendelta.structure_inference"):
        names = names_of(model)
    assert "decoder.block.0.ff.w2" in names and not any(n.endswith("attn.q") for n in names)
    assert "attention.query_key_value (a fused q/k/v projection, not split)" in caplog.text


class Attention(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(width, width) for _ in range(4))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q_proj(hidden), self.k_proj(hidden), self.v_proj(hidden)
        return self.o_proj(torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v)


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm1, self.attn, self.norm2 = nn.LayerNorm(width), Attention(width), nn.LayerNorm(width)
        self.fc1, self.fc2 = nn.Linear(width, 3 * width), nn.Linear(3 * width, width)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden + self.attn(self.norm1(hidden))
        return hidden + self.fc2(torch.relu(self.fc1(self.norm2(hidden))))


class PlainTransformer(nn.Module):
    """A user's own transformer: no config, no transformers class."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(3))
        self.head = nn.Linear(width, 10)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(ids)
        for block in self.blocks:
            hidden = block(hidden)
        return self.head(hidden)


def test_a_plain_module_transformer_is_inferred_and_a_method_attaches(toy):
    model = PlainTransformer()
    names = structure_for_model(model).common_names(model)
    assert {c.name for c in names["blocks.2.attn.o_proj"]} == {"encoder.block.2.attn.proj"}
    assert {c.name for c in names["blocks.0.fc1"]} == {"encoder.block.0.ff.w1"}
    assert {c.name for c in names["blocks.0.norm2"]} == {"encoder.block.0.ff.layer_norm"}
    delta_model = toy(model)  # the toy's defaults: attn.proj and ff.w2, as the adapters'
    assert [t.name for t in delta_model.targets] == [
        f"blocks.{i}.{p}" for i in range(3) for p in ("attn.o_proj", "fc2")
    ]
    assert model(torch.tensor([[1, 2, 3]])).shape == (1, 3, 10)


def test_two_modules_claiming_one_role_refuse_the_model_naming_both():
    class TwoQueries(Block):
        def __init__(self, width: int) -> None:
            super().__init__(width)
            self.attn2 = Attention(width)

    model = PlainTransformer()
    model.blocks = nn.ModuleList(TwoQueries(8) for _ in range(2))
    with pytest.raises(StructureNotFoundError, match=r"attn\.q_proj, attn2\.q_proj all look like attn\.q") as caught:
        structure_for_model(model)
    assert "no common-structure mapping for PlainTransformer" in str(caught.value)  # and the usual way forward
    assert "modified_modules=[...]" in str(caught.value)


def test_unrelated_layer_stacks_are_ambiguous():
    model = PlainTransformer()
    model.other = nn.ModuleList(Block(8) for _ in range(2))
    with pytest.raises(
        StructureNotFoundError, match=r"several layer stacks \(blocks \(3 x Block\), other \(2 x Block\)\)"
    ):
        infer_structure(model)


def test_a_model_with_nothing_to_infer_says_so():
    with pytest.raises(StructureNotFoundError, match=r"Sequential: it has no nn\.ModuleList of layers"):
        structure_for_model(nn.Sequential(nn.Linear(4, 4)))


def test_inference_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("OPENDELTA_DISABLE_PLUGINS", "structure_inference")
    reload()
    try:
        with pytest.raises(StructureNotFoundError, match=r"model_type='phi'") as caught:
            structure_for_model(build("phi", "PhiForCausalLM", **TINY))
        assert "cannot infer" not in str(caught.value)
    finally:
        monkeypatch.delenv("OPENDELTA_DISABLE_PLUGINS")
        reload()
