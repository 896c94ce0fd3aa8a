"""LoRA on one part of a fused projection updates exactly that part's rows, whatever the layout, and merges exactly.

The expected rows are written here from each model's own forward (how it views the fused output), not from the
mapping's ``split``, so a wrong split fails: Phi-3's ``qkv_proj`` is ``[q | k | v]`` with narrower k and v,
GPT-NeoX's ``query_key_value`` is ``[heads, 3, head_dim]``, Falcon's has three layouts chosen by its config.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from importlib import resources

import pytest
import torch
import transformers
from torch import nn

from opendelta import LoraModel, UnsupportedTargetError
from opendelta.structures import CommonStructure
from opendelta.testing import Pristine, perturb, tiny_inputs
from opendelta.testing.tiny_models import (
    CACHE_DIFFERS_WITHOUT_DELTA,
    GENERATION_HEADS,
    NUM_HEADS,
    TASK_HEADS,
    generation_inputs,
    model_output_tensor,
    tiny_config,
    tiny_model,
)

HEAD_DIM = 8


def contiguous(*widths: int) -> Callable[[int], torch.Tensor]:
    """Part ``i`` of ``[p0 | p1 | ...]`` with the given widths in heads."""

    def rows(part: int) -> torch.Tensor:
        start = sum(widths[:part]) * HEAD_DIM
        return torch.arange(start, start + widths[part] * HEAD_DIM)

    return rows


def per_group(groups: int, widths: tuple[int, ...]) -> Callable[[int], torch.Tensor]:
    """Part ``i`` of ``[groups, sum(widths) heads, head_dim]``, part ``i`` taking ``widths[i]`` heads of each group."""

    def rows(part: int) -> torch.Tensor:
        layout = torch.arange(groups * sum(widths) * HEAD_DIM).view(groups, sum(widths), HEAD_DIM)
        start = sum(widths[:part])
        return layout[:, start : start + widths[part]].reshape(-1)

    return rows


QKV = ("attn.q", "attn.k", "attn.v")
# The other two layouts of Falcon's query_key_value (the tiny Falcon is Falcon-40B's). Their blocks have one layer
# norm, which the mapping does not name: LoRA on q, k or v does not ask for it, so nothing warns.
FALCON_7B = {"new_decoder_architecture": False, "multi_query": True}
FALCON_RW = {"new_decoder_architecture": False, "multi_query": False, "num_kv_heads": NUM_HEADS}
CASES = {
    # name: (arch, config overrides, fused module name suffix, common name of each part, expected rows of a part)
    "phi3-qkv": ("phi3", {}, "self_attn.qkv_proj", QKV, contiguous(4, 2, 2)),
    "phi3-gate-up": ("phi3", {}, "mlp.gate_up_proj", ("ff.gate", "ff.up"), lambda part: torch.arange(37) + 37 * part),
    "gpt_neox": ("gpt_neox", {}, "attention.query_key_value", QKV, per_group(NUM_HEADS, (1, 1, 1))),
    # Falcon's _split_heads: [kv_heads, heads / kv_heads + 2, head_dim], [heads + 2, head_dim], [heads, 3, head_dim]
    "falcon-new-decoder": ("falcon", {}, "self_attention.query_key_value", QKV, per_group(2, (2, 1, 1))),
    "falcon-multi-query": ("falcon", FALCON_7B, "self_attention.query_key_value", QKV, contiguous(NUM_HEADS, 1, 1)),
    "falcon-multi-head": ("falcon", FALCON_RW, "self_attention.query_key_value", QKV, per_group(NUM_HEADS, (1, 1, 1))),
    # ModernBERT's attention: qkv.view(..., 3, heads, head_dim); its MLP: Wi(x).chunk(2) is (input, gate)
    "modernbert-qkv": ("modernbert", {}, "attn.Wqkv", QKV, contiguous(NUM_HEADS, NUM_HEADS, NUM_HEADS)),
    "modernbert-wi": ("modernbert", {}, "mlp.Wi", ("ff.gate", "ff.up"), lambda part: torch.arange(37) + 37 * part),
}


def build(arch: str, overrides: dict) -> nn.Module:
    torch.manual_seed(0)
    return getattr(transformers, TASK_HEADS[arch][0])(tiny_config(arch, **overrides)).eval()


def fused_output(model: nn.Module, arch: str, suffix: str) -> torch.Tensor:
    """The first block's fused projection's output on the tiny inputs."""
    module = next(m for name, m in model.named_modules() if name.endswith(suffix) and ".0." in name)
    seen = []
    handle = module.register_forward_hook(lambda _m, _args, out: seen.append(out.detach().clone()))
    try:
        with torch.no_grad():
            model(**tiny_inputs(arch))
    finally:
        handle.remove()
    return seen[0]


@pytest.mark.parametrize("case", sorted(CASES))
def test_lora_on_one_part_changes_only_that_parts_rows_and_merges_exactly(case):
    arch, overrides, suffix, common_names, expected = CASES[case]
    for part, common_name in enumerate(common_names):
        model = build(arch, overrides)
        bare = fused_output(model, arch, suffix)
        delta_model = LoraModel(model, modified_modules=[common_name], common_structure=True)
        perturb(delta_model, scale=1.0)
        unmerged = fused_output(model, arch, suffix)
        changed = ((unmerged - bare).abs() > 1e-6).flatten(0, -2).any(0).nonzero().flatten()
        assert changed.tolist() == sorted(expected(part).tolist()), common_name
        delta_model.merge()
        torch.testing.assert_close(fused_output(model, arch, suffix), unmerged, rtol=1e-4, atol=1e-4)


def refusing(arch: str, path: list[str], reason: str) -> CommonStructure:
    """The shipped mapping of ``arch`` with the fused node at ``path`` (keys under the tree) refusing to split."""
    document = json.loads(resources.files("opendelta_common_structures").joinpath(f"{arch}.json").read_text())
    node = document["tree"]
    for key in path:
        node = node["children"][key]
    node["split"] = {"refuse": reason}
    return CommonStructure(document)


def test_a_layout_the_mapping_refuses_is_refused_by_name_and_the_whole_module_stays_addressable(monkeypatch):
    structure = refusing("phi3", ["layers", "$", "self_attn", "qkv_proj"], "the checkpoint permutes its heads")
    monkeypatch.setattr("opendelta.targets.structure_for_model", lambda _model: structure)
    model = build("phi3", {})
    pristine = Pristine.of(model)
    with pytest.raises(UnsupportedTargetError, match=r"qkv_proj \(common name '.*attn\.q'\).*permutes its heads"):
        LoraModel(model)
    assert pristine.differences(model) == []
    assert len(LoraModel(model, modified_modules=["qkv_proj"]).targets) == 2


def test_unequal_parts_give_the_prefix_key_and_value_of_their_own_width():
    from opendelta import PrefixModel

    model = build("phi3", {})
    delta_model = PrefixModel(model, prefix_token_num=3, reparameterize=False)
    key, value = delta_model.deltas[0].key_value()
    assert key.shape == value.shape == (3, NUM_HEADS // 2 * HEAD_DIM)  # k and v of 2 heads, not a third of qkv


@pytest.mark.parametrize("arch", ["phi3", "gpt_neox"])
def test_the_prefix_placed_through_the_fused_rows_equals_the_prefix_at_the_attention_interface(arch, monkeypatch):
    """The rows backend writes the prefix into the key and value rows of the fused output, where the split says they
    lie; the interface backend never touches them. Both must compute the same."""
    import opendelta.prefix
    from opendelta import PrefixModel

    outputs = {}
    for backend in ("interface", "rows"):
        monkeypatch.setattr(opendelta.prefix, "attention_backend", lambda _attention, chosen=backend: chosen)
        model = build(arch, {})
        perturb(PrefixModel(model, prefix_token_num=3), seed=1)
        with torch.no_grad():
            outputs[backend] = model(**tiny_inputs(arch)).last_hidden_state
    torch.testing.assert_close(outputs["interface"], outputs["rows"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["prefix", "soft_prompt"])
def test_on_modernbert_a_padded_batch_gives_each_row_what_it_gives_alone(method):
    """Local (sliding-window) and global layers alike: the added positions and the padding do not leak across rows."""
    from opendelta import PrefixModel, SoftPromptModel

    for head in ("ModernBertModel", "ModernBertForSequenceClassification"):
        torch.manual_seed(0)
        model = getattr(transformers, head)(tiny_config("modernbert")).eval()
        delta_cls, size = (PrefixModel, {"prefix_token_num": 3}) if method == "prefix" else (SoftPromptModel, {})
        perturb(delta_cls(model, **size), seed=1, scale=1.0)
        inputs = tiny_inputs("modernbert", batch=3)
        with torch.no_grad():
            batch = model_output_tensor(model(**inputs))
            for row in range(3):
                length = int(inputs["attention_mask"][row].sum())
                alone = model_output_tensor(model(**{k: v[row : row + 1, :length] for k, v in inputs.items()}))
                expected = batch[row : row + 1, :length] if batch.dim() == 3 else batch[row : row + 1]
                torch.testing.assert_close(alone, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", sorted(CACHE_DIFFERS_WITHOUT_DELTA))
def test_the_bare_models_the_cache_tests_skip_really_differ_with_and_without_the_cache(arch):
    """Keeps each skip's reason true: once transformers fixes the model, this fails; drop its entry then."""
    model = tiny_model(arch, GENERATION_HEADS[arch])
    options = {"max_new_tokens": 6, "do_sample": False, "output_scores": True, "return_dict_in_generate": True}
    inputs = generation_inputs(arch, model, "none")
    with torch.no_grad():
        cached = model.generate(**inputs, use_cache=True, **options)
        uncached = model.generate(**inputs, use_cache=False, **options)
    pairs = zip(cached.scores, uncached.scores, strict=True)
    assert not all(torch.allclose(a, b, rtol=1e-4, atol=1e-4) for a, b in pairs)
