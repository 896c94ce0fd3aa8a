"""Multitask serving (manual section 1.8) on a real model and real data: two tasks, one backbone, one batch.

Two LoRA deltas are trained on all-MiniLM-L6-v2 for two tasks of the Rotten Tomatoes corpus: *sentiment* (is a
critic's snippet fresh or rotten?) and *genre of text* (is a snippet a plot synopsis or a critic's verdict?). The
backbone and its randomly initialised classification head stay frozen; each task's LoRA also adapts the pooler and
the head, so each delta carries everything its task needs. Then, as in the manual:

1. switch the whole model between tasks with ``detach()``/``attach()`` (nothing copied, a fraction of a ms);
2. serve one mixed batch in which each row goes through its own task's delta (``route_rows``), and check that
   every row gets exactly what it gets with only its delta attached;
3. serve many tenants: each task's delta is saved and loaded back as ``--tenants`` separate deltas (one per
   customer, as a server holds them), a stream of requests for random tenants is served one request at a time and
   in batches across tenants, and the throughputs are printed, beside PEFT's ``adapter_names`` on the same LoRA
   weights (exported with ``save_peft``) when PEFT is installed. Every batched answer is checked against the same
   request served alone.

Run it with ``python examples/multitask_serving.py`` once the packages of the demo are installed (``nox -s demo``
installs them); ``--quick`` is the short run the tests use.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rotten_tomatoes import batches, load_plot_or_review, load_rotten_tomatoes, locate_minilm

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as hf_logging

from opendelta import AutoDeltaModel, LoraModel, route_rows
from opendelta.errors import OpenDeltaServingWarning

TARGETS = ["query", "value", "pooler.dense", "classifier"]


def balanced(examples: list[tuple[str, int]], size: int, seed: int) -> list[tuple[str, int]]:
    """``size`` examples, half of each label, in a seeded random order."""
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for label in (0, 1):
        pool = [e for e in examples if e[1] == label]
        chosen += [pool[i] for i in torch.randperm(len(pool), generator=generator)[: size // 2]]
    return [chosen[i] for i in torch.randperm(len(chosen), generator=generator)]


def train(model, delta_model, examples, tokenizer, steps: int, max_length: int) -> None:
    """A plain torch loop over balanced batches of 16."""
    optimizer = torch.optim.AdamW([p for p in delta_model.parameters()], lr=2e-3)
    model.train()
    data = balanced(examples, steps * 16, seed=0)
    for step, (inputs, labels) in enumerate(batches(data, tokenizer, 16, max_length), start=1):
        loss = torch.nn.functional.cross_entropy(model(**inputs).logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        print(f"\r    step {step}/{steps} loss {loss.item():.3f}", end="", flush=True)
    print()
    model.eval()


@torch.no_grad()
def logits_of(model, examples, tokenizer, max_length: int) -> torch.Tensor:
    """The logits of ``examples``, in one batch."""
    inputs, _ = next(batches(examples, tokenizer, len(examples), max_length))
    return model(**inputs).logits


def main() -> int:
    """Train the two deltas, switch between them, serve a mixed batch; non-zero exit if a check fails."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="training steps per task (default 60)")
    parser.add_argument("--eval-size", type=int, default=200, help="held-out examples per task (default 200)")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--tenants", type=int, default=32, help="tenant deltas served at once (default 32)")
    parser.add_argument("--requests", type=int, default=128, help="requests in the served stream (default 128)")
    parser.add_argument("--batch", type=int, default=32, help="requests per batch across tenants (default 32)")
    parser.add_argument("--quick", action="store_true", help="a short run for the tests")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.eval_size, args.tenants, args.requests, args.batch = 3, 16, 6, 24, 8
    torch.manual_seed(0)
    folder = locate_minilm()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    hf_logging.set_verbosity_error()
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2).eval()
    tasks = {
        "sentiment": (load_rotten_tomatoes("train"), load_rotten_tomatoes("test")),
        "plot": (load_plot_or_review("train"), load_plot_or_review("test")),
    }

    deltas: dict[str, LoraModel] = {}
    for name, (train_set, _test) in tasks.items():
        print(f"=== Train the {name!r} delta ({args.steps} steps) ===")
        for other in deltas.values():
            other.detach()
        delta = LoraModel(backbone_model=model, modified_modules=TARGETS, lora_r=8)
        delta.freeze_module(exclude=["deltas"], set_state_dict=True)
        train(model, delta, train_set, tokenizer, args.steps, args.max_length)
        deltas[name] = delta
    deltas["sentiment"].attach()  # both deltas on the backbone now
    deltas["sentiment"].log(visualization=False)

    held_out = {name: balanced(test, args.eval_size, seed=1) for name, (_train, test) in tasks.items()}
    print("\n=== Switch the whole model between tasks: detach() / attach() ===")
    alone: dict[str, torch.Tensor] = {}
    for name in deltas:
        others = [d for n, d in deltas.items() if n != name]
        start = time.perf_counter()
        for other in others:
            other.detach()
        switch_ms = (time.perf_counter() - start) * 1e3
        alone[name] = logits_of(model, held_out[name], tokenizer, args.max_length)
        correct = (alone[name].argmax(-1) == torch.tensor([label for _, label in held_out[name]])).float().mean()
        print(f"    {name:10} accuracy {correct:.3f}  (switch: {switch_ms:.2f} ms, nothing copied)")
        for other in others:
            other.attach()

    print("\n=== One mixed batch, each row through its own task's delta: route_rows ===")
    mixed = [example for pair in zip(*held_out.values(), strict=True) for example in pair]
    plan = [deltas[name] for _pair in zip(*held_out.values(), strict=True) for name in held_out]
    with route_rows(model, plan):
        start = time.perf_counter()
        routed = logits_of(model, mixed, tokenizer, args.max_length)
        routed_ms = (time.perf_counter() - start) * 1e3
    expected = torch.stack([row for pair in zip(*alone.values(), strict=True) for row in pair])
    same = torch.allclose(routed, expected, atol=1e-4)
    print(f"    {len(mixed)} rows in one pass ({routed_ms:.0f} ms): each row's logits equal its task alone: {same}")
    if not same:
        print("FAILED: a routed row differs from its task run alone")
        return 1
    return serve_tenants(model, deltas, held_out, tokenizer, args)


def serve_tenants(model, deltas: dict[str, LoraModel], held_out, tokenizer, args) -> int:
    """Many tenant deltas on one backbone: requests one at a time, batched across tenants, and PEFT's way."""
    print(f"\n=== Serve {args.tenants} tenants: {args.requests} requests, one at a time and {args.batch} at once ===")
    with tempfile.TemporaryDirectory() as folder:
        saved = {}
        for name, delta in deltas.items():
            saved[name] = Path(folder) / name
            delta.save_finetuned(saved[name])
        for delta in deltas.values():
            delta.detach()
        names = list(deltas)
        tenants = []  # every tenant a delta of its own (here with one of the two tasks' weights)
        for index in range(args.tenants):
            folder_of_task = saved[names[index % len(names)]]
            tenant = AutoDeltaModel.from_finetuned(folder_of_task, backbone_model=model, check_hash=False)
            tenant.detach()  # loaded one by one: the same weights twice attached would be refused as a double load
            tenants.append(tenant)
        for tenant in tenants:
            tenant.attach()
        peft_model = peft_twin(model, tenants, folder)
        generator = torch.Generator().manual_seed(2)
        pool = [e for examples in held_out.values() for e in examples]
        picks = torch.randint(len(pool), (args.requests,), generator=generator).tolist()
        owners = torch.randint(args.tenants, (args.requests,), generator=generator).tolist()
        requests = [(pool[i], owner) for i, owner in zip(picks, owners, strict=True)]

        start = time.perf_counter()
        single = []
        for example, owner in requests:
            with route_rows(model, [tenants[owner]], unlisted="no_rows"):
                single.append(logits_of(model, [example], tokenizer, args.max_length)[0])
        single_s = time.perf_counter() - start

        start = time.perf_counter()
        batched = []
        for first in range(0, len(requests), args.batch):
            chunk = requests[first : first + args.batch]
            with route_rows(model, [tenants[owner] for _e, owner in chunk], unlisted="no_rows"):
                batched.extend(logits_of(model, [e for e, _o in chunk], tokenizer, args.max_length))
        batched_s = time.perf_counter() - start
        # padding differs between a request alone and in a batch: equal up to float noise
        same = torch.allclose(torch.stack(batched), torch.stack(single), atol=1e-4)
        print(f"    one at a time:       {args.requests / single_s:7.1f} requests/s")
        print(
            f"    batched ({args.batch:3} rows):  {args.requests / batched_s:7.1f} requests/s  "
            f"({single_s / batched_s:.1f}x; every answer equals the request alone: {same})"
        )
        if peft_model is not None:
            start = time.perf_counter()
            answers = []
            for first in range(0, len(requests), args.batch):
                chunk = requests[first : first + args.batch]
                inputs, _ = next(batches([e for e, _o in chunk], tokenizer, len(chunk), args.max_length))
                with torch.no_grad():
                    answers.extend(peft_model(**inputs, adapter_names=[f"t{o}" for _e, o in chunk]).logits)
            peft_s = time.perf_counter() - start
            agree = torch.allclose(torch.stack(answers), torch.stack(batched), atol=1e-4)
            print(
                f"    PEFT adapter_names:  {args.requests / peft_s:7.1f} requests/s  "
                f"(ours {peft_s / batched_s:.2f}x its throughput; same answers: {agree})"
            )
            same = same and agree
    if not same:
        print("FAILED: a batched answer differs from the same request served alone")
        return 1
    return 0


def peft_twin(model, tenants: list, folder: str):
    """The same tenants in PEFT, from our ``save_peft`` exports, on a copy of the bare backbone (``None``: no PEFT)."""
    try:
        from peft import PeftModel
    except ImportError:
        print("    (PEFT is not installed: its adapter_names comparison is skipped)")
        return None
    import copy

    for tenant in tenants:
        tenant.detach()
    bare = copy.deepcopy(model)
    for tenant in tenants:
        tenant.attach()
    peer = None
    for index, tenant in enumerate(tenants):
        path = Path(folder) / f"peft-{index}"
        with warnings.catch_warnings():  # "servers refuse an encoder's LoRA": known, PEFT itself loads it
            warnings.simplefilter("ignore", OpenDeltaServingWarning)
            tenant.save_peft(path)
        if peer is None:
            peer = PeftModel.from_pretrained(bare, path, adapter_name=f"t{index}")
        else:
            peer.load_adapter(path, adapter_name=f"t{index}")
    return peer.eval()


if __name__ == "__main__":
    sys.exit(main())
