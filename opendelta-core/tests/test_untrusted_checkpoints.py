"""Checkpoints from strangers: every damaged or crafted file is refused, naming the problem, and changes nothing.

Each case takes a good checkpoint, breaks one thing in it (a config field, a path, a tensor), and loads it into a
fresh backbone. The load must raise the expected error, whose message names the culprit, and the backbone must be
exactly as before: weights, module tree, hooks, flags (``opendelta.testing.Pristine``) and outputs.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from opendelta import AutoDeltaModel, CheckpointError, DeltaConfigError, UnknownDeltaMethodError
from opendelta.errors import OpenDeltaError
from opendelta.saving import MAX_CONFIG_BYTES
from opendelta.testing import Pristine, perturb, tiny_inputs, tiny_model


def outputs(model):
    with torch.no_grad():
        return model(**tiny_inputs("bert")).logits


@pytest.fixture
def checkpoint(toy, tmp_path):
    model = tiny_model("bert")
    delta_model = toy(model)
    perturb(delta_model)
    delta_model.freeze_module(exclude=["deltas", "classifier"])
    return delta_model.save_finetuned(tmp_path / "ckpt")


def _config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def _write_config(folder: Path, config: dict) -> None:
    (folder / "config.json").write_text(json.dumps(config))


def _set(**fields):
    def edit(folder):
        _write_config(folder, {**_config(folder), **fields})

    return edit


def _tensors(edit_tensors):
    """Rewrite the weights file, and its sha256 in the config, so only the tensors are wrong."""

    def edit(folder):
        config = _config(folder)
        path = folder / config["weights_file"]
        tensors = edit_tensors(load_file(path))
        save_file(tensors, path)
        config["weights_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
        _write_config(folder, config)

    return edit


def _first_delta_key(tensors):
    return next(k for k in tensors if ".toy." in k)


def _symlink_out(folder):
    outside = folder.parent / "outside.safetensors"
    outside.write_bytes((folder / _config(folder)["weights_file"]).read_bytes())
    (folder / "link.safetensors").symlink_to(outside)
    _write_config(folder, {**_config(folder), "weights_file": "link.safetensors", "weights_sha256": None})


def _nested_json(folder):
    (folder / "config.json").write_text("[" * 100_000 + "]" * 100_000)


def _huge_config(folder):
    _write_config(folder, {**_config(folder), "padding": "x" * (MAX_CONFIG_BYTES + 1)})


def _truncate_weights(folder):
    config = _config(folder)
    path = folder / config["weights_file"]
    path.write_bytes(path.read_bytes()[:100])
    _write_config(folder, {**config, "weights_sha256": None})


def _garbage_weights(folder):
    config = _config(folder)
    (folder / config["weights_file"]).write_bytes(b"\xff" * 64 + os.urandom(256))
    _write_config(folder, {**config, "weights_sha256": None})


def _lying_header(folder):
    """A safetensors header whose length field claims 2**60 bytes."""
    config = _config(folder)
    (folder / config["weights_file"]).write_bytes((2**60).to_bytes(8, "little") + b"{}")
    _write_config(folder, {**config, "weights_sha256": None})


def _missing_weights(folder):
    (folder / _config(folder)["weights_file"]).unlink()


def _drop_delta(tensors):
    del tensors[_first_delta_key(tensors)]
    return tensors


def _extra(name, tensor):
    def edit(tensors):
        return {**tensors, name: tensor}

    return edit


def _reshape_delta(tensors):
    key = _first_delta_key(tensors)
    return {**tensors, key: torch.zeros(tensors[key].numel() + 1)}


def _reshape_head(tensors):
    return {**tensors, "classifier.weight": torch.zeros(7, 7)}


def _integer_delta(tensors):
    key = _first_delta_key(tensors)
    return {**tensors, key: tensors[key].to(torch.int64)}


def _nan_delta(tensors):
    key = _first_delta_key(tensors)
    bad = tensors[key].clone()
    bad[0] = float("nan")
    return {**tensors, key: bad}


def _inf_head(tensors):
    bad = tensors["classifier.weight"].clone()
    bad[0, 0] = float("inf")
    return {**tensors, "classifier.weight": bad}


CASES = [
    # config.json: what the delta is
    ("unknown delta_type", _set(delta_type="no_such_method"), UnknownDeltaMethodError, "Installed delta methods"),
    ("delta_type not a string", _set(delta_type=5), CheckpointError, "no delta_type"),
    ("delta_type missing", _set(delta_type=None), CheckpointError, "no delta_type"),
    ("another plugin's type", _set(delta_type="toy", written_by={"opendelta-x": "1.0"}), None, None),
    # config.json: field types and values
    ("int field as string", _set(width="3"), DeltaConfigError, r"ToyConfig\.width must be"),
    ("int field as float", _set(width=1.5), DeltaConfigError, r"ToyConfig\.width must be"),
    ("int field as bool", _set(width=True), DeltaConfigError, r"ToyConfig\.width must be"),
    ("negative size", _set(width=-1), DeltaConfigError, r"ToyConfig\.width must be >= 0"),
    ("patterns as a string", _set(modified_modules="attn"), DeltaConfigError, r"modified_modules must be"),
    ("patterns of numbers", _set(modified_modules=[1]), DeltaConfigError, r"modified_modules must be"),
    ("flag as string", _set(common_structure="yes"), DeltaConfigError, r"common_structure must be"),
    ("hash as number", _set(backbone_hash=5), DeltaConfigError, r"backbone_hash must be"),
    ("unfrozen as null", _set(unfrozen_modules=None), DeltaConfigError, r"unfrozen_modules must be"),
    ("unknown field", _set(run_this="import os"), DeltaConfigError, r"unknown field\(s\) \['run_this'\]"),
    # config.json: the weights file it points to
    ("path up and out", _set(weights_file="../outside.safetensors"), CheckpointError, "weights_file"),
    ("absolute path", _set(weights_file="/etc/passwd"), CheckpointError, "weights_file"),
    ("parent folder", _set(weights_file=".."), CheckpointError, "weights_file"),
    ("this folder", _set(weights_file="."), CheckpointError, "weights_file"),
    ("empty name", _set(weights_file=""), CheckpointError, "weights_file"),
    ("name not a string", _set(weights_file=42), CheckpointError, "weights_file"),
    ("backslash path", _set(weights_file="..\\outside.safetensors"), CheckpointError, "weights_file"),
    ("symlink out of the folder", _symlink_out, CheckpointError, "leads outside"),
    ("wrong sha256", _set(weights_sha256="0" * 64), CheckpointError, "damaged"),
    ("sha256 not a string", _set(weights_sha256=123), CheckpointError, "weights_sha256"),
    ("missing weights file", _missing_weights, CheckpointError, "missing"),
    # config.json itself
    ("config not JSON", lambda f: (f / "config.json").write_text("{not json"), CheckpointError, "cannot read"),
    ("config a list", lambda f: (f / "config.json").write_text("[1, 2]"), CheckpointError, "JSON object"),
    ("config not UTF-8", lambda f: (f / "config.json").write_bytes(b"\xff\xfe{}"), CheckpointError, "cannot read"),
    ("deeply nested JSON", _nested_json, CheckpointError, "cannot read"),
    ("huge config", _huge_config, CheckpointError, "not an OpenDelta config"),
    ("requires not a mapping", _set(requires="everything"), CheckpointError, "'requires' must map"),
    ("requires odd spec", _set(requires={"opendelta-core": "==1"}), CheckpointError, "not of the form"),
    # the weights
    ("truncated safetensors", _truncate_weights, CheckpointError, "not a readable safetensors"),
    ("garbage safetensors", _garbage_weights, CheckpointError, "not a readable safetensors"),
    ("header claims 2**60 bytes", _lying_header, CheckpointError, "not a readable safetensors"),
    ("delta tensor missing", _tensors(_drop_delta), CheckpointError, "missing"),
    ("unknown tensor", _tensors(_extra("bert.pooler.evil", torch.zeros(2))), CheckpointError, "unexpected"),
    (
        "a buffer's name",
        _tensors(_extra("bert.embeddings.position_ids", torch.zeros(3))),
        CheckpointError,
        "unexpected",
    ),
    ("delta shape", _tensors(_reshape_delta), CheckpointError, "shape mismatch"),
    ("head shape", _tensors(_reshape_head), CheckpointError, r"classifier\.weight: checkpoint \(7, 7\)"),
    ("integer tensor", _tensors(_integer_delta), CheckpointError, "not a floating-point tensor"),
    ("NaN in a delta", _tensors(_nan_delta), CheckpointError, "NaN or infinite"),
    ("inf in the head", _tensors(_inf_head), CheckpointError, "NaN or infinite"),
]
"""(what is wrong, how to make it so, the error, what its message must say); ``None``: it must load."""


@pytest.mark.parametrize(("case", "edit", "error", "message"), CASES, ids=[c[0] for c in CASES])
def test_a_bad_checkpoint_is_refused_and_changes_nothing(checkpoint, case, edit, error, message):
    edit(checkpoint)
    backbone = tiny_model("bert")
    pristine, before = Pristine.of(backbone), outputs(backbone)
    if error is None:  # a control: the harness would notice a load that changes things
        AutoDeltaModel.from_finetuned(checkpoint, backbone)
        assert Pristine.of(backbone).differences(backbone) == [] and pristine.differences(backbone)
        return
    with pytest.raises(error, match=message) as raised:
        AutoDeltaModel.from_finetuned(checkpoint, backbone)
    assert isinstance(raised.value, OpenDeltaError), f"{case}: a raw {type(raised.value).__name__} escaped"
    pristine.assert_unchanged(backbone)
    assert torch.equal(outputs(backbone), before)


def test_cases_are_counted_for_the_record():
    """The closing note of issue 7 reports how many bad inputs were tried; this keeps the list honest."""
    refused = [c for c in CASES if c[2] is not None]
    assert len(refused) == len(CASES) - 1 >= 40


def test_the_symlinks_of_a_hub_cache_snapshot_are_followed(checkpoint, tmp_path):
    """The Hub cache links snapshot files into ``blobs``: that is inside the repo, not an escape."""
    repo = tmp_path / "models--user--delta"
    snapshot, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for file in checkpoint.iterdir():
        (blobs / file.name).write_bytes(file.read_bytes())
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", file.name))
    AutoDeltaModel.from_finetuned(snapshot, tiny_model("bert"))
