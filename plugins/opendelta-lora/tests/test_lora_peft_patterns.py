r"""The module patterns of a PEFT ``adapter_config.json`` are untrusted: bounded in time, limited, names literal.

Each adapter is a real one, trained (perturbed) and saved by the REAL peft library on a tiny BERT, then its
``adapter_config.json`` edited as a crafted file would be. Loads run in a forked child killed after a generous
wall-clock guard, so a hang fails the test instead of blocking it. Where a file is not crafted, the modules
``peft_target_names`` designates are exactly those real PEFT puts LoRA on.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from opendelta.testing import tiny_model
from opendelta.testing.bounded import run_bounded
from opendelta_lora import LoraModel, load_peft_adapter
from opendelta_lora.peft_format import lora_config_from_peft, peft_target_names

peft = pytest.importorskip("peft")

GUARD_S = 120
BOUND_S = 15
"""What loading a crafted adapter may take on a loaded CI machine (the match budget is 1 s a field)."""


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A real PEFT LoRA adapter on query/value of a tiny BERT, its weights moved off their init."""
    folder = tmp_path_factory.mktemp("peft") / "adapter"
    model = peft.get_peft_model(
        tiny_model("bert"), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"])
    )
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.1)
    model.save_pretrained(folder)
    return folder


@pytest.fixture
def adapter(trained, tmp_path):
    return Path(shutil.copytree(trained, tmp_path / "adapter"))


def _edit(folder: Path, **fields) -> Path:
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))
    return folder


def load(folder):
    return load_peft_adapter(folder, tiny_model("bert"))


def bounded(function, *args):
    try:
        return run_bounded(function, *args, guard_s=GUARD_S)
    except TimeoutError as exc:
        pytest.fail(f"{exc}: matching is not bounded")


CATASTROPHIC = [
    r"(.|\w)*z",  # exponential in the stdlib re on any 30-character name
    r"(\w|_|[a-z]|.)*\d",  # exponential in the regex module too: its timeout must cut it
    r"(((a{100}){100}){100}){20}",  # ~25 s to compile in the regex module: refused by size first
]


@pytest.mark.parametrize("pattern", CATASTROPHIC)
@pytest.mark.parametrize("field", ["target_modules", "exclude_modules"])
def test_a_catastrophic_regex_in_adapter_config_loads_or_is_refused_in_bounded_time(adapter, field, pattern):
    outcome, message, seconds = bounded(load, _edit(adapter, **{field: pattern}))
    assert seconds < BOUND_S, (outcome, message)
    assert outcome in ("ok", "CheckpointError"), message
    if field == "exclude_modules" and outcome == "ok":
        assert "LoraModel" in message
    if "took more than" in message or "expands to" in message:  # refused: the field, the pattern, the file
        assert field in message and repr(pattern) in message and str(adapter) in message, message


@pytest.mark.parametrize("field", ["target_modules", "exclude_modules", "modules_to_save", "layers_to_transform"])
def test_fifty_thousand_patterns_in_adapter_config_are_refused_in_well_under_a_second(adapter, field):
    values = list(range(50_000)) if field == "layers_to_transform" else [f"module_{i}" for i in range(50_000)]
    outcome, message, seconds = bounded(load, _edit(adapter, **{field: values}))
    assert outcome == "CheckpointError", message
    assert seconds < 1.0
    assert field in message and "50,000" in message and "MAX_PATTERNS" in message, message


def test_a_too_long_regex_is_refused_naming_the_limit(adapter):
    outcome, message, _ = bounded(load, _edit(adapter, target_modules="q" * 10_000))
    assert outcome == "CheckpointError" and "target_modules" in message and "MAX_PATTERN_CHARS" in message, message


def test_layers_pattern_is_a_name_matched_literally():
    """``la.er`` is not ``layer``: a crafted layers_pattern does not act as a regular expression."""
    model = tiny_model("bert")
    config = {"target_modules": ["query"], "layers_to_transform": [0]}
    assert peft_target_names({**config, "layers_pattern": "layer"}, model) == [
        "bert.encoder.layer.0.attention.self.query"
    ]
    assert peft_target_names({**config, "layers_pattern": "la.er"}, model) == []
    assert peft_target_names({**config, "layers_pattern": ["la.*", "layer"]}, model) == [
        "bert.encoder.layer.0.attention.self.query"
    ]


def test_modules_to_save_are_names_matched_literally():
    """``pooler.dens.`` is not ``pooler.dense``: the pooler stays a LoRA target; ``pooler`` itself still shields it."""
    model = tiny_model("bert")
    assert "bert.pooler.dense" in peft_target_names(
        {"target_modules": ["dense"], "modules_to_save": ["pooler.dens."]}, model
    )
    assert "bert.pooler.dense" not in peft_target_names(
        {"target_modules": ["dense"], "modules_to_save": ["pooler"]}, model
    )


def test_a_peft_name_starting_with_r_is_not_read_as_an_opendelta_regex():
    """A module literally named ``[r]\\w+`` is LoRA's only target, not a regex designating every module."""
    model = tiny_model("bert")
    model.add_module(r"[r]\w+", nn.Linear(4, 4))
    config = {"peft_type": "LORA", "r": 2, "target_modules": [r"[r]\w+"]}
    assert peft_target_names(config, model) == [r"[r]\w+"]
    delta_model = LoraModel(model, config=lora_config_from_peft(config, model))
    assert [t.name for t in delta_model.targets] == [r"[r]\w+"]


ORACLE_CASES = {
    "regex": {"target_modules": r".*\.attention\.self\.(query|value)"},
    "regex-exclude": {"target_modules": ["dense"], "exclude_modules": r".*\.1\..*"},
    "list-exclude-list": {"target_modules": ["query", "dense"], "exclude_modules": ["pooler.dense"]},
    "layers": {"target_modules": ["key"], "layers_to_transform": [1], "layers_pattern": "layer"},
    "modules-to-save": {"target_modules": ["dense"], "modules_to_save": ["pooler"]},
}


@pytest.mark.parametrize("case", ORACLE_CASES)
def test_uncrafted_patterns_designate_what_real_peft_modifies(case):
    options = ORACLE_CASES[case]
    model = peft.get_peft_model(tiny_model("bert"), peft.LoraConfig(r=4, **options))
    expected = sorted(n[len("base_model.model.") :] for n, m in model.named_modules() if hasattr(m, "lora_A"))
    assert sorted(peft_target_names(options, tiny_model("bert"))) == expected
