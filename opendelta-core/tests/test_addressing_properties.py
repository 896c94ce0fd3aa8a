"""Name-based addressing (manual section 1.15) checked against a plain reference on random module trees.

``test_addressing.py`` pins the manual's examples; here hypothesis builds real ``nn.Module`` trees whose component
names are prefixes and suffixes of each other (``query``/``uery``/``q``, ``1``/``10``) and random pattern lists, half
taken from the tree so they match, and the matcher must designate exactly what the reference below says, each module
once, and fail exactly when the reference says a pattern designates nothing or everything is excluded. Malformed
lists and invalid regexes must fail with an AddressingError naming the argument and the entry.

Runs are derandomized and use no example database: reproducible, and no ``.hypothesis`` folder in the repository.
"""

from __future__ import annotations

import os
import re
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, configuration, example, given, settings
from hypothesis import strategies as st
from torch import nn

from opendelta.addressing import compile_patterns, find_matches, is_excluded
from opendelta.errors import AddressingError, ModuleNotFoundInStructureError, OpenDeltaAddressingWarning
from opendelta.targets import backbone_module_names, resolve_targets

if not os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY"):
    # Even with database=None, hypothesis's pytest plugin caches the constants of every local source file under
    # ./.hypothesis while collecting; this runs at import, before that.
    configuration.set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "opendelta-hypothesis")


def checked(max_examples: int) -> settings:
    """Reproducible settings with no deadline: CI machines are slow and a tree of Linear layers takes a while."""
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )


# ------------------------------------------------------------------------------------------------------ reference
def reference_matches(pattern: str, name: str) -> bool:
    """The manual's rule, written from scratch: components end-match, or ``[r]`` fullmatches a dotted suffix."""
    if pattern.startswith("[r]"):
        starts = [0] + [i + 1 for i, char in enumerate(name) if char == "."]
        return any(re.fullmatch(pattern[3:], name[start:]) for start in starts)
    wanted, parts = pattern.split("."), name.split(".")
    return len(wanted) <= len(parts) and parts[len(parts) - len(wanted) :] == wanted


def reference_excluded(name: str, exclude: list[str]) -> bool:
    """A name is excluded when it or one of its dotted prefixes matches an exclusion pattern."""
    parts = name.split(".")
    prefixes = [".".join(parts[:k]) for k in range(1, len(parts) + 1)]
    return any(reference_matches(pattern, prefix) for pattern in exclude for prefix in prefixes)


@dataclass
class Refused:
    """What the reference expects instead of a list: ``unmatched`` names the patterns that designate nothing."""

    unmatched: list[str] | None = None
    everything_excluded: bool = False


def reference(names: list[str], patterns: list[str], exclude: list[str], require_each: bool = True):
    """The designated names in module order, or why the list must be refused."""
    unmatched = [p for p in patterns if not any(reference_matches(p, n) for n in names)]
    matched = [n for n in names if any(reference_matches(p, n) for p in patterns)]
    if not matched or (require_each and unmatched):
        return Refused(unmatched=unmatched)
    kept = [n for n in matched if not reference_excluded(n, exclude)]
    return kept or Refused(everything_excluded=True)


def assert_agrees(run, names, patterns, exclude, require_each=True):
    """``run()`` returns the reference's names, or raises the error it predicts, echoing the patterns at fault."""
    expected = reference(names, patterns, exclude, require_each)
    if not isinstance(expected, Refused):
        result = run()
        assert result == expected
        return result
    with pytest.raises(ModuleNotFoundInStructureError) as info:
        run()
    message = str(info.value)
    if expected.everything_excluded:
        assert f"modified_modules={patterns!r}" in message and "excluded all" in message
        assert f"exclude_modules={exclude!r}" in message
    else:
        assert f"{', '.join(map(repr, expected.unmatched))} matched no module" in message
    return None


# ----------------------------------------------------------------------------------------------------- strategies
COMPONENTS = st.sampled_from(["q", "query", "uery", "que", "key", "dense", "out", "output", "0", "1", "10", "01"]) | (
    st.text("qu01", min_size=1, max_size=3)
)
"""Attribute names that are prefixes and suffixes of each other, repeated at every depth, and ModuleList-like digits."""


def grow(children):
    """A container of named children, or a ModuleList (children named ``0``, ``1``... ``10``)."""
    return st.dictionaries(COMPONENTS, children, min_size=1, max_size=3) | st.lists(children, min_size=1, max_size=12)


TREES = st.dictionaries(COMPONENTS, st.recursive(st.none(), grow, max_leaves=16), min_size=1, max_size=3)
"""Tree specs: a dict is an ``nn.Module`` container, a list an ``nn.ModuleList``, ``None`` an ``nn.Linear`` leaf."""


def build(spec) -> nn.Module:
    """The real module tree a spec describes."""
    if spec is None:
        return nn.Linear(1, 1)
    if isinstance(spec, list):
        return nn.ModuleList(build(child) for child in spec)
    module = nn.Module()
    for name, child in spec.items():
        module.add_module(name, build(child))
    return module


def names_of(spec, prefix: str = "") -> list[str]:
    """The dotted names of a spec's modules, in ``named_modules()`` order, computed without torch."""
    children = enumerate(spec) if isinstance(spec, list) else spec.items() if isinstance(spec, dict) else ()
    names = []
    for key, child in children:
        names += [f"{prefix}{key}", *names_of(child, f"{prefix}{key}.")]
    return names


@st.composite
def plain_patterns(draw, names: list[str]) -> str:
    """Whole-component suffixes and full names (match), character suffixes (``uery``, ``.query``) and prefixes."""
    name = draw(st.sampled_from(names))
    parts = name.split(".")
    kind = draw(st.sampled_from(["suffix", "suffix", "dotted prefix", "characters", "prefix", "random"]))
    if kind == "suffix":
        return ".".join(parts[-draw(st.integers(1, len(parts))) :])
    if kind == "dotted prefix":  # how exclusions are often written ("bert.encoder.layer.1"): a whole subtree
        return ".".join(parts[: draw(st.integers(1, len(parts)))])
    if kind == "characters":
        return name[draw(st.integers(0, len(name) - 1)) :]
    if kind == "prefix":
        return name[: draw(st.integers(1, len(name)))]
    return ".".join(draw(st.lists(COMPONENTS, min_size=1, max_size=3)))


@st.composite
def regex_patterns(draw, names: list[str]) -> str:
    """``[r]`` + a regex built over a real suffix: escaped components, alternations, classes, wildcards, anchors."""
    parts = draw(st.sampled_from(names)).split(".")
    pieces = []
    for part in parts[-draw(st.integers(1, len(parts))) :]:
        other = re.escape(draw(COMPONENTS))
        pieces.append(
            draw(
                st.sampled_from(
                    [re.escape(part), ".*", "[^.]+", r"\d+", "[qk]\\w*", f"(?:{re.escape(part)}|{other})", other]
                )
            )
        )
    expression = draw(st.sampled_from([r"\.", "."])).join(pieces)  # an unescaped dot also matches a letter
    return "[r]" + draw(st.sampled_from([expression, f"^{expression}$", rf"(.*\.)?{expression}", f"{expression}.*"]))


def pattern_lists(names: list[str], min_size: int, max_size: int) -> st.SearchStrategy[list[str]]:
    """A list of plain and ``[r]`` patterns for ``names``."""
    return st.lists(plain_patterns(names) | regex_patterns(names), min_size=min_size, max_size=max_size)


@st.composite
def cases(draw):
    """A tree spec, its names, ``modified_modules`` and ``exclude_modules``."""
    spec = draw(TREES)
    names = names_of(spec)
    # two exclusions at most: more would often exclude everything, and partly excluded lists are the subtle case
    return spec, names, draw(pattern_lists(names, 1, 4)), draw(pattern_lists(names, 0, 2))


LAYERS_1_AND_10 = {"layer": [{"query": None, "uery": None}] * 11, "q": None}
"""Layers ``1`` and ``10`` side by side, ``query`` next to ``uery``: the manual's pitfalls in one tree."""
LAYERS_1_AND_10_CASE = (
    LAYERS_1_AND_10,
    names_of(LAYERS_1_AND_10),
    ["1.query", r"[r]1\.q.*", "uery", "q"],
    ["layer.1", "[r]10"],
)


# ------------------------------------------------------------------------------------------------- the properties
@checked(200)
@given(case=cases())
@example(case=LAYERS_1_AND_10_CASE)
def test_each_pattern_matches_and_excludes_what_the_reference_says(case):
    _spec, names, patterns, exclude = case
    for pattern, compiled in zip(patterns + exclude, compile_patterns(patterns + exclude), strict=True):
        assert [n for n in names if compiled.matches(n)] == [n for n in names if reference_matches(pattern, n)]
    compiled_exclude = compile_patterns(exclude, "exclude_modules")
    assert [n for n in names if is_excluded(n, compiled_exclude)] == [
        n for n in names if reference_excluded(n, exclude)
    ]


@checked(200)
@given(case=cases(), require_each=st.booleans())
@example(case=LAYERS_1_AND_10_CASE, require_each=True)
def test_find_matches_designates_what_the_reference_says_or_refuses_as_it_says(case, require_each):
    _spec, names, patterns, exclude = case
    compiled, compiled_exclude = compile_patterns(patterns), compile_patterns(exclude, "exclude_modules")
    result = assert_agrees(
        lambda: find_matches(names, compiled, compiled_exclude, require_each=require_each),
        names,
        patterns,
        exclude,
        require_each,
    )
    if result is not None:
        assert len(set(result)) == len(result)


@checked(150)
@given(case=cases(), common_structure=st.sampled_from([None, False]), empty_exclude=st.sampled_from([None, []]))
@example(case=LAYERS_1_AND_10_CASE, common_structure=None, empty_exclude=None)
def test_resolve_targets_on_a_real_module_tree_designates_what_the_reference_says(
    case, common_structure, empty_exclude
):
    spec, names, patterns, exclude = case
    model = build(spec)
    assert backbone_module_names(model) == names  # the harness describes the tree torch built
    targets, warned = [], []

    def run():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            targets[:] = resolve_targets(model, patterns, exclude or empty_exclude, (), common_structure, "Test")
        warned[:] = [str(w.message) for w in caught if issubclass(w.category, OpenDeltaAddressingWarning)]
        return [t.name for t in targets]

    # one matching entry is enough (a list for several architectures); the others are named in a warning
    if assert_agrees(run, names, patterns, exclude, require_each=False) is not None:
        unmatched = [p for p in patterns if not any(reference_matches(p, n) for n in names)]
        assert bool(warned) == bool(unmatched), warned
        if unmatched:
            assert f"{', '.join(map(repr, unmatched))} matched no module" in warned[0]
    for target in targets:
        assert target.module is model.get_submodule(target.name) and target.common_name is None


def test_results_follow_module_order_not_pattern_order():
    names = names_of(LAYERS_1_AND_10)
    in_module_order = [*(f"layer.{i}.uery" for i in range(11)), "q"]
    assert find_matches(names, compile_patterns(["q", "uery"])) == in_module_order
    assert find_matches(names, compile_patterns(["uery", "q"])) == in_module_order


@st.composite
def overlapping(draw):
    """A tree and a name hit by every pattern of a list: all its suffixes, regexes over them, repeated, shuffled."""
    spec = draw(TREES)
    names = names_of(spec)
    name = draw(st.sampled_from(names))
    parts = name.split(".")
    suffixes = [".".join(parts[k:]) for k in range(len(parts))]
    patterns = suffixes + ["[r]" + re.escape(s) for s in suffixes] + [r"[r].*", "[r]" + re.escape(parts[-1])]
    return names, name, draw(st.permutations(patterns + draw(st.lists(st.sampled_from(patterns), max_size=4))))


@checked(100)
@given(overlapping())
def test_a_module_hit_by_several_patterns_is_designated_once(args):
    names, name, patterns = args
    result = find_matches(names, compile_patterns(patterns))
    assert result.count(name) == 1
    assert result == names  # '[r].*' designates everything, once each, in module order
    assert find_matches(names, compile_patterns(patterns * 2)) == result


# ----------------------------------------------------------------------------------------------- invalid input
INVALID_REGEXES = {
    "unbalanced (": lambda a, b, letter: f"{a}({b}",
    "unbalanced )": lambda a, b, letter: f"{a}){b}",
    "unterminated [": lambda a, b, letter: f"{a}[{b}",
    "trailing backslash": lambda a, b, letter: f"{a}{b}\\",
    "unknown escape": lambda a, b, letter: f"{a}\\{letter}{b}",
    "nothing to repeat": lambda a, b, letter: f"*{a}{b}",
    "multiple repeat": lambda a, b, letter: f"{a}q**{b}",
    "unfinished group name": lambda a, b, letter: f"{a}(?P<",
    "bad character range": lambda a, b, letter: f"{a}[z-a]{b}",
    "min repeat above max": lambda a, b, letter: f"{a}q{{3,1}}{b}",
    "unknown group name": lambda a, b, letter: f"{a}(?P=g){b}",
    "back-reference to no group": lambda a, b, letter: f"{a}\\9{b}",
    "variable-width look-behind": lambda a, b, letter: f"(?<={a}q+){b}",
    "repeat count too large": lambda a, b, letter: f"{a}q{{4294967296}}{b}",  # OverflowError, not re.error
}
"""Kinds of broken regex; each is wrapped in random literal text, which cannot repair it."""


@st.composite
def invalid_regexes(draw) -> str:
    """``[r]`` + a regex that ``re.compile`` refuses."""
    build_regex = INVALID_REGEXES[draw(st.sampled_from(sorted(INVALID_REGEXES)))]
    literal = st.text("qk01_", max_size=3)
    expression = build_regex(draw(literal), draw(literal), draw(st.sampled_from("ceghijklmopqyzCEGHIJKLMOPQTVXY")))
    with pytest.raises((re.error, OverflowError)):  # the harness really produced a broken regex
        re.compile(expression)
    return "[r]" + expression


def tree() -> nn.Module:
    """A small fixed backbone for the error paths, which do not depend on the tree."""
    return build(LAYERS_1_AND_10)


@checked(150)
@given(
    bad=invalid_regexes(),
    others=st.lists(st.sampled_from(["query", r"[r]\d+\.uery", "q"]), max_size=3),
    position=st.integers(0, 3),
    argument=st.sampled_from(["modified_modules", "exclude_modules"]),
)
@example(bad="[r]q{4294967296}", others=[], position=0, argument="modified_modules")  # was a bare OverflowError
def test_an_invalid_regex_is_refused_naming_the_argument_and_the_entry(bad, others, position, argument):
    entries = [*others[:position], bad, *others[position:]]
    given_lists = {"modified_modules": ["query"], "exclude_modules": None, argument: entries}
    with pytest.raises(AddressingError) as info:
        resolve_targets(tree(), given_lists["modified_modules"], given_lists["exclude_modules"], (), None, "Test")
    message = str(info.value)
    assert not isinstance(info.value, ModuleNotFoundInStructureError)
    assert f"{argument} entry {bad!r} is not a valid regular expression" in message


@checked(100)
@given(
    bad=st.text(" \t\n", max_size=3) | st.sampled_from(["[r]", "[r]  "]) | st.none() | st.integers() | st.binary(),
    others=st.lists(st.sampled_from(["query", "[r]q.*"]), max_size=3),
    position=st.integers(0, 3),
    argument=st.sampled_from(["modified_modules", "exclude_modules"]),
)
@example(bad="[r]", others=["query"], position=1, argument="exclude_modules")  # was accepted, matching nothing
def test_a_blank_or_non_string_entry_is_refused_naming_the_argument_and_the_entry(bad, others, position, argument):
    entries = [*others[:position], bad, *others[position:]]
    given_lists = {"modified_modules": ["query"], "exclude_modules": None, argument: entries}
    with pytest.raises(AddressingError, match=re.escape(argument)) as info:
        resolve_targets(tree(), given_lists["modified_modules"], given_lists["exclude_modules"], (), None, "Test")
    assert repr(bad) in str(info.value)


def test_a_regex_nested_too_deep_for_the_parser_is_an_addressing_error():
    """Regression: ``re`` raises RecursionError (not re.error) here, which used to escape unexplained.

    A Python whose parser copes may compile it; what must never happen is a bare RecursionError.
    """
    deep = "[r]" + "(" * 2000 + "q" + ")" * 2000
    try:
        compile_patterns([deep], "exclude_modules")
    except AddressingError as error:
        assert "exclude_modules entry" in str(error)


@pytest.mark.parametrize("argument", ["modified_modules", "exclude_modules"])
@pytest.mark.parametrize(
    "value, says",
    [
        ("query", "must be a list of strings, got the string 'query'; use ['query']"),
        (b"query", "must be a list of strings, got the string b'query'"),  # iterating it would give integers
        (3, "must be a list of strings, got 3 (int)"),  # a TypeError from the for loop before
    ],
)
def test_a_value_that_is_not_a_list_of_strings_is_refused_saying_what_to_pass(argument, value, says):
    given_lists = {"modified_modules": ["query"], "exclude_modules": None, argument: value}
    with pytest.raises(AddressingError) as info:
        resolve_targets(tree(), given_lists["modified_modules"], given_lists["exclude_modules"], (), None, "Test")
    assert f"{argument} {says}" in str(info.value)


def test_an_error_about_a_generator_quotes_all_of_it():
    with pytest.raises(AddressingError, match=re.escape("got '' in ['query', '']")):
        compile_patterns(p for p in ["query", ""])


@pytest.mark.parametrize("defaults", [(), ("attn.q", "attn.v")])
def test_an_empty_modified_modules_is_refused_not_replaced_by_the_defaults(defaults):
    """``[]`` designates nothing; the original silently modified nothing, defaults would modify what nobody named."""
    with pytest.raises(ModuleNotFoundInStructureError, match=r"empty modified_modules list") as info:
        resolve_targets(tree(), [], None, defaults, None, "Test")
    assert ("(None) for the defaults ['attn.q', 'attn.v']" in str(info.value)) == bool(defaults)
    with pytest.raises(ModuleNotFoundInStructureError, match=r"empty modified_modules list"):
        find_matches(names_of(LAYERS_1_AND_10), [])


def test_no_modified_modules_and_no_defaults_says_to_name_them():
    with pytest.raises(
        ModuleNotFoundInStructureError,
        match=r"Test has no default modified_modules, so no module would be modified; name the",
    ):
        resolve_targets(tree(), None, None, (), None, "Test")


def test_an_empty_exclude_modules_excludes_nothing():
    """An empty exclusion list is harmless, unlike an empty target list: it means the same as ``None``."""
    model = tree()
    with_empty = [t.name for t in resolve_targets(model, ["query"], [], (), None, "Test")]
    assert with_empty == [t.name for t in resolve_targets(model, ["query"], None, (), None, "Test")]
    assert len(with_empty) == 11


@pytest.mark.parametrize(
    "kwargs, error, says",
    [
        ({"modified_modules": []}, ModuleNotFoundInStructureError, "ToyModel got an empty modified_modules list"),
        ({"modified_modules": ["[r](q"]}, AddressingError, "modified_modules entry '[r](q' is not a valid"),
        ({"modified_modules": ["q"], "exclude_modules": ["[r]"]}, AddressingError, "exclude_modules entry '[r]'"),
        ({"modified_modules": ["10.qu"]}, ModuleNotFoundInStructureError, "'10.qu' matched no module"),
    ],
)
def test_the_same_errors_reach_a_delta_model_user(toy, kwargs, error, says):
    model = tree()
    keys = list(model.state_dict())
    with pytest.raises(error, match=re.escape(says)):
        toy(model, **kwargs)
    assert list(model.state_dict()) == keys
