"""StableLM becomes mappable by installing this distribution alone: core holds no StableLM-specific line.

Needs opendelta-lora installed beside it (the nox ``third_party`` session installs it), to show that a method's
default common names (``attn.q``, ``attn.v``) now resolve on StableLM.
"""

import subprocess
import sys

import pytest
import torch
import transformers

from opendelta import get_method
from opendelta.cli import main
from opendelta.plugins import distribution_of
from opendelta.registry import get_structure
from opendelta.testing import perturb, tiny_inputs, tiny_model
from opendelta.testing.check_structures import check
from opendelta.testing.tiny_models import (
    ARCHITECTURES,
    SHIPPED_ARCHITECTURES,
    TASK_HEADS,
    register_architecture,
    registered_architectures,
    tiny_config,
)
from opendelta_stablelm_structure import mapping

HEADS = TASK_HEADS["stablelm"]  # registered by conftest.py through register_tiny_stablelm()


def test_the_mapping_is_registered_by_this_distribution_through_its_entry_point():
    structure = get_structure("stablelm")
    assert structure is not None and structure.document == mapping()
    assert "from plugin 'stablelm_structure'" in structure.source
    assert distribution_of("stablelm_structure") == ("opendelta-stablelm-structure", "0.1.0")


def test_every_path_of_the_mapping_exists_on_every_listed_class():
    structure = get_structure("stablelm")
    assert set(structure.architectures) == set(HEADS)
    assert check(structure) == []  # core's own checker, on models built by transformers


@pytest.mark.parametrize("head", HEADS)
def test_common_names_cover_attention_feed_forward_and_norms(head):
    model = tiny_model("stablelm", head)
    names = {c.name for commons in get_structure("stablelm").common_names(model).values() for c in commons}
    suffixes = ("attn.q", "attn.k", "attn.v", "attn.proj", "attn.layer_norm", "ff.w1", "ff.w2", "ff.layer_norm")
    assert {f"decoder.block.{b}.{s}" for b in (0, 1) for s in suffixes} <= names
    assert {"embeddings", "decoder.layer_norm"} <= names
    assert ("lm_head.proj" in names) == (head == "StableLmForCausalLM")


@pytest.mark.parametrize("head", HEADS)
def test_lora_defaults_resolve_to_q_proj_and_v_proj(head):
    model = tiny_model("stablelm", head)
    delta_model = get_method("lora").model_cls(model)
    prefix = "" if head == "StableLmModel" else "model."
    expected = [f"{prefix}layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")]
    assert [t.name for t in delta_model.targets] == expected
    assert [t.common_name for t in delta_model.targets][:2] == ["decoder.block.0.attn.q", "decoder.block.0.attn.v"]


def test_generation_with_lora_and_back_to_the_bare_model():
    model = tiny_model("stablelm", "StableLmForCausalLM")
    prompt = tiny_inputs("stablelm")["input_ids"][:1]
    options = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    bare = model.generate(prompt, **options)
    delta_model = get_method("lora").model_cls(model)
    perturb(delta_model, scale=2.0)
    tuned = model.generate(prompt, **options)
    delta_model.detach()
    assert torch.equal(model.generate(prompt, **options), bare)
    assert not torch.equal(tuned, bare)


def test_opendelta_plugins_lists_the_distribution_and_the_mapping():
    command = [sys.executable, "-m", "opendelta", "plugins"]  # a fresh process: plugins found by entry point only
    out = subprocess.run(command, capture_output=True, text=True, check=True, timeout=300).stdout
    mapping_line = next(line for line in out.splitlines() if line.split()[:1] == ["stablelm"])
    assert "StableLmForCausalLM" in mapping_line and "opendelta-stablelm-structure 0.1.0" in mapping_line
    plugin_line = next(line for line in out.splitlines() if line.split()[:1] == ["stablelm_structure"])
    assert "register_common_structures" in plugin_line


def test_opendelta_show_common_prints_stablelm_under_common_names(tmp_path, capsys):
    config = tiny_config("stablelm", num_hidden_layers=3, architectures=["StableLmForCausalLM"])
    config.save_pretrained(tmp_path)
    assert main(["show", str(tmp_path), "--common"]) == 0
    out = capsys.readouterr().out
    assert "StableLmForCausalLM" in out and "0-2 (StableLmDecoderLayer)" in out
    for line in ("q (Linear: self_attn.q_proj)", "v (Linear: self_attn.v_proj)", "w1 (Linear: mlp.up_proj)"):
        assert line in out
    assert "w2 (Linear: mlp.down_proj)" in out
    assert "gate_proj" not in out and isinstance(config, transformers.StableLmConfig)


def test_the_tiny_stablelm_joins_the_shipped_architectures_without_changing_the_default_battery():
    assert registered_architectures() == (*SHIPPED_ARCHITECTURES, "stablelm") and "stablelm" not in ARCHITECTURES
    inputs = tiny_inputs("stablelm")
    assert set(inputs) == {"input_ids", "attention_mask"} and inputs["attention_mask"][-1, -2:].sum() == 0
    model = tiny_model("stablelm", "StableLmModel")
    attention = model.layers[0].self_attn
    assert (attention.q_proj.out_features, attention.k_proj.out_features) == (32, 16)  # grouped-query attention


@pytest.mark.parametrize(
    "arch, heads, ids, message",
    [
        ("bert", ["BertModel"], {"pad_token_id": 0}, "'bert' is built in"),
        ("llama", ["LlamaModel"], {"pad_token_id": 0}, "'llama' is built in"),
        ("mine", ["MineModel"], {}, r"must set \['pad_token_id'\]"),
        ("mine", ["MineModel"], {"pad_token_id": 50}, r"must lie in \[0, 4\)"),
        ("mine", [], {"pad_token_id": 0}, "non-empty list"),
    ],
)
def test_register_architecture_refuses_what_would_break_the_battery(arch, heads, ids, message):
    with pytest.raises(ValueError, match=message):
        register_architecture(arch, {}, heads, ids)
    with pytest.raises(ValueError, match=r"unknown architecture 'mine'.*register_architecture"):
        tiny_model("mine")
