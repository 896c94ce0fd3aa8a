import json
import re
from pathlib import Path

import pytest
import torch
from jsonschema import Draft202012Validator
from transformers import AutoConfig, DistilBertModel

import opendelta
from opendelta.errors import StructureNotFoundError, StructureValidationError
from opendelta.registry import reload, structure_for_model
from opendelta.structures import get_schema, validate_structure
from opendelta.testing import tiny_model

INVALID = Path(__file__).resolve().parents[2] / "tests" / "data" / "invalid_structures"


def test_schema_is_a_valid_draft_2020_12_schema():
    Draft202012Validator.check_schema(get_schema())


@pytest.mark.parametrize("path", sorted(INVALID.glob("*.json")), ids=lambda p: p.stem)
def test_invalid_documents_are_refused(path):
    with pytest.raises(StructureValidationError, match=re.escape(path.name)):
        validate_structure(json.loads(path.read_text()), source=path.name)


def test_invalid_examples_exist():
    assert len(list(INVALID.glob("*.json"))) >= 4


class Wrapper(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner


@pytest.mark.parametrize(
    "build, prefix",
    [
        (lambda: tiny_model("bert", "BertModel"), ""),
        (lambda: tiny_model("bert", "BertForSequenceClassification"), "bert."),
        (lambda: Wrapper(tiny_model("bert", "BertForSequenceClassification")), "inner.bert."),
    ],
)
def test_bert_query_is_attn_q_on_derivatives_and_wrappers(build, prefix):
    model = build()
    names = structure_for_model(model).common_names(model)
    assert [c.name for c in names[f"{prefix}encoder.layer.0.attention.self.query"]] == ["encoder.block.0.attn.q"]


def test_gpt2_c_attn_has_three_fused_parts():
    model = tiny_model("gpt2")
    names = structure_for_model(model).common_names(model)["transformer.h.0.attn.c_attn"]
    assert [(c.name, c.part, c.num_parts) for c in names] == [
        ("decoder.block.0.attn.q", 0, 3),
        ("decoder.block.0.attn.k", 1, 3),
        ("decoder.block.0.attn.v", 2, 3),
    ]


def distilbert():
    config = AutoConfig.for_model("distilbert", dim=32, hidden_dim=37, n_layers=2, n_heads=4, vocab_size=99)
    return DistilBertModel(config)


DISTILBERT = {
    "schema_version": 1,
    "model_type": "distilbert",
    "architectures": ["DistilBertModel"],
    "tree": {
        "children": {
            "transformer": {
                "name": "encoder",
                "children": {
                    "layer": {
                        "name": "block",
                        "children": {
                            "$": {
                                "name": "$",
                                "children": {
                                    "attention": {
                                        "name": "attn",
                                        "children": {
                                            "q_lin": {"name": "q"},
                                            "v_lin": {"name": "v"},
                                            "out_lin": {"name": "proj"},
                                        },
                                    },
                                    "ffn": {"name": "ff", "children": {"lin1": {"name": "w1"}, "lin2": {"name": "w2"}}},
                                },
                            }
                        },
                    }
                },
            }
        }
    },
}


class Resolver:
    @opendelta.hookimpl
    def resolve_common_structure(self, model, model_type):
        return DISTILBERT if model_type == "distilbert" else None


def test_unmapped_model_is_resolved_by_the_hook(toy):
    opendelta.plugins.pm.register(Resolver(), name="resolver")
    model = distilbert()
    delta_model = toy(model)
    assert [t.name for t in delta_model.targets][:2] == [
        "transformer.layer.0.attention.out_lin",
        "transformer.layer.0.ffn.lin2",
    ]


def test_unmapped_model_without_resolver_says_to_pass_modified_modules(no_inference, toy):
    reload()
    with pytest.raises(StructureNotFoundError, match="modified_modules"):
        structure_for_model(distilbert())
