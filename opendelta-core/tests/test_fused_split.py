"""Where the parts of a fused module lie: equal thirds, unequal parts, per-head interleaving, config variants."""

import json
from importlib import resources
from types import SimpleNamespace

import pytest
import torch

from opendelta import StructureValidationError, UnsupportedTargetError
from opendelta.fused_split import FusedSplit, resolve_split
from opendelta.shapes import fused_output_index
from opendelta.structures import CommonStructure, validate_structure
from opendelta.targets import resolve_targets
from opendelta.testing import tiny_model

FALCON_LIKE = [
    {
        "when": {"new_decoder_architecture": True},
        "groups": "num_kv_heads",
        "sizes": ["num_attention_heads", "num_kv_heads", "num_kv_heads"],
    },
    {"when": {"multi_query": True}, "sizes": ["num_attention_heads", 1, 1]},
    {"groups": "num_attention_heads"},
]


def gpt2_mapping(**fused_extra) -> dict:
    text = resources.files("opendelta_common_structures").joinpath("gpt2.json").read_text()
    document = json.loads(text)
    node = document["tree"]["children"]["h"]["children"]["$"]["children"]["attn"]["children"]["c_attn"]
    node.update(fused_extra)
    return document


def test_without_a_split_the_parts_are_the_equal_slices_they_always_were():
    for parts in [(0,), (1,), (0, 2), (0, 1, 2)]:
        old = torch.cat([torch.arange(p * 16, (p + 1) * 16) for p in parts])
        assert torch.equal(fused_output_index(48, parts, 3), old)
        assert torch.equal(resolve_split(None, 3, None).index(48, parts), old)
    with pytest.raises(ValueError, match="do not split into 3 equal parts"):
        fused_output_index(47, (0,), 3)


def test_unequal_parts_follow_the_config_phi3_under_grouped_query_attention():
    config = SimpleNamespace(num_attention_heads=4, num_key_value_heads=2)
    split = resolve_split({"sizes": ["num_attention_heads", "num_key_value_heads", "num_key_value_heads"]}, 3, config)
    assert split == FusedSplit((4, 2, 2))
    assert split.index(64, (0,)).tolist() == list(range(32))
    assert split.index(64, (1,)).tolist() == list(range(32, 48))
    assert split.index(64, (0, 2)).tolist() == [*range(32), *range(48, 64)]


def test_interleaved_per_head_gives_each_part_head_by_head_gpt_neox():
    split = resolve_split({"groups": "num_attention_heads"}, 3, SimpleNamespace(num_attention_heads=4))
    layout = torch.arange(96).view(4, 3, 8)  # [heads, (q, k, v), head_dim]: what GPT-NeoX's forward reads
    for part in range(3):
        assert torch.equal(split.index(96, (part,)), layout[:, part].reshape(-1))


def rows(*ranges):
    return [i for start, stop in ranges for i in range(start, stop)]


@pytest.mark.parametrize(
    "config, out_features, q, k",
    [
        # the new decoder architecture: per key/value group [q q | k | v], two groups of 4 x 8 features
        (
            dict(new_decoder_architecture=True, multi_query=True, num_attention_heads=4, num_kv_heads=2),
            64,
            rows((0, 16), (32, 48)),
            rows((16, 24), (48, 56)),
        ),
        # multi-query: [q (4 heads) | k (1 head) | v (1 head)]
        (
            dict(new_decoder_architecture=False, multi_query=True, num_attention_heads=4, num_kv_heads=2),
            48,
            rows((0, 32)),
            rows((32, 40)),
        ),
        # neither: [heads, 3, head_dim], as GPT-NeoX
        (
            dict(new_decoder_architecture=False, multi_query=False, num_attention_heads=4, num_kv_heads=4),
            96,
            rows((0, 8), (24, 32), (48, 56), (72, 80)),
            rows((8, 16), (32, 40), (56, 64), (80, 88)),
        ),
    ],
)
def test_variants_are_chosen_by_the_config_falcon(config, out_features, q, k):
    split = resolve_split(FALCON_LIKE, 3, SimpleNamespace(**config))
    assert split.index(out_features, (0,)).tolist() == q
    assert split.index(out_features, (1,)).tolist() == k


def test_a_config_that_fits_no_variant_or_names_no_count_refuses_by_name():
    no_variant = resolve_split([{"when": {"multi_query": True}, "sizes": [2, 1, 1]}], 3, SimpleNamespace())
    with pytest.raises(UnsupportedTargetError, match=r"h\.0\.attn\.c_attn.*no variant.*multi_query"):
        no_variant.index(48, (0,), where="h.0.attn.c_attn")
    missing = resolve_split({"groups": "num_kv_heads"}, 3, SimpleNamespace(num_kv_heads=None))
    with pytest.raises(UnsupportedTargetError, match=r"'num_kv_heads'.*None, not a count"):
        missing.index(48, (0,))
    refused = resolve_split({"refuse": "the heads are permuted per checkpoint"}, 3, None)
    with pytest.raises(UnsupportedTargetError, match=r"permuted per checkpoint.*Target the whole module"):
        refused.index(48, (0,))


def test_an_output_that_does_not_divide_as_described_is_refused_not_sliced():
    split = FusedSplit((4, 2, 2), groups=3)
    with pytest.raises(UnsupportedTargetError, match=r"64 output features do not split into parts in proportions"):
        split.index(64, (0,), where="qkv_proj")


def test_the_schema_takes_a_split_and_part_aliases_and_refuses_what_they_cannot_be():
    validate_structure(gpt2_mapping(split=FALCON_LIKE))
    for bad in [
        {"split": {"sizes": [1, 1, 1], "stride": 2}},  # closed: unknown field
        {"split": {"sizes": [0, 1, 1]}},  # a count is positive
        {"split": {"refuse": "why", "sizes": [1, 1, 1]}},  # a refusal slices nothing
        {"split": {"when": {}, "sizes": [1, 1, 1]}},  # an empty condition says nothing
        {"part_aliases": {"w2": ["w1"]}},  # not a part that can be fused
    ]:
        with pytest.raises(StructureValidationError):
            validate_structure(gpt2_mapping(**bad))


def test_what_the_schema_cannot_check_is_refused_when_the_mapping_is_read():
    with pytest.raises(StructureValidationError, match=r"2 size\(s\) for 3 fused parts"):
        CommonStructure(gpt2_mapping(split={"sizes": [2, 1]}))
    with pytest.raises(StructureValidationError, match=r"part_aliases names \['up'\].*not among the fused parts"):
        CommonStructure(gpt2_mapping(part_aliases={"up": ["w1"]}))


def test_a_part_alias_is_one_more_name_of_the_same_slice():
    structure = CommonStructure(gpt2_mapping(part_aliases={"q": ["w1"]}))
    names = structure.common_names(tiny_model("gpt2"))["transformer.h.0.attn.c_attn"]
    assert [(n.name, n.part) for n in names] == [
        ("decoder.block.0.attn.q", 0),
        ("decoder.block.0.attn.k", 1),
        ("decoder.block.0.attn.v", 2),
        ("decoder.block.0.attn.w1", 0),
    ]


def test_a_target_on_a_part_carries_the_split_and_its_rows(monkeypatch):
    model = tiny_model("gpt2")
    structure = CommonStructure(gpt2_mapping(split={"groups": "n_head"}))
    monkeypatch.setattr("opendelta.targets.structure_for_model", lambda _model: structure)
    (target, *_rest) = resolve_targets(model, ["attn.v"], None, (), True, "Test")
    assert target.parts == (2,) and target.split == FusedSplit((1, 1, 1), groups=4)
    assert torch.equal(target.output_index(96), torch.arange(96).view(4, 3, 8)[:, 2].reshape(-1))
