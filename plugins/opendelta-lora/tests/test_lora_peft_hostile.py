"""PEFT adapters get the native format's checks: wrong fields, bad values and damaged files are refused, naming them.

One adapter is trained and saved by the REAL peft library (safetensors, and the pickle older PEFT wrote); each case
breaks one thing in a copy: a field of ``adapter_config.json`` (``r: "abc"``, ``r: 2.7``, ``2**70``...), one
tensor (``opendelta.testing.hostile``: NaN, integers, complex, float64 ``1e300``; sparse, meta, nested, quantized
in the pickle), or the file itself (truncated, garbage, a zip bomb). Loading must raise ``CheckpointError`` naming
the file and the field or tensor, and leave the backbone exactly as it was (``opendelta.testing.Pristine``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from opendelta import AutoDeltaModel, CheckpointError
from opendelta.errors import OpenDeltaError
from opendelta.testing import Pristine, model_output_tensor, tiny_inputs, tiny_model
from opendelta.testing.hostile import BAD_VALUES, ODD_TENSORS, damage_garbage, damage_truncate, write_zip_bomb
from opendelta_lora import load_peft_adapter
from opendelta_lora.peft_format import lora_config_from_peft

peft = pytest.importorskip("peft")

LORA_A = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"
"""A LoRA tensor of the adapter, as PEFT names it in the file."""


def run(model):
    with torch.no_grad():
        return model_output_tensor(model(**tiny_inputs("bert")))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A PEFT LoRA on tiny BERT with its head, moved as training would, saved both ways: safetensors and pickle."""
    model = peft.get_peft_model(
        tiny_model("bert"), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query"], modules_to_save=["classifier"])
    )
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)
    root = tmp_path_factory.mktemp("peft")
    model.save_pretrained(root / "safetensors")
    model.save_pretrained(root / "pickle", safe_serialization=False)
    return root


@pytest.fixture
def adapter(trained, tmp_path):
    return Path(shutil.copytree(trained / "safetensors", tmp_path / "adapter"))


@pytest.fixture
def pickled(trained, tmp_path):
    return Path(shutil.copytree(trained / "pickle", tmp_path / "pickled"))


def head_name(tensors: dict) -> str:
    """The head's weight under the name this PEFT version saves it (with or without ``modules_to_save.``)."""
    return next(n for n in tensors if n.startswith("base_model.model.classifier") and n.endswith("weight"))


def assert_refused(folder: Path, message: str, loaders=(load_peft_adapter, AutoDeltaModel.from_finetuned)):
    """``load_peft_adapter`` and ``from_finetuned`` both refuse ``folder`` with ``message``; nothing changes."""
    for load in loaders:
        backbone = tiny_model("bert")
        pristine, before = Pristine.of(backbone), run(backbone)
        with pytest.raises(CheckpointError, match=message) as raised:
            load(folder, backbone)
        assert isinstance(raised.value, OpenDeltaError)
        pristine.assert_unchanged(backbone)
        assert torch.equal(run(backbone), before)
    return raised.value


def test_the_untouched_adapter_loads(adapter, pickled):
    """The control: both files load, so each refusal below is the one change's doing."""
    for folder in (adapter, pickled):
        load_peft_adapter(folder, tiny_model("bert"))


FIELDS = [
    ("r", "abc", "a positive integer"),
    ("r", 2.7, "a positive integer"),
    ("r", True, "a positive integer"),
    ("r", 0, "a positive integer"),
    ("r", -4, "a positive integer"),
    ("r", None, "a positive integer"),
    ("r", [4], "a positive integer"),
    ("r", 2**63, "a positive integer .*, got an integer beyond int64"),
    ("r", 2**70, "a positive integer .*, got an integer beyond int64"),
    ("lora_alpha", "8", "a positive finite number"),
    ("lora_alpha", 0, "a positive finite number"),
    ("lora_alpha", 10**400, "a positive finite number, got an integer beyond int64"),
    ("lora_alpha", False, "a positive finite number"),
    ("lora_dropout", "0.1", r"a number in \[0, 1\)"),
    ("lora_dropout", 1.5, r"a number in \[0, 1\)"),
    ("lora_dropout", -0.1, r"a number in \[0, 1\)"),
    ("use_rslora", "yes", "true or false"),
    ("use_rslora", 1, "true or false"),
    ("fan_in_fan_out", "false", "true or false"),
    ("target_modules", 5, "a list of module names or one regular expression"),
    ("target_modules", ["query", 1], "a list of module names or one regular expression"),
    ("target_modules", {"query": True}, "a list of module names or one regular expression"),
    ("exclude_modules", 3, "a list of module names or one regular expression"),
    ("modules_to_save", "classifier", "a list of module names"),
    ("layers_to_transform", "0", "a layer index or a list of them"),
    ("layers_to_transform", [0, -1], "a layer index or a list of them"),
    ("layers_pattern", 7, "a name or a list of names"),
    ("bias", 0, "one of 'none', 'all', 'lora_only'"),
    ("peft_type", ["LORA"], r"a string \('LORA'\)"),
    ("task_type", 1, "a task name"),
]
"""(field, a value PEFT never writes there, what the message says it must be)."""


@pytest.mark.parametrize(("field", "value", "must"), FIELDS, ids=[f"{f}={v!r}"[:40] for f, v, _ in FIELDS])
def test_a_wrongly_typed_field_is_refused_naming_file_and_field(adapter, field, value, must):
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, field: value}))
    # from_finetuned picks the reader by peft_type, so a wrong one is refused there before (see test_lora_peft_...)
    loaders = (load_peft_adapter,) if field == "peft_type" else (load_peft_adapter, AutoDeltaModel.from_finetuned)
    assert_refused(adapter, rf"adapter_config\.json: field '{field}' must be {must}", loaders)


@pytest.mark.parametrize("r", ["abc", 2.7, 2**70])
def test_a_config_given_directly_is_checked_too(r):
    config = {"peft_type": "LORA", "r": r, "lora_alpha": 8, "target_modules": ["query"]}
    with pytest.raises(CheckpointError, match="the PEFT adapter: field 'r' must be a positive integer"):
        lora_config_from_peft(config, tiny_model("bert"))


def test_a_huge_or_nested_adapter_config_is_refused_before_parsing(adapter):
    (adapter / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)
    assert_refused(adapter, r"cannot read delta config .*adapter_config\.json")


@pytest.mark.parametrize("where", ["lora", "head"])
@pytest.mark.parametrize("case", BAD_VALUES)
def test_safetensors_values_that_are_not_weights_are_refused(adapter, case, where):
    make, message = BAD_VALUES[case]
    path = adapter / "adapter_model.safetensors"
    tensors = load_file(path)
    name = LORA_A if where == "lora" else head_name(tensors)
    save_file({**tensors, name: make(tensors[name])}, path)
    error = assert_refused(adapter, message)
    module = name.removeprefix("base_model.model.").rpartition(".")[0]  # the head's is the task head copy's name
    assert "adapter_model.safetensors" in str(error) and module[:20] in str(error)


@pytest.mark.parametrize("case", {**BAD_VALUES, **ODD_TENSORS})
def test_pickled_tensors_that_are_not_weights_are_refused(pickled, case):
    make, message = {**BAD_VALUES, **ODD_TENSORS}[case]
    path = pickled / "adapter_model.bin"
    tensors = torch.load(path, weights_only=True)
    torch.save({**tensors, LORA_A: make(tensors[LORA_A])}, path)
    assert "adapter_model.bin" in str(assert_refused(pickled, message))


def test_a_pickled_zip_bomb_is_refused_before_reading(pickled):
    path = pickled / "adapter_model.bin"
    write_zip_bomb(path, torch.load(path, weights_only=True))
    assert path.stat().st_size < 200_000
    assert_refused(pickled, r"adapter_model\.bin \(.* bytes on disk\) would take .* refused before reading")


DAMAGE = {
    "truncated": damage_truncate,
    "empty": lambda p: damage_truncate(p, keep=0),
    "garbage": damage_garbage,
    "garbage with a huge header length": lambda p: damage_garbage(p, prefix=(2**62).to_bytes(8, "little")),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_a_damaged_safetensors_file_is_refused_naming_it(adapter, case):
    DAMAGE[case](adapter / "adapter_model.safetensors")
    assert_refused(adapter, r"adapter_model\.safetensors is not a readable safetensors file")


@pytest.mark.parametrize("case", DAMAGE)
def test_a_damaged_pickle_is_refused_naming_it(pickled, case):
    DAMAGE[case](pickled / "adapter_model.bin")
    assert_refused(pickled, r"adapter_model\.bin (as a torch\.save file|holds .*or it is not a torch)")
