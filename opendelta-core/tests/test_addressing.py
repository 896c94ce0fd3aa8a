import pytest

from opendelta.addressing import compile_patterns, find_matches, is_excluded
from opendelta.errors import AddressingError, ModuleNotFoundInStructureError

NAMES = [
    "roberta.encoder.layer.0.attention.self.query",
    "roberta.encoder.layer.0.attention.output.dense",
    "roberta.encoder.layer.0.output.dense",
    "roberta.encoder.layer.1.attention.output.dense",
    "roberta.encoder.layer.1.output.dense",
    "roberta.encoder.layer.10.output.dense",
    "classifier.dense",
]


def matches(patterns, exclude=(), **kw):
    return find_matches(NAMES, compile_patterns(patterns), compile_patterns(exclude, "exclude_modules"), **kw)


def test_end_matching_is_on_whole_components():
    assert matches(["query"]) == [NAMES[0]]
    with pytest.raises(ModuleNotFoundInStructureError):
        matches(["uery"])
    assert matches(["attention.output.dense"]) == [NAMES[1], NAMES[3]]
    assert matches(["0.attention.output.dense"]) == [NAMES[1]]


def test_regex_must_match_a_whole_dotted_suffix():
    assert matches([r"[r](\d)+\.output.dense"]) == [NAMES[2], NAMES[4], NAMES[5]]
    assert matches([r"[r][0-5]\.attention.output.dense"]) == [NAMES[1], NAMES[3]]
    with pytest.raises(ModuleNotFoundInStructureError):
        matches([r"[r]utput\.dense"])  # starts mid-component


def test_exclusion_by_full_prefix_does_not_catch_layer_10():
    assert matches(["output.dense"], exclude=["roberta.encoder.layer.1"]) == [NAMES[1], NAMES[2], NAMES[5]]


def test_exclusion_by_a_component_anywhere():
    assert matches(["dense"], exclude=["attention"]) == [NAMES[2], NAMES[4], NAMES[5], NAMES[6]]
    assert is_excluded("a.b.c", compile_patterns(["b"]))
    assert not is_excluded("a.bb.c", compile_patterns(["b"]))


def test_error_echoes_patterns_and_suggests_close_names():
    with pytest.raises(ModuleNotFoundInStructureError) as info:
        matches(["qeury", "output.dense"])
    message = str(info.value)
    assert "qeury" in message and "'query'" in message and "output.dense" in message


def test_everything_excluded_is_an_error():
    with pytest.raises(ModuleNotFoundInStructureError, match="excluded all"):
        matches(["query"], exclude=["roberta"])


@pytest.mark.parametrize("bad", ["query", [""], [3], ["[r](unclosed"]])
def test_invalid_patterns_name_the_argument(bad):
    with pytest.raises(AddressingError, match="modified_modules"):
        compile_patterns(bad)


def test_nothing_matches_twice():
    assert matches(["dense", "output.dense", "[r].*dense"]).count(NAMES[2]) == 1
