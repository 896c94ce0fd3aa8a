"""Multitask serving (manual section 1.8) on a real model and real data: two tasks, one backbone, one batch.

Two LoRA deltas are trained on all-MiniLM-L6-v2 for two tasks of the Rotten Tomatoes corpus: *sentiment* (is a
critic's snippet fresh or rotten?) and *genre of text* (is a snippet a plot synopsis or a critic's verdict?). The
backbone and its randomly initialised classification head stay frozen; each task's LoRA also adapts the pooler and
the head, so each delta carries everything its task needs. Then, as in the manual:

1. switch the whole model between tasks with ``detach()``/``attach()`` (nothing copied, a fraction of a ms);
2. serve one mixed batch in which each row goes through its own task's delta (``route_rows``), and check that
   every row gets exactly what it gets with only its delta attached.

Run it with ``python examples/multitask_serving.py`` once the packages of the demo are installed (``nox -s demo``
installs them); ``--quick`` is the short run the tests use.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rotten_tomatoes import batches, load_plot_or_review, load_rotten_tomatoes, locate_minilm

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as hf_logging

from opendelta import LoraModel, route_rows

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
    parser.add_argument("--quick", action="store_true", help="a short run for the tests")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.eval_size = 3, 16
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
