"""Saving a delta into a folder that already holds things never loses the user's data (issue 12, item 1).

A save replaces only what it can prove it wrote: its config, the weights file that config names (or another of
its own content-named weights), its own temporaries and its own unedited model card. Every other file is compared
byte for byte before and after; a ``config.json`` that is not ours (a transformers model's, a Trainer
checkpoint's, anything else) makes the save refuse before it writes anything. Real folders throughout:
``save_pretrained`` of a tiny model, a real ``Trainer`` run, real safetensors files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from huggingface_hub.hf_api import RepoFile
from safetensors.torch import save_file

from opendelta import AutoDeltaConfig, AutoDeltaModel, CheckpointError
from opendelta.hub import stale_remote_weights
from opendelta.ownership import OWN_TMP_PREFIX, file_sha256, is_own_card
from opendelta.testing import perturb, tiny_inputs, tiny_model


def files_of(folder: Path) -> dict[str, bytes | str]:
    """Every entry under ``folder`` (recursively, links not followed): its bytes, a link's target, or ``<dir>``."""
    out: dict[str, bytes | str] = {}
    for root, dirs, names in os.walk(folder):
        for name in dirs + names:
            path = Path(root) / name
            key = str(path.relative_to(folder))
            if path.is_symlink():
                out[key] = f"-> {os.readlink(path)}"
            elif path.is_dir():
                out[key] = "<dir>"
            else:
                out[key] = path.read_bytes()
    return out


def outputs(model):
    with torch.no_grad():
        return model(**tiny_inputs("bert")).logits


def trained(toy, seed=0):
    model = tiny_model("bert")
    delta_model = toy(model)
    delta_model.freeze_module(exclude=["deltas", "classifier"])
    perturb(delta_model, seed=seed)
    return model, delta_model


def assert_refused_and_untouched(delta_model, folder: Path) -> None:
    before = files_of(folder)
    with pytest.raises(CheckpointError, match="another folder") as info:
        delta_model.save_finetuned(folder)
    assert str(folder / "config.json") in str(info.value)
    assert files_of(folder) == before, "a refused save wrote or removed something"
    with pytest.raises(CheckpointError, match="another folder"):  # the config saved on its own refuses too
        delta_model.config.save_finetuned(folder)
    assert files_of(folder) == before


def test_a_transformers_model_folder_is_refused_and_left_byte_identical(toy, tmp_path):
    folder = tmp_path / "bert"
    tiny_model("bert").save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["model_type"] == "bert"
    assert (folder / "model.safetensors").is_file()
    _, delta_model = trained(toy)
    assert_refused_and_untouched(delta_model, folder)
    with pytest.raises(CheckpointError, match="transformers model"):
        delta_model.save_finetuned(folder)


def test_a_trainer_output_dir_keeps_every_file_and_its_checkpoints_are_refused(toy, tmp_path):
    pytest.importorskip("accelerate", reason="the Trainer needs accelerate (installed in tests_all)")
    from transformers import Trainer, TrainingArguments

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            gen = torch.Generator().manual_seed(i)
            return {"input_ids": torch.randint(4, 99, (8,), generator=gen), "labels": torch.tensor(i % 3)}

    model, delta_model = trained(toy)
    out = tmp_path / "run"
    args = TrainingArguments(
        output_dir=str(out),
        use_cpu=True,
        report_to=[],
        max_steps=2,
        save_steps=2,
        per_device_train_batch_size=2,
        disable_tqdm=True,
        logging_strategy="no",
    )
    trainer = Trainer(model=model, args=args, train_dataset=Rows())
    trainer.train()
    checkpoint = out / "checkpoint-2"
    assert (checkpoint / "trainer_state.json").is_file() and (checkpoint / "config.json").is_file()
    assert_refused_and_untouched(delta_model, checkpoint)

    before = files_of(out)  # no config.json at the top yet: the delta may go there, beside the checkpoints
    delta_model.save_finetuned(out)
    after = files_of(out)
    assert {k: after[k] for k in before} == before, "a file of the Trainer's changed"
    model.eval()
    expected = outputs(model)
    fresh = tiny_model("bert")
    AutoDeltaModel.from_finetuned(out, fresh)  # the trained head is saved with the delta: the hash checks out
    torch.testing.assert_close(outputs(fresh), expected)

    (out / "config.json").unlink()  # the delta's: the Trainer's final save_model writes the model's config there
    trainer.save_model()
    assert "model_type" in json.loads((out / "config.json").read_text())
    assert_refused_and_untouched(delta_model, out)


def write_weights_lookalike(path: Path, delta_type: str = "toy") -> None:
    """A real safetensors file with the header metadata our writer uses (a user's backup copy, say)."""
    save_file({"x": torch.arange(4.0)}, str(path), metadata={"format": "pt", "delta_type": delta_type})


def test_files_whose_names_merely_look_like_ours_survive_two_saves(toy, tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    write_weights_lookalike(folder / "delta_model-backup.safetensors")
    write_weights_lookalike(folder / "delta_model-0123456789abcdef.safetensors")  # our name shape, not its digest
    write_weights_lookalike(folder / "delta_model.safetensors")
    (folder / "delta_model-fedcba9876543210.safetensors").write_bytes(b"not safetensors at all")
    (folder / "model.safetensors").write_bytes(b"the user's model")
    (folder / "pytorch_model.bin").write_bytes(b"the user's older weights")
    (folder / "notes.md").write_text("my notes\n")
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    user = files_of(folder)

    model, delta_model = trained(toy, seed=1)
    delta_model.save_finetuned(folder)
    perturb(delta_model, seed=2)
    delta_model.save_finetuned(folder)  # the second save removes the first's weights, nothing of the user's
    after = files_of(folder)
    assert {k: after[k] for k in user} == user
    ours = set(after) - set(user)
    config = json.loads((folder / "config.json").read_text())
    assert ours == {"config.json", "README.md", config["weights_file"]}
    expected = outputs(model)
    fresh = tiny_model("bert")
    AutoDeltaModel.from_finetuned(folder, fresh)
    torch.testing.assert_close(outputs(fresh), expected)


def test_hidden_files_like_our_temporaries_survive_and_ours_are_cleared(toy, tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / ".tmp-notes.md").write_text("draft\n")  # the prefix earlier versions used: not provably ours
    (folder / ".tmp-abc.json").write_text("{}")
    write_weights_lookalike(folder / ".tmp-xyz.safetensors")
    (folder / f"{OWN_TMP_PREFIX}dir").mkdir()  # our prefix, but a folder: we never make one
    (folder / f"{OWN_TMP_PREFIX}dir" / "inside.txt").write_text("kept")
    (tmp_path / "elsewhere.md").write_text("the user's file")
    (folder / f"{OWN_TMP_PREFIX}link.md").symlink_to(tmp_path / "elsewhere.md")  # our prefix, but a link
    user = files_of(folder)
    (folder / f"{OWN_TMP_PREFIX}killed.safetensors").write_bytes(b"half a weights file")  # ours: a killed save's
    (folder / f"{OWN_TMP_PREFIX}killed.json").write_text('{"delta_type": ')

    _, delta_model = trained(toy)
    delta_model.save_finetuned(folder)
    after = files_of(folder)
    assert {k: after[k] for k in user} == user
    assert not (folder / f"{OWN_TMP_PREFIX}killed.safetensors").exists()
    assert not (folder / f"{OWN_TMP_PREFIX}killed.json").exists()
    assert (tmp_path / "elsewhere.md").read_text() == "the user's file"


def test_an_edited_model_card_is_never_overwritten_and_ours_is_refreshed(toy, tmp_path):
    folder = tmp_path / "ckpt"
    _, delta_model = trained(toy)
    delta_model.save_finetuned(folder)
    card = folder / "README.md"
    assert is_own_card(card)
    delta_model.save_finetuned(folder, repo_id="someone/toy-delta")  # ours, unedited: rewritten
    assert '"someone/toy-delta"' in card.read_text() and is_own_card(card)

    edited = card.read_text().replace("A delta trained", "My delta, trained")
    card.write_text(edited)
    assert not is_own_card(card)
    delta_model.save_finetuned(folder, repo_id="someone/other")
    assert card.read_bytes() == edited.encode()

    unsealed = card.read_text().rsplit("\n<!-- opendelta card sha256:", 1)[0] + "\n"  # our old, unsealed format
    card.write_text(unsealed)
    delta_model.save_finetuned(folder)
    assert card.read_bytes() == unsealed.encode()


FOREIGN_CONFIGS = {
    "transformers": b'{"model_type": "bert", "architectures": ["BertModel"], "hidden_size": 32}',
    "delta-and-model": b'{"delta_type": "toy", "written_by": {}, "model_type": "bert"}',
    "delta_type-only": b'{"delta_type": "toy"}',
    "empty-delta_type": b'{"delta_type": "", "written_by": {}}',
    "other-json": b'{"learning_rate": 0.001, "epochs": 3}',
    "json-list": b'["delta_type", "written_by"]',
    "not-json": b"delta_type = toy\n",
    "not-utf8": b'{"delta_type": "\xff\xfe"}',
    "huge": b'{"delta_type": "toy", "written_by": {}, "pad": "' + b"x" * (1 << 20) + b'"}',
}


@pytest.mark.parametrize("content", FOREIGN_CONFIGS.values(), ids=FOREIGN_CONFIGS.keys())
def test_any_config_json_that_is_not_ours_is_refused(toy, tmp_path, content):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_bytes(content)
    (folder / "notes.md").write_text("mine\n")
    _, delta_model = trained(toy)
    assert_refused_and_untouched(delta_model, folder)


def test_a_config_json_that_is_a_folder_or_a_link_is_refused(toy, tmp_path):
    _, delta_model = trained(toy)
    ours = tmp_path / "ours"
    delta_model.save_finetuned(ours)
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "config.json").symlink_to(ours / "config.json")  # even to a config of ours: writing would follow it
    assert_refused_and_untouched(delta_model, linked)
    folder = tmp_path / "dir"
    (folder / "config.json").mkdir(parents=True)
    assert_refused_and_untouched(delta_model, folder)


def test_our_own_and_legacy_configs_are_replaced(toy, tmp_path):
    _, delta_model = trained(toy)
    folder = tmp_path / "ckpt"
    delta_model.config.save_finetuned(folder)  # a config saved on its own is ours: a full save may replace it
    delta_model.save_finetuned(folder)
    assert "weights_file" in json.loads((folder / "config.json").read_text())

    legacy = tmp_path / "legacy"  # as OpenDelta 0.3.x wrote it: config.json + pytorch_model.bin
    legacy.mkdir()
    (legacy / "config.json").write_text(json.dumps({"delta_type": "toy", "opendelta_version": "0.3.2"}))
    (legacy / "pytorch_model.bin").write_bytes(b"the old weights")
    delta_model.save_finetuned(legacy)
    assert (legacy / "pytorch_model.bin").read_bytes() == b"the old weights"
    assert AutoDeltaConfig.from_finetuned(legacy).delta_type == "toy"


def test_a_hub_push_deletes_only_weights_it_can_prove_are_ours(tmp_path):
    ours = tmp_path / "w.safetensors"
    write_weights_lookalike(ours)
    digest = file_sha256(ours)

    def remote(path, sha256=None):
        lfs = {"size": 1, "oid": sha256, "pointerSize": 1} if sha256 else None
        return RepoFile(path=path, size=1, oid="0" * 40, lfs=lfs)

    old_ours = f"delta_model-{digest[:16]}.safetensors"
    entries = [
        remote(old_ours, digest),
        remote("delta_model-aaaaaaaaaaaaaaaa.safetensors", digest),  # name and content disagree
        remote("delta_model-bbbbbbbbbbbbbbbb.safetensors"),  # no digest known: not provably ours
        remote("delta_model-backup.safetensors", digest),
        remote(f"runs/delta_model-{digest[:16]}.safetensors", digest),  # not at the root
        remote("delta_model-cccccccccccccccc.safetensors", "c" * 64),  # the one being pushed
        remote("README.md"),
    ]
    assert stale_remote_weights(entries, keep="delta_model-cccccccccccccccc.safetensors") == [old_ours]
