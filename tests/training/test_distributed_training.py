"""Data-parallel delta training across 2 real processes: torch DDP, FSDP2, accelerate and the Trainer (gloo, CPU).

One ``torchrun --standalone --nproc_per_node 2`` launch (``--standalone`` takes a free port, so concurrent runs do
not clash) runs every phase of ``distributed_worker.py``; each rank records what it measured, and the tests below
assert on both ranks' records. Every rank trains on different data; the reference is one process training on the
concatenated batches, which averaged data-parallel gradients must reproduce.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("distributed_worker.py")
HAS_ACCELERATE = importlib.util.find_spec("accelerate") is not None
PHASES = ["ddp", "fsdp"] + (["accelerate", "trainer"] if HAS_ACCELERATE else [])
needs_accelerate = pytest.mark.skipif(
    not HAS_ACCELERATE, reason="needs accelerate (the Trainer does too): pip install -c constraints.txt accelerate"
)
CLOSE = 1e-6


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("distributed")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += [str(WORKER), str(out), *PHASES]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    if result.returncode != 0:
        pytest.fail(f"torchrun failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}")
    records = {phase: [json.loads((out / f"{phase}-rank{r}.json").read_text()) for r in (0, 1)] for phase in PHASES}
    return records, out


def test_ddp_reduces_only_the_trainable_tensors(runs):
    for record in runs[0]["ddp"]:
        assert record["frozen_tensors"] > 0
        assert record["reducer_tensors"] == record["trainable_tensors"]  # frozen backbone not in the reducer
        assert record["reducer_bytes"] == record["trainable_bytes"]
        assert record["find_unused_parameters"] == 0  # not needed: every trainable tensor gets a gradient
        assert record["frozen_grads_none"]


def test_ddp_gradients_are_the_mean_over_ranks(runs):
    for record in runs[0]["ddp"]:
        assert record["local_grads_differ"], "ranks must see different data, or averaging is not tested"
        assert record["averaging_error"] <= CLOSE


def test_ddp_ranks_start_from_rank0_and_end_identical(runs):
    for record in runs[0]["ddp"]:
        assert record["init_differs"], "each rank initialises its delta differently"
        assert record["in_sync_after_wrap"]  # DDP broadcast rank 0's delta
        assert record["in_sync_after_training"]
        assert record["moved"] > 1e-3
        assert record["reference_diff"] <= CLOSE
        assert record["detects_drift"]  # check_in_sync notices a rank changed behind DDP's back


def test_ddp_only_rank0_writes_the_checkpoint_and_every_rank_loads_it(runs):
    records, out = runs
    assert [r["writes"] for r in records["ddp"]] == [1, 0]
    assert all(r["loaded_diff"] == 0 for r in records["ddp"])
    files = records["ddp"][0]["files"]
    assert "config.json" in files and sum(f.endswith(".safetensors") for f in files) == 1
    assert not any(p.name.startswith(".tmp") for p in (out / "ddp-delta").iterdir())


def test_fsdp2_trains_like_one_process_and_saves_the_full_delta(runs):
    for record in runs[0]["fsdp"]:
        assert record["sharded_params"] == record["all_params"] and record["local_shapes_differ"]
        assert record["frozen_grads_none"]
        assert record["in_sync_after_training"]
        assert record["moved"] > 1e-3
        assert record["reference_diff"] <= CLOSE
        # gathered from the shards, hashed from full tensors: loads (hash checked) into an unsharded backbone
        assert record["loaded_diff"] == 0
    assert [r["writes"] for r in runs[0]["fsdp"]] == [1, 0]


@needs_accelerate
def test_accelerate_prepare_trains_saves_once_and_resumes(runs):
    records = runs[0]["accelerate"]
    for record in records:
        assert record["wrapped_in_ddp"] and record["unwraps_to_backbone"]
        assert record["reducer_tensors"] == record["trainable_tensors"]
        assert record["find_unused_parameters"] == 0
        assert record["in_sync_after_training"]
        assert record["reference_diff"] <= CLOSE
        assert record["loaded_diff"] == 0
        assert record["state_keys"] == record["trainable_names"]  # save_state's model file: delta and head only
        assert record["resumed_diff"] == 0  # strict load_state restores them into a fresh model
        assert record["momentum_tensors"] == record["trainable_tensors"]
        assert record["resumed_momentum_diff"] == 0
    assert [r["writes"] for r in records] == [1, 0]


@needs_accelerate
def test_trainer_under_ddp_keeps_ranks_identical_and_saves_once(runs):
    records = runs[0]["trainer"]
    for record in records:
        assert record["wrapped_in_ddp"]
        assert record["in_sync_after_training"]
        assert record["checkpoint_keys"] == record["trainable_names"]
        assert record["loaded_diff"] == 0
    assert [r["writes"] for r in records] == [1, 0]  # DeltaTrainerCallback writes checkpoint-2/delta on rank 0
