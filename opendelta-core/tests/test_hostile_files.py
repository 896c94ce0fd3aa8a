"""Every checkpoint format gets the native format's checks: the same hostile tensors and files, refused the same way.

This library's safetensors checkpoints and OpenDelta 0.3.x ``pytorch_model.bin`` files are loaded with each case of
``opendelta.testing.hostile``: values that are not trained weights (NaN, integers, complex, a float64 ``1e300``
that overflows the float32 parameter), tensors that are not dense values (sparse, meta, nested, quantized), a zip
that inflates to far more than a delta can hold, damaged files, and sizes beyond int64 in the config. Each load must
raise a ``CheckpointError`` (``DeltaConfigError`` for the config) naming the file and the culprit, and leave the
backbone exactly as it was. The PEFT format's cases are in the LoRA plugin's ``test_lora_peft_hostile.py``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from opendelta import AutoDeltaModel, CheckpointError, DeltaConfigError
from opendelta.errors import OpenDeltaError
from opendelta.legacy import legacy_size_limit
from opendelta.tensor_checks import checked_tensors
from opendelta.testing import Pristine, perturb, tiny_inputs, tiny_model
from opendelta.testing.hostile import (
    BAD_VALUES,
    ODD_TENSORS,
    damage_garbage,
    damage_truncate,
    write_deflated,
    write_zip_bomb,
)

LEGACY_CONFIG = {
    "backbone_checkpoint_name": "",
    "backbone_class": "BertForSequenceClassification",
    "backbone_hash": "0123456789abcdef0123456789abcdef",
    "common_structure": True,
    "delta_type": "toy",
    "modified_modules": ["attn@.proj@", "ff@.w2@"],
    "opendelta_version": "0.3.0",
    "transformers_version": "4.45.2",
    "width": 3,
}
"""The config OpenDelta 0.3.x wrote for the toy delta on tiny BERT (see test_legacy_format.py)."""

WHERE = {"delta": lambda tensors: next(k for k in tensors if ".toy." in k), "head": lambda tensors: "classifier.weight"}
"""Which tensor a case replaces: one of the delta's, or the trained task head's (a backbone parameter)."""


def outputs(model):
    with torch.no_grad():
        return model(**tiny_inputs("bert")).logits


def trained(toy):
    """A toy delta with its task head, trained (perturbed) on tiny BERT: the tensors a checkpoint holds."""
    delta_model = toy(tiny_model("bert"))
    perturb(delta_model)
    delta_model.freeze_module(exclude=["deltas", "classifier"])
    return delta_model


@pytest.fixture
def native(toy, tmp_path):
    return trained(toy).save_finetuned(tmp_path / "native")


@pytest.fixture
def legacy(toy, tmp_path):
    """A folder as OpenDelta 0.3.x saved it, and the state dict its pytorch_model.bin holds."""
    delta_model = trained(toy)
    tensors = {**delta_model.delta_state_dict(), **{"classifier.weight": delta_model.backbone_model.classifier.weight}}
    tensors = {k: v.detach().clone() for k, v in tensors.items()}
    folder = tmp_path / "legacy"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LEGACY_CONFIG))
    torch.save(tensors, folder / "pytorch_model.bin")
    return folder, tensors


def rewrite_native(folder: Path, edit) -> None:
    """Rewrite the safetensors weights with ``edit`` applied, and their sha256, so only the tensors are wrong."""
    config = json.loads((folder / "config.json").read_text())
    path = folder / config["weights_file"]
    save_file(edit(load_file(path)), path)
    config["weights_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (folder / "config.json").write_text(json.dumps(config))


def assert_refused(folder: Path, error: type[Exception], message: str, **options) -> Exception:
    """Loading ``folder`` raises ``error`` matching ``message``, an OpenDeltaError, and changes nothing."""
    backbone = tiny_model("bert")
    pristine, before = Pristine.of(backbone), outputs(backbone)
    with pytest.raises(error, match=message) as raised:
        AutoDeltaModel.from_finetuned(folder, backbone, **options)
    assert isinstance(raised.value, OpenDeltaError), f"a raw {type(raised.value).__name__} escaped"
    pristine.assert_unchanged(backbone)
    assert torch.equal(outputs(backbone), before)
    return raised.value


@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("case", BAD_VALUES)
def test_native_values_that_are_not_weights_are_refused(native, case, where):
    make, message = BAD_VALUES[case]
    replaced = []

    def edit(tensors):
        replaced.append(WHERE[where](tensors))
        return {**tensors, replaced[0]: make(tensors[replaced[0]])}

    rewrite_native(native, edit)
    error = assert_refused(native, CheckpointError, message)
    assert f".safetensors: {replaced[0]!r}" in str(error)


LEGACY_CASES = {**BAD_VALUES, **ODD_TENSORS}
"""A pickle holds every case: values that are not weights, and tensors that are not dense values."""


@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("case", LEGACY_CASES)
def test_legacy_tensors_that_are_not_weights_are_refused_naming_file_and_tensor(legacy, case, where):
    folder, tensors = legacy
    make, message = LEGACY_CASES[case]
    name = WHERE[where](tensors)
    torch.save({**tensors, name: make(tensors[name])}, folder / "pytorch_model.bin")
    error = assert_refused(folder, CheckpointError, message)
    assert f"pytorch_model.bin: {name!r}" in str(error)


@pytest.mark.parametrize("case", ODD_TENSORS)
def test_odd_tensors_passed_as_a_state_dict_are_refused(native, case):
    make, message = ODD_TENSORS[case]
    tensors = load_file(next(native.glob("*.safetensors")))
    name = WHERE["delta"](tensors)
    assert_refused(native, CheckpointError, message, state_dict={**tensors, name: make(tensors[name])})


def test_a_small_zip_that_inflates_past_what_a_delta_can_hold_is_refused_before_reading(legacy):
    folder, tensors = legacy
    bomb = write_zip_bomb(folder / "pytorch_model.bin", tensors, inflated_bytes=32 << 20)
    assert bomb.stat().st_size < 200_000 < legacy_size_limit(tiny_model("bert")) < 32 << 20
    assert_refused(folder, CheckpointError, r"pytorch_model\.bin \(.* bytes on disk\) would take .* refused before")


def test_inspect_refuses_a_zip_bomb_without_a_backbone_to_bound_it(legacy):
    """``opendelta inspect`` has no backbone: a file may then inflate to MAX_INFLATION times its size, no more."""
    from opendelta.cli.inspect_cmd import describe

    folder, tensors = legacy
    write_zip_bomb(folder / "pytorch_model.bin", tensors, inflated_bytes=32 << 20)
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin \(.* bytes on disk\) would take .* refused before"):
        describe(str(folder))
    write_deflated(folder / "pytorch_model.bin", tensors)  # the control: a small deflated file is described
    assert describe(str(folder))["tensors"]["delta"]["count"] > 0


def test_a_deflated_legacy_file_within_the_bound_still_loads(legacy):
    """The control: compression itself is fine (torch.load inflates), only the declared size is bounded."""
    folder, tensors = legacy
    write_deflated(folder / "pytorch_model.bin", tensors)
    model = tiny_model("bert")
    AutoDeltaModel.from_finetuned(folder, model)
    assert torch.equal(model.classifier.weight, tensors["classifier.weight"])


def test_a_plain_pickle_larger_than_the_bound_is_refused(legacy, monkeypatch):
    folder, tensors = legacy
    import opendelta.legacy

    monkeypatch.setattr(opendelta.legacy, "LEGACY_SIZE_SLACK", 0)  # tiny BERT's bound without the slack: ~350 kB
    padding = torch.zeros(legacy_size_limit(tiny_model("bert")) // 4 + 1)
    torch.save({**tensors, "padding": padding}, folder / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    assert_refused(folder, CheckpointError, r"the file.* more than the .* a delta for this backbone can hold")


DAMAGE = {
    "truncated": lambda p: damage_truncate(p),
    "empty": lambda p: damage_truncate(p, keep=0),
    "garbage": lambda p: damage_garbage(p),
    "garbage that starts like a zip": lambda p: damage_garbage(p, prefix=b"PK\x03\x04"),
    "garbage that starts like a pickle": lambda p: damage_garbage(p, prefix=b"\x80\x02"),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_a_damaged_legacy_file_is_refused_naming_it(legacy, case):
    folder, _ = legacy
    DAMAGE[case](folder / "pytorch_model.bin")
    assert_refused(folder, CheckpointError, r"pytorch_model\.bin (as a torch\.save file|holds .*or it is not a torch)")


@pytest.mark.parametrize("case", DAMAGE)
def test_a_damaged_safetensors_file_is_refused_naming_it(native, case):
    config = json.loads((native / "config.json").read_text())
    DAMAGE[case](native / config["weights_file"])
    (native / "config.json").write_text(json.dumps({**config, "weights_sha256": None}))
    assert_refused(native, CheckpointError, rf"{config['weights_file']} is not a readable safetensors file")


@pytest.mark.parametrize("size", [2**63, 2**70, -(2**63) - 1, 10**400])
def test_sizes_beyond_int64_are_refused_by_field_name(native, legacy, size):
    config = json.loads((native / "config.json").read_text())
    (native / "config.json").write_text(json.dumps({**config, "width": size}))
    assert_refused(native, DeltaConfigError, r"ToyConfig\.width must be .*beyond int64")
    folder, _ = legacy
    (folder / "config.json").write_text(json.dumps({**LEGACY_CONFIG, "width": size}))
    assert_refused(folder, DeltaConfigError, r"ToyConfig\.width must be .*beyond int64")


def test_values_are_checked_after_the_cast_to_the_parameter_dtype():
    """float32 65536 is finite, float16 65536 is not: the dtype checked is the parameter's, not the file's."""
    target = torch.zeros(2, dtype=torch.float16)
    assert checked_tensors({"w": torch.tensor([1.0, 2.0])}, "f", targets={"w": target})["w"].dtype == torch.float16
    with pytest.raises(CheckpointError, match=r"f: 'w' holds values beyond the range of torch\.float16"):
        checked_tensors({"w": torch.tensor([1.0, 65536.0])}, "f", targets={"w": target})
