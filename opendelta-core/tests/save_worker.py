"""A separate process that saves toy checkpoints, for the interrupted- and concurrent-save tests.

Usage: ``python save_worker.py FOLDER SEED MODE [MARKER]``

* ``MODE=loop``: save the delta perturbed with ``SEED`` and ``SEED + 1`` alternately, forever (killed at random).
* ``MODE=N`` (a number): save it N times, then exit.
* ``MODE=weights|config|cleanup|card``: save once, but stop at that point of the save (half the weights file written;
  half the new config written; config committed, stale weights not yet removed; model card not yet written),
  create ``MARKER`` and wait there to be killed.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from toy_method import ToyModel, ToyPlugin

import opendelta
import opendelta.checkpoint
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


def main() -> None:
    folder, seed, mode = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    opendelta.plugins.load_plugins()
    opendelta.plugins.pm.register(ToyPlugin(), name="toy")
    delta_model = ToyModel(tiny_model("bert"))
    delta_model.freeze_module(exclude=["deltas", "classifier"])
    if mode not in ("loop",) and not mode.isdigit():
        _install_stop(mode, Path(sys.argv[4]))
    rounds = 10**9 if mode == "loop" else int(mode) if mode.isdigit() else 1
    for i in range(rounds):
        for param in delta_model.parameters():  # back to the initial zeros, then this save's perturbation
            param.data.zero_()
        perturb(delta_model, seed=seed + (i % 2 if mode == "loop" else 0))
        delta_model.save_finetuned(folder)


if __name__ == "__main__":
    main()
