"""A Hub cache entry that leads outside the cache is refused, and an invalid repo id is our error, not the client's.

Each case lays a good checkpoint out in the real ``huggingface_hub`` cache layout (``put_in_hub_cache``, which
``huggingface_hub.scan_cache_dir`` reads as a valid cache), tampers with one thing (``refs/main``, the ``blobs``
or ``snapshots`` folder, the snapshot, a file link, the repo folder) so that the files the loader would read lie in
another folder holding a loadable checkpoint, and loads it offline through the real ``snapshot_download``. Without
the checks each of these loads would succeed, reading files from outside the cache.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from huggingface_hub import scan_cache_dir
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from hypothesis import given
from hypothesis import strategies as st
from test_hub import COMMIT, put_in_hub_cache

from opendelta import AutoDeltaModel, CheckpointError
from opendelta.hub_cache import check_hub_repo_id, repo_id_problem
from opendelta.testing import Pristine, tiny_model

REPO = "someone/toy-delta"


@pytest.fixture
def cache(toy_checkpoint_dir, tmp_path):
    """A real cache holding ``REPO``, and ``outside``: a copy of the checkpoint in a folder beside the cache."""
    root = tmp_path / "hub-cache"
    put_in_hub_cache(root, REPO, toy_checkpoint_dir)
    shutil.copytree(toy_checkpoint_dir, tmp_path / "outside")
    return root


def _storage(cache: Path) -> Path:
    return cache / f"models--{REPO.replace('/', '--')}"


def _load(cache: Path, **options):
    model = tiny_model("bert")
    return AutoDeltaModel.from_finetuned(REPO, backbone_model=model, cache_dir=cache, local_files_only=True, **options)


def _ref_out(cache: Path) -> None:
    (_storage(cache) / "refs" / "main").write_text("../../../outside")


def _blobs_out(cache: Path) -> None:
    blobs = _storage(cache) / "blobs"
    shutil.move(blobs, cache.parent / "outside-blobs")
    blobs.symlink_to(cache.parent / "outside-blobs", target_is_directory=True)


def _snapshots_out(cache: Path) -> None:
    snapshots = _storage(cache) / "snapshots"
    outside = cache.parent / "outside-snapshots"
    outside.mkdir()
    shutil.copytree(cache.parent / "outside", outside / COMMIT)
    shutil.rmtree(snapshots)
    snapshots.symlink_to(outside, target_is_directory=True)


def _snapshot_out(cache: Path) -> None:
    snapshot = _storage(cache) / "snapshots" / COMMIT
    shutil.rmtree(snapshot)
    snapshot.symlink_to(cache.parent / "outside", target_is_directory=True)


def _config_link_out(cache: Path) -> None:
    config = _storage(cache) / "snapshots" / COMMIT / "config.json"
    config.unlink()
    config.symlink_to(cache.parent / "outside" / "config.json")


def _repo_folder_out(cache: Path) -> None:
    storage = _storage(cache)
    shutil.move(storage, cache.parent / "outside-repo")
    storage.symlink_to(cache.parent / "outside-repo", target_is_directory=True)


TAMPERED = [
    ("refs/main is a path, not a commit", _ref_out, "not snapshots/<40-hex commit>"),
    ("blobs is a link out of the cache", _blobs_out, "'blobs' folder that is a link"),
    ("snapshots is a link out of the cache", _snapshots_out, "'snapshots' folder that is a link"),
    ("the snapshot is a link out", _snapshot_out, f"snapshot {COMMIT} that is a link"),
    ("config.json links out of the blobs", _config_link_out, "config.json linking to"),
    ("the repo folder is a link out", _repo_folder_out, "outside the cache"),
]


def test_the_untampered_cache_is_a_real_one_and_loads(cache):
    """The layout the cases start from is what huggingface_hub itself reads as a cache, and it loads."""
    (repo,) = scan_cache_dir(cache).repos
    assert repo.repo_id == REPO and {r.commit_hash for r in repo.revisions} == {COMMIT}
    assert repo.refs.keys() == {"main"}
    _load(cache)


@pytest.mark.parametrize(("case", "tamper", "message"), TAMPERED, ids=[c[0] for c in TAMPERED])
def test_a_cache_entry_leading_outside_is_refused(case, tamper, message, cache):
    tamper(cache)
    model = tiny_model("bert")
    before = Pristine.of(model)
    with pytest.raises(CheckpointError, match="Hub cache entry") as caught:
        AutoDeltaModel.from_finetuned(REPO, backbone_model=model, cache_dir=cache, local_files_only=True)
    text = str(caught.value)
    assert message in text and "Delete" in text and "download the repo again" in text, text
    assert before.differences(model) == []


def test_links_into_the_repos_own_blobs_are_still_followed_by_revision(cache):
    """A commit given as the revision skips refs/ and still passes the checks (the normal case, pinned)."""
    _load(cache, revision=COMMIT)


BAD_IDS = [
    "someone/toy--delta",
    "someone/toy..delta",
    "someone/-toy",
    "someone/toy.",
    "someone/" + "x" * 97,
    "someone/toy delta",
    "someone/toy$",
    "someone/toy.git",
    "someone/",
    "/toy",
    "a/b/c",
    "bare-name",
    "someone/t\u00f6y",
]


@pytest.mark.parametrize("repo_id", BAD_IDS)
def test_an_invalid_repo_id_is_a_checkpoint_error_saying_what_to_give(repo_id, tmp_path):
    model = tiny_model("bert")
    with pytest.raises(CheckpointError) as caught:
        AutoDeltaModel.from_finetuned(repo_id, backbone_model=model, cache_dir=tmp_path, local_files_only=True)
    assert not isinstance(caught.value, HFValidationError)
    assert isinstance(caught.value.__cause__, type(None)), "raised before the Hub client was called"
    assert "not a Hub repo id" in str(caught.value) and "'org/my-lora-delta'" in str(caught.value)


@given(st.text(alphabet="ab-_.Z9/ $", min_size=1, max_size=12))
def test_a_repo_id_we_accept_is_one_the_hub_client_accepts(repo_id):
    """Our rules are never looser than the Hub's (so the client never raises its validation error at us)."""
    if repo_id_problem(repo_id) is None:
        validate_repo_id(repo_id)
        assert check_hub_repo_id(repo_id) == repo_id
