"""A PEFT adapter folder whose files are links out of it is refused, by the rule OpenDelta's own format follows.

The adapters are trained and saved by the REAL peft library; each case then replaces one of the folder's files with
a link to an identical copy outside the folder, so that without the check the load would succeed, reading a file
the folder does not hold (``opendelta.saving.contained_file``, the native format's rule, decides).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from test_lora_peft_interchange import train_with_peft

from opendelta import AutoDeltaModel, CheckpointError
from opendelta.testing import Pristine, tiny_model
from opendelta_lora import load_peft_adapter

pytest.importorskip("peft")


def _link_out(folder: Path, name: str) -> None:
    """Move ``folder/name`` beside the folder and leave a link to it in its place."""
    outside = folder.parent / f"outside-{name}"
    shutil.move(folder / name, outside)
    (folder / name).symlink_to(outside)


@pytest.mark.parametrize(
    ("name", "pickled"),
    [("adapter_model.safetensors", False), ("adapter_model.bin", True), ("adapter_config.json", False)],
)
@pytest.mark.parametrize("loader", ["load_peft_adapter", "from_finetuned"])
def test_a_peft_file_linking_out_of_its_folder_is_refused(name, pickled, loader, tmp_path):
    folder = tmp_path / "adapter"
    train_with_peft("bert", {"target_modules": ["query", "value"]}, folder, safe_serialization=not pickled)
    _link_out(folder, name)
    model = tiny_model("bert")
    before = Pristine.of(model)
    load = load_peft_adapter if loader == "load_peft_adapter" else AutoDeltaModel.from_finetuned
    with pytest.raises(CheckpointError, match=rf"{name}' in .* is a link that leads outside the checkpoint folder"):
        load(folder, model)
    assert before.differences(model) == []


def test_a_link_that_stays_in_the_folder_is_followed(tmp_path):
    folder = tmp_path / "adapter"
    train_with_peft("bert", {"target_modules": ["query", "value"]}, folder)
    (folder / "adapter_model.safetensors").rename(folder / "weights-v1.safetensors")
    (folder / "adapter_model.safetensors").symlink_to("weights-v1.safetensors")
    load_peft_adapter(folder, tiny_model("bert"))
