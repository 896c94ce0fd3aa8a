"""A mapping node's ``other_paths``: one document for an architecture whose module names differ between releases of
its code (Mixtral's MoE block is ``mlp`` in transformers 5 and ``block_sparse_moe`` in 4.57)."""

from __future__ import annotations

import pytest
from torch import nn

from opendelta.errors import StructureValidationError
from opendelta.structures import CommonStructure


class Block(nn.Module):
    def __init__(self, ff_name: str) -> None:
        super().__init__()
        self.attn = nn.Linear(4, 4)
        self.add_module(ff_name, nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 4)))


class Stack(nn.Module):
    def __init__(self, ff_name: str) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block(ff_name), Block(ff_name)])


def _document(**ff_extra: object) -> dict:
    ff = {"name": "ff", **ff_extra, "children": {"0": {"name": "w1"}, "1": {"name": "w2"}}}
    block = {"name": "$", "children": {"attn": {"name": "attn"}, "mlp": ff}}
    return {
        "schema_version": 1,
        "model_type": "toy_moe",
        "architectures": ["Stack"],
        "tree": {"children": {"layers": {"name": "decoder.block", "children": {"$": block}}}},
    }


@pytest.mark.parametrize("ff_name", ["mlp", "block_sparse_moe"])
def test_either_name_gets_the_same_common_names(ff_name):
    structure = CommonStructure(_document(other_paths=["block_sparse_moe"]))
    names = structure.common_names(Stack(ff_name))
    assert [c.name for c in names[f"layers.1.{ff_name}.1"]] == ["decoder.block.1.ff.w2"]
    assert structure.missing_paths(Stack(ff_name)) == ([], [])
    assert structure.unplaced_names(Stack(ff_name)) == {}


def test_a_model_with_neither_name_is_told_both():
    structure = CommonStructure(_document(other_paths=["block_sparse_moe"]))
    missing, _heads = structure.missing_paths(Stack("feed_forward"))
    assert missing == ["layers.0.mlp or block_sparse_moe", "layers.1.mlp or block_sparse_moe"]
    assert structure.unplaced_names(Stack("feed_forward"))["decoder.block.N.ff.w1"] == "mlp"


def test_without_other_paths_the_other_name_is_missing():
    missing, _heads = CommonStructure(_document()).missing_paths(Stack("block_sparse_moe"))
    assert missing == ["layers.0.mlp", "layers.1.mlp"]


@pytest.mark.parametrize("bad", [[], ["mlp", "mlp"], ["not a path"]])
def test_other_paths_must_be_distinct_real_paths(bad):
    with pytest.raises(StructureValidationError, match="other_paths"):
        CommonStructure(_document(other_paths=bad))
