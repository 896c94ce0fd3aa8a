"""The Hub side, with the real ``huggingface_hub`` client and no network.

Downloads are tested against the client's real on-disk cache layout (``models--user--name/{blobs,snapshots,refs}``),
which is what ``snapshot_download`` reads offline; uploads are driven through the real client until it stops at the
network boundary (offline mode), which must leave the local checkpoint complete and say how to retry.
"""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard

from opendelta import AutoDeltaModel, CheckpointError, HubError
from opendelta.hub import CARD_MARKER
from opendelta.testing import perturb, tiny_inputs, tiny_model

TESTS = Path(__file__).parent
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def outputs(model):
    with torch.no_grad():
        return model(**tiny_inputs("bert")).logits


def put_in_hub_cache(cache: Path, repo_id: str, folder: Path, commit: str = COMMIT) -> Path:
    """Lay ``folder``'s files out as ``huggingface_hub`` stores a downloaded snapshot (blobs + symlinks + ref)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    for file in folder.iterdir():
        blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        blob.write_bytes(file.read_bytes())
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture
def trained(toy, tmp_path):
    model = tiny_model("bert")
    delta_model = toy(model)
    perturb(delta_model)
    delta_model.freeze_module(exclude=["deltas", "classifier"])
    folder = delta_model.save_finetuned(tmp_path / "ckpt")
    return delta_model, folder, outputs(model)


def test_model_card_names_method_backbone_parameters_and_usage(trained):
    delta_model, folder, _ = trained
    text = (folder / "README.md").read_text()
    card = ModelCard(text)
    assert card.data.library_name == "opendelta" and "toy" in card.data.tags
    assert CARD_MARKER in text
    saved = sum(p.numel() for p in delta_model.backbone_model.parameters() if p.requires_grad)
    assert f"**Trainable parameters saved**: {saved:,}" in text
    assert "`BertForSequenceClassification`" in text and "Method**: `toy`" in text
    usage = text.split("```python\n")[1].split("```")[0]
    compile(usage, "usage", "exec")  # the usage snippet is valid Python
    assert "AutoDeltaModel.from_finetuned(" in usage and "transformers.BertForSequenceClassification" in usage


def test_a_readme_of_the_users_own_is_never_overwritten(toy, tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "README.md").write_text("my notes\n")
    delta_model = toy(tiny_model("bert"))
    delta_model.freeze_module()
    delta_model.save_finetuned(folder)
    assert (folder / "README.md").read_text() == "my notes\n"
    (folder / "README.md").unlink()
    delta_model.save_finetuned(folder)
    first = (folder / "README.md").read_text()
    assert CARD_MARKER in first
    delta_model.save_finetuned(folder, repo_id="someone/toy-delta")  # ours: rewritten, now naming the repo
    assert '"someone/toy-delta"' in (folder / "README.md").read_text()


def test_from_finetuned_resolves_a_repo_id_from_the_real_cache_layout(trained, toy, tmp_path):
    _, folder, expected = trained
    cache = tmp_path / "hub-cache"
    put_in_hub_cache(cache, "someone/toy-delta", folder)
    model = tiny_model("bert")
    AutoDeltaModel.from_finetuned("someone/toy-delta", backbone_model=model, cache_dir=cache, local_files_only=True)
    torch.testing.assert_close(outputs(model), expected)


def test_revision_selects_the_snapshot_and_an_unknown_one_is_a_clear_error(trained, toy, tmp_path):
    _, folder, expected = trained
    cache = tmp_path / "hub-cache"
    put_in_hub_cache(cache, "someone/toy-delta", folder)
    model = tiny_model("bert")
    AutoDeltaModel.from_finetuned(
        "someone/toy-delta", backbone_model=model, cache_dir=cache, local_files_only=True, revision=COMMIT
    )
    torch.testing.assert_close(outputs(model), expected)
    with pytest.raises(CheckpointError, match="could not be fetched"):
        AutoDeltaModel.from_finetuned(
            "someone/toy-delta", backbone_model=tiny_model("bert"), cache_dir=cache, local_files_only=True,
            revision="f" * 40,
        )  # fmt: skip


def test_a_repo_missing_from_the_cache_offline_is_a_clear_error(toy, tmp_path):
    model = tiny_model("bert")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"no local folder 'someone/absent'.*could not be fetched"):
        AutoDeltaModel.from_finetuned("someone/absent", backbone_model=model, cache_dir=tmp_path, local_files_only=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


_OFFLINE_SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
import opendelta
from toy_method import ToyPlugin
opendelta.plugins.load_plugins()
opendelta.plugins.pm.register(ToyPlugin(), name="toy")
from opendelta import AutoDeltaModel, HubError
from opendelta.testing import tiny_inputs, tiny_model

model = tiny_model("bert")
AutoDeltaModel.from_finetuned("someone/toy-delta", backbone_model=model)  # cache from HF_HUB_CACHE, offline
with torch.no_grad():
    torch.save(model(**tiny_inputs("bert")).logits, {out!r})
delta_model = opendelta.get_method("toy").model_cls(tiny_model("bert"))
delta_model.freeze_module()
try:
    delta_model.save_finetuned({push!r}, push_to_hub=True, repo_id="someone/pushed")
except HubError as exc:
    print("HUBERROR", exc)
"""


def test_offline_mode_loads_from_the_cache_and_push_stops_at_the_network_boundary(trained, tmp_path):
    _, folder, expected = trained
    cache = tmp_path / "hub-cache"
    put_in_hub_cache(cache, "someone/toy-delta", folder)
    out, push = tmp_path / "out.pt", tmp_path / "pushed"
    script = _OFFLINE_SCRIPT.format(tests=str(TESTS), out=str(out), push=str(push))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "home")}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    torch.testing.assert_close(torch.load(out, weights_only=True), expected)
    message = result.stdout.split("HUBERROR", 1)[1]
    assert "saved locally" in message and "someone/pushed" in message and "Offline" in message
    config = json.loads((push / "config.json").read_text())  # the local save is complete and loadable
    assert (push / config["weights_file"]).is_file() and (push / "README.md").is_file()


def test_push_arguments_are_checked_before_anything_is_written(toy, tmp_path):
    delta_model = toy(tiny_model("bert"))
    with pytest.raises(ValueError, match="needs repo_id"):
        delta_model.save_finetuned(tmp_path / "a", push_to_hub=True)
    assert not (tmp_path / "a").exists()
    with pytest.raises(HubError, match="user/name"):
        delta_model.save_finetuned(tmp_path / "b", push_to_hub=True, repo_id="not-a-repo-id")
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("repo_id", ["org/na--me", "org/name.git", "org/-name", "or g/name", "org/" + "n" * 97])
def test_push_refuses_every_repo_id_the_loader_refuses_before_anything_is_written(toy, tmp_path, repo_id):
    delta_model = toy(tiny_model("bert"))
    with pytest.raises(HubError, match="user/name"):
        delta_model.save_finetuned(tmp_path / "out", push_to_hub=True, repo_id=repo_id)
    assert not (tmp_path / "out").exists()
