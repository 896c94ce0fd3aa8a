"""Saves killed half-way and saves racing each other, in real processes (``save_worker.py``), killed with SIGKILL.

A killed save must leave the previous checkpoint loadable (or, once its config is committed, the new one); two
processes saving to one folder must leave one of their checkpoints, never weights of one under the config or
card of the other; a load running beside them never fails. The processes are forked from this one, so they start
at once with its imports; the lock they take is the operating system's, as between unrelated programs.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import time
from pathlib import Path

import pytest
import save_worker
import torch

from opendelta import AutoDeltaModel
from opendelta.testing import perturb, tiny_inputs, tiny_model

pytestmark = pytest.mark.skipif(os.name != "posix", reason="SIGKILL, fork and flock are POSIX")

FILES_OF_A_CHECKPOINT = 3  # README.md, config.json, delta_model-<digest>.safetensors


def _worker(folder: Path, seed: int, mode: str, marker: Path | None = None) -> multiprocessing.Process:
    process = multiprocessing.get_context("fork").Process(
        target=save_worker.run, args=(folder, seed, mode, marker), daemon=True
    )
    process.start()
    return process


def _wait_for(path: Path, process: multiprocessing.Process, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.is_alive(), f"the worker exited early with status {process.exitcode} (its error is above)"
        assert time.monotonic() < deadline, f"worker never reached {path.name}"
        time.sleep(0.01)


def _kill(process: multiprocessing.Process) -> None:
    process.kill()  # SIGKILL: no finally block, no atexit handler runs
    process.join()
    process.close()


def _expected(toy, seed: int) -> torch.Tensor:
    """The outputs of the checkpoint a worker saves with ``seed``."""
    model = tiny_model("bert")
    delta_model = toy(model)
    perturb(delta_model, seed=seed)
    with torch.no_grad():
        return model(**tiny_inputs("bert")).logits


def _loaded(folder: Path) -> torch.Tensor:
    model = tiny_model("bert")
    AutoDeltaModel.from_finetuned(folder, model)
    with torch.no_grad():
        return model(**tiny_inputs("bert")).logits


def _which(folder: Path, candidates: dict[str, torch.Tensor]) -> str:
    got = _loaded(folder)
    matches = [name for name, expected in candidates.items() if torch.equal(got, expected)]
    assert len(matches) == 1, f"the checkpoint in {folder} is none of {sorted(candidates)}"
    return matches[0]


def _save_here(toy, folder: Path, seed: int) -> None:
    """Save what a worker saves with ``seed``, in this process (a worker costs seconds of imports)."""
    delta_model = toy(tiny_model("bert"))
    delta_model.freeze_module(exclude=["deltas", "classifier"])
    perturb(delta_model, seed=seed)
    delta_model.save_finetuned(folder)


@pytest.mark.parametrize(
    ("stop", "survivor"),
    [("weights", "old"), ("config", "old"), ("cleanup", "new"), ("card", "new")],
    ids=["mid-weights", "mid-config", "before-cleanup", "before-card"],
)
def test_a_save_killed_at_any_point_leaves_a_loadable_checkpoint(toy, tmp_path, stop, survivor):
    folder = tmp_path / "ckpt"
    _save_here(toy, folder, seed=1)  # the previous checkpoint
    candidates = {"old": _expected(toy, 1), "new": _expected(toy, 7)}
    marker = tmp_path / "reached"
    process = _worker(folder, 7, stop, marker)
    _wait_for(marker, process)
    _kill(process)
    assert _which(folder, candidates) == survivor
    _save_here(toy, folder, seed=3)  # the next save works, and clears what the killed one left
    assert _which(folder, {**candidates, "next": _expected(toy, 3)}) == "next"
    assert sorted(p.name for p in folder.iterdir())[:2] == ["README.md", "config.json"]
    assert len(list(folder.iterdir())) == FILES_OF_A_CHECKPOINT, sorted(p.name for p in folder.iterdir())


def test_saves_killed_at_random_moments_never_break_the_checkpoint(toy, tmp_path):
    folder = tmp_path / "ckpt"
    _save_here(toy, folder, seed=1)
    candidates = {"a": _expected(toy, 1), "b": _expected(toy, 2)}
    rng = random.Random(0)
    seen = set()
    for _ in range(20):
        before = json.loads((folder / "config.json").read_text())["weights_sha256"]
        process = _worker(folder, 1, "loop")
        while json.loads((folder / "config.json").read_text())["weights_sha256"] == before:  # it is saving
            assert process.is_alive(), f"the worker exited early with status {process.exitcode}"
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.05))
        _kill(process)
        seen.add(_which(folder, candidates))
    assert seen <= {"a", "b"}


def test_two_processes_saving_to_one_folder_never_mix(toy, tmp_path):
    folder = tmp_path / "ckpt"
    _save_here(toy, folder, seed=1)
    candidates = {"first": _expected(toy, 1), "second": _expected(toy, 5)}
    writers = [_worker(folder, 1, "30"), _worker(folder, 5, "30")]
    loads = 0
    while any(w.is_alive() for w in writers):  # a reader beside them never sees a half-switched checkpoint
        _which(folder, candidates)
        loads += 1
    for writer in writers:
        writer.join()
        assert writer.exitcode == 0, f"a writer failed with status {writer.exitcode} (its error is above)"
    assert loads > 0
    _which(folder, candidates)
    assert len(list(folder.iterdir())) == FILES_OF_A_CHECKPOINT, sorted(p.name for p in folder.iterdir())
