"""What a separate process does in the interrupted- and concurrent-save tests: save toy checkpoints.

``run(folder, seed, mode, marker)`` runs in a child forked from the test process (``multiprocessing``'s "fork"
context): a real process, killed with a real SIGKILL, that starts in milliseconds because it inherits the test's
imports and its registry (the toy method registered by the ``toy`` fixture).

* ``mode="loop"``: save the delta perturbed with ``seed`` and ``seed + 1`` alternately, forever (killed at random).
* ``mode="N"`` (a number): save it N times, then exit.
* ``mode="weights"|"config"|"cleanup"|"card"``: save once, but stop at that point of the save (half the weights
  file written; half the new config written; config committed, stale weights not yet removed; model card not yet
  written), create ``marker`` and wait there to be killed.
"""

from __future__ import annotations

import time
from pathlib import Path

from toy_method import ToyModel

import opendelta.hub
import opendelta.saving
from opendelta.testing import perturb, tiny_model


def _stop_here(marker: Path) -> None:
    marker.write_text("reached")
    time.sleep(600)


def _install_stop(mode: str, marker: Path) -> None:
    saving = opendelta.saving
    if mode == "weights":
        real_save = saving.save_file

        def half_weights(tensors, path, metadata=None):
            real_save(tensors, path, metadata=metadata)
            data = Path(path).read_bytes()
            Path(path).write_bytes(data[: len(data) // 2])
            _stop_here(marker)

        saving.save_file = half_weights
    elif mode == "config":

        def half_config(path, data):
            Path(path).write_bytes(data[: len(data) // 2])
            _stop_here(marker)

        saving._fsync_write = half_config
    elif mode == "cleanup":
        saving._remove_unreferenced = lambda directory: _stop_here(marker)
    elif mode == "card":
        opendelta.hub.write_model_card = lambda folder, text: _stop_here(marker)


def run(folder: Path, seed: int, mode: str, marker: Path | None = None) -> None:
    """Save the toy delta as ``mode`` says (see the module docstring); the caller kills or joins this process."""
    delta_model = ToyModel(tiny_model("bert"))
    delta_model.freeze_module(exclude=["deltas", "classifier"])
    if mode != "loop" and not mode.isdigit():
        assert marker is not None, f"mode {mode!r} stops half-way and needs a marker file"
        _install_stop(mode, marker)
    rounds = 10**9 if mode == "loop" else int(mode) if mode.isdigit() else 1
    for i in range(rounds):
        for param in delta_model.parameters():  # back to the initial zeros, then this save's perturbation
            param.data.zero_()
        perturb(delta_model, seed=seed + (i % 2 if mode == "loop" else 0))
        delta_model.save_finetuned(folder)
