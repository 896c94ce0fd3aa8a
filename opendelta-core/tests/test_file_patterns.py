r"""Module patterns read from a saved config are untrusted: bounded in time, limited in size, names taken literally.

A crafted ``config.json`` whose ``modified_modules``, ``exclude_modules`` or ``unfrozen_modules`` hold a regex with
catastrophic backtracking (``(.|\w)*z``), one that expands on compilation, or tens of thousands of patterns must load
or be refused within a bound: each load runs in a forked child that the test kills, and fails on, when it runs past
a generous wall-clock guard (the stdlib ``re`` cannot be interrupted by a signal while it backtracks). A user's own
patterns, written in code, keep the stdlib ``re``, no limits and today's messages.
"""

from __future__ import annotations

import copy
import json
import pickle
import re
import time
from pathlib import Path

import pytest

from opendelta import AutoDeltaConfig, AutoDeltaModel, CheckpointError, ModuleNotFoundInStructureError
from opendelta.addressing import compile_patterns, find_matches
from opendelta.errors import AddressingError
from opendelta.file_patterns import (
    MAX_PATTERN_CHARS,
    MAX_PATTERNS,
    MAX_REGEX_SIZE,
    MAX_TOTAL_CHARS,
    FilePatterns,
)
from opendelta.testing import tiny_model
from opendelta.testing.bounded import run_bounded

GUARD_S = 120
"""Wall-clock guard for one load in the child: far above the bound (seconds), far below a hang."""
BOUND_S = 15
"""What a load of a crafted config may take on a loaded CI machine (the match budget is 1 s a field)."""

CATASTROPHIC = [
    r"[r](.|\w)*z",  # exponential in the stdlib re on any 30-character name
    r"[r](\w|_|[a-z]|.)*\d",  # exponential in the regex module too: its timeout must cut it
    r"[r](?:.*?){1,10}(?:.*?){1,10}(?:.*?){1,10}\d",
    r"[r](((a{100}){100}){100}){20}",  # compiling it in the regex module takes ~25 s: refused by size first
]


def bounded(function, *args):
    """``function(*args)`` in a forked child: (outcome, message, seconds); the test fails if it outlives the guard."""
    try:
        return run_bounded(function, *args, guard_s=GUARD_S)
    except TimeoutError as exc:
        pytest.fail(f"{exc}: matching is not bounded")


@pytest.fixture
def checkpoint(toy, tmp_path):
    delta_model = toy(tiny_model("bert"), modified_modules=["query", "value"])
    delta_model.freeze_module()
    return delta_model.save_finetuned(tmp_path / "ckpt")


def _edit(folder: Path, **fields) -> Path:
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))
    return folder


def load(folder):
    return AutoDeltaModel.from_finetuned(folder, backbone_model=tiny_model("bert"))


def load_and_freeze(folder):
    delta_model = load(folder)
    delta_model.freeze_module()
    return delta_model


@pytest.mark.parametrize("pattern", CATASTROPHIC)
@pytest.mark.parametrize("field", ["modified_modules", "exclude_modules", "unfrozen_modules"])
def test_a_catastrophic_regex_in_a_saved_config_loads_or_is_refused_in_bounded_time(checkpoint, field, pattern):
    value = ["deltas", pattern] if field == "unfrozen_modules" else [pattern]
    outcome, message, seconds = bounded(load_and_freeze, _edit(checkpoint, **{field: value}))
    assert seconds < BOUND_S, (outcome, message)
    assert outcome in ("ok", "CheckpointError", "ModuleNotFoundInStructureError"), message
    if outcome == "CheckpointError":  # refused: the message names the field, the pattern and the file
        assert field in message and repr(pattern) in message and str(checkpoint) in message, message


@pytest.mark.parametrize("field", ["modified_modules", "exclude_modules", "unfrozen_modules"])
def test_fifty_thousand_patterns_are_refused_quickly(checkpoint, field):
    patterns = [f"module_{i}" for i in range(50_000)]
    outcome, message, seconds = bounded(load, _edit(checkpoint, **{field: patterns}))
    assert outcome == "CheckpointError", message
    assert seconds < 2.0  # well under 1 s alone; CI runs two test processes on two cores (1.2 s seen there)
    assert field in message and "50,000" in message and "MAX_PATTERNS" in message, message


@pytest.mark.parametrize(
    ("patterns", "limit"),
    [
        (["q" * (MAX_PATTERN_CHARS + 1)], "MAX_PATTERN_CHARS"),
        (["q" * MAX_PATTERN_CHARS] * (MAX_TOTAL_CHARS // MAX_PATTERN_CHARS + 1), "MAX_TOTAL_CHARS"),
        ([r"[r](a{1000}){1000}"], "MAX_REGEX_SIZE"),
    ],
    ids=["one-too-long", "too-long-together", "expands-too-far"],
)
def test_patterns_too_long_or_too_large_are_refused_naming_the_limit(checkpoint, patterns, limit):
    outcome, message, seconds = bounded(load, _edit(checkpoint, modified_modules=patterns))
    assert outcome == "CheckpointError", message
    assert limit in message and "modified_modules" in message, message
    assert seconds < 5


def test_thousands_of_missing_patterns_from_a_file_are_reported_short_and_fast(checkpoint):
    patterns = [f"attention.self.quer{i}" for i in range(MAX_PATTERNS)]  # near misses: difflib would try them all
    outcome, message, seconds = bounded(load, _edit(checkpoint, modified_modules=patterns))
    assert outcome == "ModuleNotFoundInStructureError", message
    assert seconds < 5 and len(message) < 3000, (seconds, len(message))
    assert "attention.self.quer0" in message and f"{MAX_PATTERNS - 10:,} more" in message, message
    assert str(checkpoint) in message


def test_names_from_a_file_are_matched_literally(checkpoint):
    """A ``.`` in a plain name is a dot, not "any character" (a regression guard: only ``[r]`` is a regex)."""
    outcome, message, _ = bounded(load, _edit(checkpoint, modified_modules=["self.quer.", "value"]))
    # one entry matching is enough (a list for several architectures); the other is named in a warning
    assert outcome == "OpenDeltaAddressingWarning" and "'self.quer.' matched no module" in message, message
    outcome, message, _ = bounded(load, _edit(checkpoint, modified_modules=["self.quer."]))
    assert outcome == "ModuleNotFoundInStructureError" and "'self.quer.'" in message, message
    outcome, message, _ = bounded(load, _edit(checkpoint, modified_modules=["self.query", "value"]))
    assert outcome == "ok", message


def test_a_regex_saved_from_code_loads_to_the_same_targets(toy, tmp_path):
    """A user's ``[r]`` pattern, saved then read back (bounded matcher), designates the same modules."""
    delta_model = toy(tiny_model("bert"), modified_modules=[r"[r][0-1]\.attention\.self\.(query|value)"])
    delta_model.freeze_module()
    folder = delta_model.save_finetuned(tmp_path / "ckpt")
    loaded = AutoDeltaModel.from_finetuned(folder, backbone_model=tiny_model("bert"))
    assert [t.name for t in loaded.targets] == [t.name for t in delta_model.targets]
    assert loaded.config.read_from == {
        "modified_modules": str(folder / "config.json"),
        "unfrozen_modules": str(folder / "config.json"),
    }


def test_the_mark_survives_copies_and_leaves_what_code_overrides(checkpoint):
    config = AutoDeltaConfig.from_finetuned(checkpoint, exclude_modules=["value"])
    assert set(config.read_from) == {"modified_modules", "unfrozen_modules"}  # exclude_modules is the caller's
    assert isinstance(config.modified_modules, FilePatterns) and config.modified_modules == ["query", "value"]
    assert type(config.to_dict()["modified_modules"]) is list  # JSON-ready, as before
    assert copy.deepcopy(config).read_from == config.read_from
    assert pickle.loads(pickle.dumps(config)).read_from == config.read_from
    delta_model = AutoDeltaModel.from_config(config, tiny_model("bert"), modified_modules=["query"])
    assert set(delta_model.config.read_from) == {"unfrozen_modules"}  # overridden in code: the user's own now
    delta_model.config.modified_modules = ["[r]query"]  # set in code: trusted again
    assert "modified_modules" not in delta_model.config.read_from


def test_a_slow_regex_is_cut_by_the_budget_and_named():
    text = r"[r](\w|_|[a-z]|.)*\d"
    patterns = compile_patterns(FilePatterns([text], "crafted.json"))
    names = ["bert.encoder.layer.0.attention.self.query_key_value_projection_dense_output"]
    start = time.perf_counter()
    with pytest.raises(CheckpointError) as caught:
        find_matches(names, patterns)
    assert time.perf_counter() - start < BOUND_S
    assert f"modified_modules entry {text!r} in crafted.json took more than 1 s" in str(caught.value)


def test_a_users_own_patterns_keep_the_stdlib_re_no_limits_and_todays_messages():
    (pattern,) = compile_patterns([r"[r](\d)+\.output.dense"])
    assert isinstance(pattern.regex, re.Pattern) and pattern.source is None
    many = compile_patterns([f"module_{i}" for i in range(MAX_PATTERNS + 1)] + ["q" * (MAX_PATTERN_CHARS + 1)])
    assert len(many) == MAX_PATTERNS + 2  # in code: no file limits
    big = compile_patterns([r"[r](a{1000}){1000}"])  # the stdlib compiles it at once: not refused in code
    assert big[0].regex.pattern == "(a{1000}){1000}"
    names = ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.0.attention.self.value"]
    with pytest.raises(ModuleNotFoundInStructureError) as caught:
        find_matches(names, compile_patterns(["quer", "value"]))
    assert str(caught.value) == (
        "modified_modules=['quer', 'value']: 'quer' matched no module of the backbone. Closest module names: "
        "'query', 'self.query'. A pattern matches the end of a module name on whole components ('key' matches "
        "'...attention.self.key'); start it with '[r]' for a regular expression."
    )
    assert MAX_REGEX_SIZE > 1000  # the constants the messages name are real


def test_a_method_configs_own_from_finetuned_marks_its_patterns(toy, checkpoint):
    config = toy.config_class.from_finetuned(checkpoint)
    assert config.read_from == {name: str(checkpoint) for name in ("modified_modules", "unfrozen_modules")}


def test_an_invalid_regex_from_a_file_is_still_an_addressing_error_naming_the_file():
    with pytest.raises(AddressingError, match=r"exclude_modules entry '\[r\]\(unclosed' in f\.json is not a valid"):
        compile_patterns(FilePatterns(["[r](unclosed"], "f.json"), argument="exclude_modules")
