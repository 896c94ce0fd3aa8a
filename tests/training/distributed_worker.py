"""Launched by test_distributed_training.py under ``torchrun --nproc_per_node 2`` (gloo, CPU); not a test module.

Usage: ``python -m torch.distributed.run --standalone --nproc_per_node 2 distributed_worker.py OUT [PHASE ...]``.

Each phase trains a tiny BERT with LoRA (plus its trainable classifier) on different data per rank and writes what
it measured to ``OUT/<phase>-rank<r>.json``; the test module asserts on those records, so a failure names the
measured fact rather than a crashed process. Phases: ``ddp`` (torch DistributedDataParallel), ``fsdp`` (FSDP2
``fully_shard``), ``accelerate`` (``Accelerator.prepare`` / ``save_state`` / ``load_state``) and ``trainer``
(transformers ``Trainer`` with ``DeltaTrainerCallback``).

The reference for every phase is a single-process run of the same model on the concatenation of every rank's
batch: data-parallel training with gradients averaged over ranks must end with the same weights.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import opendelta.checkpoint
import opendelta.integrations.distributed
from opendelta import AutoDeltaModel, get_method
from opendelta.integrations import check_in_sync, full_delta_state_dict, save_finetuned_distributed
from opendelta.testing import tiny_model

STEPS = 3
BATCH = 2
SEQ = 8
LR = 0.05
WRITES = {"count": 0}


def _count_writes() -> None:
    """Count this rank's checkpoint writes (the real write_checkpoint still runs)."""
    real = opendelta.checkpoint.write_checkpoint

    def counting(*args, **kwargs):
        WRITES["count"] += 1
        return real(*args, **kwargs)

    opendelta.checkpoint.write_checkpoint = counting
    opendelta.integrations.distributed.write_checkpoint = counting


def rank() -> int:
    return dist.get_rank()


def world() -> int:
    return dist.get_world_size()


def batch(step: int, for_rank: int) -> dict[str, torch.Tensor]:
    """The batch ``for_rank`` trains on at ``step``: different on every rank and step, reproducible anywhere."""
    gen = torch.Generator().manual_seed(1000 * step + for_rank)
    return {
        "input_ids": torch.randint(4, 99, (BATCH, SEQ), generator=gen),
        "attention_mask": torch.ones(BATCH, SEQ, dtype=torch.long),
        "labels": torch.randint(0, 3, (BATCH,), generator=gen),
    }


def global_batch(step: int) -> dict[str, torch.Tensor]:
    parts = [batch(step, r) for r in range(world())]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def build(seed: int):
    """A tiny BERT classifier with LoRA whose delta is initialised from ``seed``; classifier and delta trainable."""
    model = tiny_model("bert")
    torch.manual_seed(seed)
    delta = get_method("lora").model_cls(model)
    delta.freeze_module(exclude=["deltas", "classifier"])
    model.train()
    return model, delta


def trainable(model) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def make_optimizer(params) -> torch.optim.Optimizer:
    """SGD with momentum: unlike Adam its update scales with the gradient, so a sum instead of a mean would show."""
    return torch.optim.SGD(params, lr=LR, momentum=0.9)


def reference_state(seed: int, steps: int = STEPS) -> dict[str, torch.Tensor]:
    """Single-process training on the global batches: what data-parallel training must reproduce."""
    model, delta = build(seed)
    optimizer = make_optimizer(trainable(model))
    for step in range(steps):
        model(**global_batch(step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return {k: v.detach().clone() for k, v in full_delta_state_dict(delta).items()}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    if set(a) != set(b):
        return float("inf")
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def rank_differs(tensors: dict[str, torch.Tensor]) -> bool:
    """Whether some rank holds other values than rank 0."""
    flat = torch.cat([t.detach().reshape(-1).float() for _, t in sorted(tensors.items())])
    gathered = [torch.empty_like(flat) for _ in range(world())]
    dist.all_gather(gathered, flat)
    return any(not torch.equal(g, gathered[0]) for g in gathered[1:])


def in_sync(delta) -> bool:
    try:
        check_in_sync(delta)
    except RuntimeError:
        return False
    return True


def loaded_matches(folder: Path, expected: dict[str, torch.Tensor]) -> float:
    """Load the checkpoint into a fresh, unsharded backbone (hash checked) and compare with ``expected``."""
    fresh = tiny_model("bert")
    loaded = AutoDeltaModel.from_finetuned(folder, fresh)
    head = {n: p for n, p in fresh.named_parameters() if n in expected}
    return max_diff({**loaded.delta_state_dict(), **head}, expected)


def phase_ddp(out: Path) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    model, delta = build(seed=100 + rank())  # every rank initialises its delta differently
    init_differs = rank_differs(full_delta_state_dict(delta))
    ddp = DistributedDataParallel(model)  # no find_unused_parameters: every trainable tensor gets a gradient
    in_sync_after_wrap = in_sync(delta)
    initial = {k: v.detach().clone() for k, v in full_delta_state_dict(delta).items()}
    info = ddp._get_ddp_logging_data()
    params = trainable(model)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    optimizer = make_optimizer(params)
    averaging_error, local_grads_differ, frozen_grads_none = 0.0, False, True
    for step in range(STEPS):
        data = batch(step, rank())
        with ddp.no_sync():  # this rank's own gradient, not averaged
            ddp(**data).loss.backward()
        local = torch.cat([p.grad.reshape(-1) for p in params])
        optimizer.zero_grad(set_to_none=True)
        ddp(**data).loss.backward()
        synced = torch.cat([p.grad.reshape(-1) for p in params])
        every = [torch.empty_like(local) for _ in range(world())]
        dist.all_gather(every, local)
        averaging_error = max(averaging_error, (synced - torch.stack(every).mean(0)).abs().max().item())
        local_grads_differ |= any(not torch.equal(e, every[0]) for e in every[1:])
        frozen_grads_none &= all(p.grad is None for p in frozen)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    trained = {k: v.detach().clone() for k, v in full_delta_state_dict(delta).items()}
    in_sync_after_training = in_sync(delta)
    WRITES["count"] = 0
    folder = save_finetuned_distributed(delta, out / "ddp-delta")
    writes = WRITES["count"]
    loaded_diff = loaded_matches(folder, trained)
    if rank() == 1:  # a rank that drifts must be reported
        with torch.no_grad():
            next(iter(delta.parameters())).add_(1e-3)
    detects_drift = not in_sync(delta)
    return {
        "init_differs": init_differs,
        "in_sync_after_wrap": in_sync_after_wrap,
        "in_sync_after_training": in_sync_after_training,
        "reducer_tensors": info.get("num_parameter_tensors"),
        "reducer_bytes": info.get("total_parameter_size_bytes"),
        "find_unused_parameters": info.get("find_unused_parameters"),
        "trainable_tensors": len(params),
        "trainable_bytes": sum(p.numel() * p.element_size() for p in params),
        "frozen_tensors": len(frozen),
        "averaging_error": averaging_error,
        "local_grads_differ": local_grads_differ,
        "frozen_grads_none": frozen_grads_none,
        "moved": max_diff(trained, initial),
        "reference_diff": max_diff(trained, reference_state(seed=100)),
        "writes": writes,
        "loaded_diff": loaded_diff,
        "files": sorted(os.listdir(folder)),
        "detects_drift": detects_drift,
    }


def phase_fsdp(out: Path) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model, delta = build(seed=7)  # fully_shard shards each rank's own values: initialise identically
    initial = {k: v.detach().clone() for k, v in full_delta_state_dict(delta).items()}
    mesh = init_device_mesh("cpu", (world(),))
    for layer in model.bert.encoder.layer:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    sharded = [n for n, p in model.named_parameters() if hasattr(p, "full_tensor")]
    local_shapes_differ = any(
        p.to_local().shape != p.shape for p in model.parameters() if hasattr(p, "to_local") and p.shape[0] > 1
    )
    optimizer = make_optimizer(trainable(model))
    frozen_grads_none = True
    for step in range(STEPS):
        model(**batch(step, rank())).loss.backward()
        frozen_grads_none &= all(p.grad is None for p in model.parameters() if not p.requires_grad)
        optimizer.step()
        optimizer.zero_grad()
    trained = {k: v.detach().clone() for k, v in full_delta_state_dict(delta).items()}
    WRITES["count"] = 0
    folder = save_finetuned_distributed(delta, out / "fsdp-delta")
    return {
        "sharded_params": len(sharded),
        "all_params": sum(1 for _ in model.parameters()),
        "local_shapes_differ": local_shapes_differ,
        "frozen_grads_none": frozen_grads_none,
        "in_sync_after_training": in_sync(delta),
        "moved": max_diff(trained, initial),
        "reference_diff": max_diff(trained, reference_state(seed=7)),
        "writes": WRITES["count"],
        "loaded_diff": loaded_matches(folder, trained),
    }


class _Rows(torch.utils.data.Dataset):
    """The global batches of every step, row by row, for loaders that shard rows across ranks themselves."""

    def __init__(self, steps: int) -> None:
        rows = [global_batch(step) for step in range(steps)]
        self.data = {k: torch.cat([r[k] for r in rows]) for k in rows[0]}

    def __len__(self) -> int:
        return len(self.data["labels"])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.data.items()}


def phase_accelerate(out: Path) -> dict:
    from accelerate import Accelerator
    from safetensors.torch import load_file
    from torch.nn.parallel import DistributedDataParallel

    accelerator = Accelerator(cpu=True)
    model, delta = build(seed=200 + rank())
    optimizer = make_optimizer(trainable(model))
    # batch_size BATCH per rank over the global rows: accelerate hands rank r rows r*BATCH.. of each global batch
    loader = torch.utils.data.DataLoader(_Rows(STEPS), batch_size=BATCH, shuffle=False)
    wrapped, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    info = wrapped._get_ddp_logging_data() if isinstance(wrapped, DistributedDataParallel) else {}
    for data in loader:
        accelerator.backward(wrapped(**data).loss)
        optimizer.step()
        optimizer.zero_grad()
    trained = {k: v.detach().clone() for k, v in full_delta_state_dict(delta).items()}
    momentum = {k: v["momentum_buffer"].clone() for k, v in optimizer.state_dict()["state"].items()}
    accelerator.save_state(str(out / "acc-state"))
    WRITES["count"] = 0
    if accelerator.is_main_process:
        delta.save_finetuned(out / "acc-delta")
    accelerator.wait_for_everyone()
    writes = WRITES["count"]
    state_keys = sorted(load_file(str(out / "acc-state" / "model.safetensors")))

    # resume into a fresh model whose delta starts elsewhere: the saved delta, head and optimizer come back
    resumed_model, resumed_delta = build(seed=300 + rank())
    resumed_optimizer = make_optimizer(trainable(resumed_model))
    accelerator2 = Accelerator(cpu=True)
    _, resumed_optimizer = accelerator2.prepare(resumed_model, resumed_optimizer)
    accelerator2.load_state(str(out / "acc-state"))  # strict: the frozen backbone is absent and not "missing"
    resumed_momentum = {k: v["momentum_buffer"] for k, v in resumed_optimizer.state_dict()["state"].items()}
    return {
        "wrapped_in_ddp": isinstance(wrapped, DistributedDataParallel),
        "unwraps_to_backbone": accelerator.unwrap_model(wrapped) is delta.backbone_model,
        "reducer_tensors": info.get("num_parameter_tensors"),
        "find_unused_parameters": info.get("find_unused_parameters"),
        "trainable_tensors": len(trainable(model)),
        "in_sync_after_training": in_sync(delta),
        "reference_diff": max_diff(trained, reference_state(seed=200)),
        "writes": writes,
        "loaded_diff": loaded_matches(out / "acc-delta", trained),
        "state_keys": state_keys,
        "trainable_names": sorted(n for n, p in model.named_parameters() if p.requires_grad),
        "resumed_diff": max_diff(full_delta_state_dict(resumed_delta), trained),
        "momentum_tensors": len(momentum),
        "resumed_momentum_diff": max_diff(
            {str(k): v for k, v in resumed_momentum.items()}, {str(k): v for k, v in momentum.items()}
        ),
    }


def phase_trainer(out: Path) -> dict:
    from safetensors.torch import load_file
    from torch.nn.parallel import DistributedDataParallel
    from transformers import Trainer, TrainingArguments

    from opendelta.integrations import DeltaTrainerCallback

    model, delta = build(seed=400 + rank())
    args = TrainingArguments(
        output_dir=str(out / "trainer"),
        use_cpu=True,
        report_to=[],
        max_steps=2,
        save_steps=2,
        per_device_train_batch_size=BATCH,
        learning_rate=LR,
        ddp_find_unused_parameters=False,
        disable_tqdm=True,
        logging_strategy="no",
        seed=5,
    )
    WRITES["count"] = 0
    trainer = Trainer(model=model, args=args, train_dataset=_Rows(2), callbacks=[DeltaTrainerCallback(delta)])
    trainer.train()
    checkpoint = out / "trainer" / "checkpoint-2"
    return {
        "wrapped_in_ddp": isinstance(trainer.model_wrapped, DistributedDataParallel),
        "in_sync_after_training": in_sync(delta),
        "writes": WRITES["count"],
        "checkpoint_keys": sorted(load_file(str(checkpoint / "model.safetensors"))),
        "trainable_names": sorted(n for n, p in model.named_parameters() if p.requires_grad),
        "loaded_diff": loaded_matches(checkpoint / "delta", full_delta_state_dict(delta)),
    }


PHASES = {"ddp": phase_ddp, "fsdp": phase_fsdp, "accelerate": phase_accelerate, "trainer": phase_trainer}


def main() -> None:
    out = Path(sys.argv[1])
    phases = sys.argv[2:] or list(PHASES)
    dist.init_process_group("gloo")
    _count_writes()
    for name in phases:
        record = PHASES[name](out)
        (out / f"{name}-rank{rank()}.json").write_text(json.dumps(record, indent=1))
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
