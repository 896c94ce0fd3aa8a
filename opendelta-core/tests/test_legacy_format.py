"""Core's reading of OpenDelta 0.3.x checkpoints, with the test-only toy method (no method plugin installed).

A legacy folder is written here the way the original's ``save_finetuned`` wrote one: ``config.json`` with its
fields (``@`` common names, the md5 hash, its versions) and ``torch.save`` of the trainable state dict as
``pytorch_model.bin``. ``tests/test_legacy_checkpoints.py`` checks checkpoints made by the real original.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch
from toy_method import ToyModel

import opendelta
from opendelta import AutoDeltaModel, CheckpointError, DeltaConfigError
from opendelta.insertion import delta_parameter_names
from opendelta.legacy import is_legacy_checkpoint, read_legacy_weights, strip_legacy_names
from opendelta.testing import perturb, tiny_inputs, tiny_model

ORIGINAL_CONFIG = {
    "backbone_checkpoint_name": "",
    "backbone_class": "BertForSequenceClassification",
    "backbone_hash": "0123456789abcdef0123456789abcdef",
    "common_structure": True,
    "delta_type": "toy",
    "exclude_modules": ["lm_head"],
    "modified_modules": ["attn@.proj@", "ff@.w2@"],
    "opendelta_version": "0.3.0",
    "transformers_version": "4.45.2",
    "width": 3,
}


def outputs(model):
    with torch.no_grad():
        return model(**tiny_inputs("bert")).logits


def write_legacy(folder: Path, config: dict, tensors: object) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    torch.save(tensors, folder / "pytorch_model.bin")
    return folder


@pytest.fixture
def legacy(toy, tmp_path):
    """A toy delta trained on tiny BERT, saved as OpenDelta 0.3.x saved it, with the outputs it gives."""
    model = tiny_model("bert")
    delta_model = toy(model)
    perturb(delta_model)
    folder = write_legacy(tmp_path / "legacy", ORIGINAL_CONFIG, delta_model.delta_state_dict())
    return folder, outputs(model)


def test_a_legacy_checkpoint_loads_with_its_outputs(legacy, caplog):
    folder, expected = legacy
    model = tiny_model("bert")
    with caplog.at_level(logging.WARNING, logger="opendelta.legacy"):
        delta_model = AutoDeltaModel.from_finetuned(folder, backbone_model=model)
    assert torch.equal(outputs(model), expected)
    config = delta_model.config
    # the spelled-out defaults ('attn@.proj@', 'ff@.w2@') are the defaults; the md5 is not kept (nor checked)
    assert config.modified_modules is None and config.common_structure is None and config.width == 3
    assert config.backbone_hash is None and config.backbone_checkpoint_name is None
    assert "0123456789abcdef0123456789abcdef" in caplog.text and "names and shapes only" in caplog.text


def test_other_common_names_stay_common_names(toy, tmp_path):
    model = tiny_model("bert")
    delta_model = toy(model, modified_modules=["ff.w2"], common_structure=True)
    perturb(delta_model)
    config = {**ORIGINAL_CONFIG, "modified_modules": ["ff@.w2@"]}
    folder = write_legacy(tmp_path / "legacy", config, delta_model.delta_state_dict())
    fresh = tiny_model("bert")
    loaded = AutoDeltaModel.from_finetuned(folder, backbone_model=fresh)
    assert loaded.config.modified_modules == ["ff.w2"] and loaded.config.common_structure
    assert torch.equal(outputs(fresh), outputs(model))


def test_a_checkpoint_of_this_library_is_not_legacy(legacy, toy, tmp_path):
    folder, _ = legacy
    assert is_legacy_checkpoint(folder, json.loads((folder / "config.json").read_text()))
    model = tiny_model("bert")
    delta_model = toy(model)
    delta_model.freeze_module()
    delta_model.save_finetuned(tmp_path / "new")
    (tmp_path / "new" / "pytorch_model.bin").write_bytes(b"")  # a stray file does not make it legacy
    assert not is_legacy_checkpoint(tmp_path / "new", json.loads((tmp_path / "new" / "config.json").read_text()))


def test_method_hooks_translate_renamed_fields_and_tensors(toy, tmp_path):
    class RenamedFieldToy(ToyModel):
        """As if the toy's original had called its field ``old_width``..."""

        @classmethod
        def translate_legacy_config(cls, config):
            config = dict(config)
            config["width"] = config.pop("old_width")
            return config

    class RenamedToy(RenamedFieldToy):
        """...and its delta ``old_toy``."""

        def translate_legacy_state_dict(self, tensors):
            return {name.replace(".old_toy.", ".toy."): t for name, t in tensors.items()}

    model = tiny_model("bert")
    delta_model = toy(model)
    perturb(delta_model)
    saved = {name.replace(".toy.", ".old_toy."): t for name, t in delta_model.delta_state_dict().items()}
    config = {k: v for k, v in ORIGINAL_CONFIG.items() if k != "width"} | {"old_width": 5}
    folder = write_legacy(tmp_path / "legacy", config, saved)
    with pytest.raises(DeltaConfigError, match=r"unknown field\(s\) \['old_width'\]"):
        ToyModel.from_finetuned(folder, tiny_model("bert"))  # without the hooks: refused, naming what is unknown
    with pytest.raises(CheckpointError, match=r"unexpected \['bert\.encoder\.layer\.0\.attention\.output\.dense\.old"):
        RenamedFieldToy.from_finetuned(folder, tiny_model("bert"))
    fresh = tiny_model("bert")
    assert RenamedToy.from_finetuned(folder, fresh).config.width == 5
    assert torch.equal(outputs(fresh), outputs(model))


@pytest.mark.parametrize(
    ("patterns", "common", "expected"),
    [
        (["attn@.q@", "attn@.v@"], True, (["attn.q", "attn.v"], True)),
        (["query", "value"], None, (["query", "value"], False)),
        (["classifier"], True, (["classifier"], False)),  # the original matched unmapped modules by real name
        (None, True, (None, True)),
    ],
)
def test_strip_legacy_names(patterns, common, expected):
    assert strip_legacy_names(patterns, common, "modified_modules") == expected


def test_mixed_names_are_refused_naming_both_kinds():
    with pytest.raises(CheckpointError, match=r"mixes common names \(\['attn@\.q@'\]\) with real module names"):
        strip_legacy_names(["attn@.q@", "classifier"], True, "modified_modules")


class RunsCode:
    """Unpickling this calls ``os.mkdir(marker)``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_code_in_the_pickle_is_refused_before_it_runs(toy, tmp_path):
    marker = tmp_path / "the-code-ran"
    folder = write_legacy(tmp_path / "legacy", ORIGINAL_CONFIG, {"a": torch.zeros(1), "b": RunsCode(marker)})
    model = tiny_model("bert")
    with pytest.raises(CheckpointError, match="refused without running them"):
        AutoDeltaModel.from_finetuned(folder, backbone_model=model)
    assert not marker.exists() and not delta_parameter_names(model)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ([torch.zeros(1)], "holds a list, not a state dict"),
        ({"x": torch.zeros(1), "step": 7}, "names to tensors only, but holds 'step': int"),
        ({"state_dict": {"x": torch.zeros(1)}}, "'state_dict': dict"),
    ],
)
def test_anything_but_a_flat_state_dict_is_refused(tmp_path, content, message):
    folder = write_legacy(tmp_path / "legacy", ORIGINAL_CONFIG, content)
    with pytest.raises(CheckpointError, match=message):
        read_legacy_weights(folder)


def test_a_damaged_file_is_reported(tmp_path):
    folder = write_legacy(tmp_path / "legacy", ORIGINAL_CONFIG, {"x": torch.zeros(3)})
    data = (folder / "pytorch_model.bin").read_bytes()
    (folder / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cannot read .*pytorch_model\.bin as a torch\.save file"):
        read_legacy_weights(folder)


def test_a_folder_in_another_format_goes_to_the_plugin_that_reads_it(toy, tmp_path):
    """Core knows no other library's format: a plugin's ``read_checkpoint`` hook reads it into a record."""
    from toy_method import ToyConfig

    from opendelta.checkpoint_record import CheckpointRecord
    from opendelta.plugins import pm

    folder = tmp_path / "foreign"
    folder.mkdir()
    (folder / "their_config.json").write_text(json.dumps({"kind": "toy"}))
    model = tiny_model("bert")
    with pytest.raises(CheckpointError, match=r"holds no config\.json: not a delta checkpoint"):
        AutoDeltaModel.from_finetuned(folder, backbone_model=model)  # no plugin reads it

    class Reader:
        @opendelta.hookimpl
        def read_checkpoint(self, folder, backbone, delta_cls):
            if not (folder / "their_config.json").is_file():
                return None
            built = ToyModel(tiny_model("bert"))
            tensors = {n: torch.full_like(t, 0.5) for n, t in built.delta_state_dict().items()}
            return CheckpointRecord(str(folder), str(folder), ToyModel, ToyConfig(), tensors, describe="a toy folder")

    class Broken:
        @opendelta.hookimpl(tryfirst=True)
        def read_checkpoint(self, folder):
            raise RuntimeError("cannot parse")

    pm.register(Reader(), name="toy-reader")
    pm.register(Broken(), name="broken-reader")
    try:
        with pytest.warns(opendelta.OpenDeltaPluginWarning, match="broken-reader.*raised inside read_checkpoint"):
            loaded = AutoDeltaModel.from_finetuned(folder, backbone_model=model)
        assert isinstance(loaded, ToyModel)
        assert all(bool((t == 0.5).all()) for t in loaded.delta_state_dict().values())
        loaded.detach()
        pm.unregister(name="broken-reader")  # reported once above; the refusal of options is what is checked now
        with pytest.raises(CheckpointError, match="a toy folder: its config and weights are its own; pass no options"):
            ToyModel.from_finetuned(folder, model, width=2)
    finally:
        for name in ("toy-reader", "broken-reader"):
            if pm.get_plugin(name) is not None:
                pm.unregister(name=name)
