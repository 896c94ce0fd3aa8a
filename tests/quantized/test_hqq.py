"""HQQ backbones (``hqq``'s ``HQQLinear``) under every delta method that targets linear layers.

The backbones are a tiny Llama and a tiny BERT built from configs, saved, and loaded through transformers' own HQQ
quantizer (``quantization_config=HqqConfig(nbits=4, group_size=64)``, no mocks), on the CPU. ``HQQLinear`` is no
``nn.Linear``: its packed codes ``W_q`` are an ``nn.Parameter``, its per-group ``scale`` and ``zero`` live in a plain
``meta`` dict (neither parameters nor buffers), and core reaches all of it through
:class:`opendelta.quantization_backends.hqq.HqqBackend`.

Skipped, with the reason printed (``pytest -rs``), where hqq is not installed or where the installed transformers
line cannot load an HQQ model (transformers 5 keeps ``HqqConfig`` but its quantizer has no quantize op).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

pytest.importorskip("hqq", reason="hqq is not installed (pip install hqq): these tests need its HQQLinear layers")

import transformers
from hqq.core.quantize import BaseQuantizeConfig, HQQLinear


def _transformers_hqq_problem() -> str | None:
    """Why the installed transformers cannot load a model with ``HqqConfig``, or ``None`` when it can."""
    version = transformers.__version__
    try:
        from transformers import HqqConfig  # noqa: F401
        from transformers.quantizers.quantizer_hqq import HqqHfQuantizer
    except ImportError:
        return f"transformers {version} has no HQQ support (no HqqConfig)"
    if not any(name in vars(HqqHfQuantizer) for name in ("create_quantized_param", "get_quantize_ops")):
        return (
            f"transformers {version} keeps HqqConfig but cannot load with it: its HQQ quantizer has no quantize op "
            f"(from_pretrained raises NotImplementedError); transformers 4.57.x loads HQQ models"
        )
    return None


if (_problem := _transformers_hqq_problem()) is not None:
    pytest.skip(_problem, allow_module_level=True)

from transformers import BertConfig, BertModel, HqqConfig, LlamaConfig, LlamaForCausalLM  # noqa: E402

from opendelta import (  # noqa: E402
    AdapterModel,
    BitFitModel,
    LoraModel,
    LowRankAdapterModel,
    ParallelAdapterModel,
    prepare_for_kbit_training,
    route_rows,
)
from opendelta.errors import OpenDeltaQuantizationWarning  # noqa: E402
from opendelta.hashing import backbone_hash  # noqa: E402
from opendelta.markers import delta_parameter_names  # noqa: E402
from opendelta.quantization import backend_of, quantized_modules  # noqa: E402
from opendelta.quantization_backends.hqq import HqqBackend  # noqa: E402
from opendelta.shapes import factory_kwargs, is_linear, linear_features  # noqa: E402
from opendelta.testing import perturb  # noqa: E402

ARCHS = {
    "llama": (
        LlamaForCausalLM,
        LlamaConfig(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        ),
    ),
    "bert": (
        BertModel,
        BertConfig(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=32,
        ),
    ),
}
DEFAULT_LORA_TARGETS = {"llama": ("q_proj", "v_proj"), "bert": ("query", "value")}
UNQUANTIZED_LINEAR = {"llama": {"lm_head"}, "bert": set()}  # HqqConfig skips lm_head by default
BLOCK_LINEARS = {"llama": 7, "bert": 6}  # linear layers in one block (BERT's pooler is outside the blocks)
INPUTS = {
    "input_ids": torch.tensor([[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]]),
    "attention_mask": torch.ones(2, 6, dtype=torch.long),
}


# ---------------------------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each tiny architecture saved once (float32, seeded), to load quantized as often as a test needs."""
    saved = {}
    for arch, (cls, config) in ARCHS.items():
        torch.manual_seed(0)
        folder = tmp_path_factory.mktemp(f"{arch}-float")
        cls(config).save_pretrained(folder)
        saved[arch] = folder
    return saved


def load_hqq(folders: dict[str, Path], arch: str) -> nn.Module:
    """The saved ``arch`` loaded through transformers' HQQ quantizer, 4 bits in groups of 64, on the CPU."""
    cls, _ = ARCHS[arch]
    return cls.from_pretrained(
        folders[arch], quantization_config=HqqConfig(nbits=4, group_size=64), device_map="cpu"
    ).eval()


def output(model: nn.Module, inputs: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    with torch.no_grad():
        return main_tensor(model(**(inputs or INPUTS)))


def main_tensor(out: object) -> torch.Tensor:
    logits = getattr(out, "logits", None)
    return logits if logits is not None else out.last_hidden_state  # type: ignore[attr-defined]


def hqq_layers(model: nn.Module) -> dict[str, HQQLinear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, HQQLinear)}


def bits(tensor: torch.Tensor) -> bytes:
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def hqq_storage(model: nn.Module) -> dict[str, bytes]:
    """Every HQQ tensor of ``model`` as raw bytes: ``W_q``, each ``meta`` tensor, the bias; by name."""
    found = {}
    for name, layer in hqq_layers(model).items():
        found[f"{name}.W_q"] = bits(layer.W_q)
        for key, value in layer.meta.items():
            if isinstance(value, torch.Tensor):
                found[f"{name}.meta.{key}"] = bits(value)
        if layer.bias is not None:
            found[f"{name}.bias"] = bits(layer.bias)
    return found


def train_step(model: nn.Module) -> dict[str, torch.Tensor]:
    """One SGD step on a squared-output loss; returns the delta parameters as they were before it."""
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.train()
    main_tensor(model(**INPUTS)).float().pow(2).mean().backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    model.eval()
    return before


# ---------------------------------------------------------------------------------------------------- the layers
@pytest.mark.parametrize("arch", ARCHS)
def test_transformers_builds_hqq_layers_the_backend_reads(folders, arch):
    model = load_hqq(folders, arch)
    layers = hqq_layers(model)
    linear_left = {n for n, m in model.named_modules() if type(m) is nn.Linear}
    assert linear_left == UNQUANTIZED_LINEAR[arch]
    assert layers and {n for n, _, _ in quantized_modules(model)} == set(layers)
    params = dict(model.named_parameters())
    buffers = {id(b) for b in model.buffers()}
    x = torch.randn(3, 128)
    for name, layer in layers.items():
        backend = backend_of(layer)
        assert isinstance(backend, HqqBackend) and is_linear(layer)
        assert isinstance(layer.W_q, nn.Parameter) and params[f"{name}.W_q"] is layer.W_q  # a parameter, not a buffer
        assert all(id(v) not in buffers for v in layer.meta.values() if isinstance(v, torch.Tensor))
        out_features, in_features = layer.meta["shape"]
        assert linear_features(layer) == (in_features, out_features)
        assert factory_kwargs(layer) == {"device": torch.device("cpu"), "dtype": torch.float32}
        weight = backend.dequantize(layer)
        assert weight.shape == (out_features, in_features) and weight.dtype == torch.float32
        expected = x[:, :in_features] @ weight.t() + (0 if layer.bias is None else layer.bias)
        with torch.no_grad():
            torch.testing.assert_close(layer(x[:, :in_features]), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_backbone_hash_is_stable_and_reads_the_scales(folders, arch):
    model = load_hqq(folders, arch)
    first = backbone_hash(model)
    assert backbone_hash(load_hqq(folders, arch)) == first  # two loads quantize alike
    output(model)
    assert backbone_hash(model) == first  # a forward changes nothing the hash reads
    LoraModel(model)
    assert backbone_hash(model) == first  # deltas are not the backbone
    layer = next(iter(hqq_layers(model).values()))
    scale = layer.meta["scale"]
    layer.meta["scale"] = scale * 1.01  # same W_q, other dequantized weights: the hash must see it
    assert backbone_hash(model) != first
    layer.meta["scale"] = scale
    assert backbone_hash(model) == first


def test_a_layer_hqq_builds_itself_hashes_its_plain_bias_and_round_trips_a_requantization():
    torch.manual_seed(0)
    layer = HQQLinear(
        nn.Linear(64, 32), BaseQuantizeConfig(nbits=4, group_size=64), compute_dtype=torch.float32, device="cpu"
    )
    backend = backend_of(layer)
    assert isinstance(backend, HqqBackend)
    assert "bias" not in layer._parameters and isinstance(layer.bias, torch.Tensor)  # HQQ keeps it as a plain tensor
    assert [tuple(t.shape) for t in backend.hash_tensors(layer, "W_q")] == [(16, 64), (32, 1), (32, 1), (32,)]
    state = backend.saved_state(layer)
    weight = backend.dequantize(layer)
    backend.requantize(layer, weight + 0.01)
    assert layer.W_q is not state["W_q"] and isinstance(layer._parameters["W_q"], nn.Parameter)
    assert (backend.dequantize(layer) - weight - 0.01).norm() < 0.2 * weight.norm()
    backend.restore(layer, state)
    assert layer._parameters["W_q"] is state["W_q"] and layer.meta is state["meta"]
    assert torch.equal(backend.dequantize(layer), weight)


def test_a_failed_requantization_leaves_the_storage_as_it_was(folders, monkeypatch):
    layer = next(iter(hqq_layers(load_hqq(folders, "llama")).values()))
    backend = backend_of(layer)
    state = backend.saved_state(layer)

    def broken(*args, **kwargs):
        raise RuntimeError("quantize failed")

    monkeypatch.setattr(layer, "quantize", broken)
    with pytest.raises(RuntimeError, match="quantize failed"):
        backend.requantize(layer, backend.dequantize(layer))
    assert layer._parameters["W_q"] is state["W_q"] and layer.meta is state["meta"]


# ---------------------------------------------------------------------------------------------------- LoRA
@pytest.mark.parametrize("arch", ARCHS)
def test_lora_defaults_target_q_and_v_with_float32_deltas(folders, arch):
    model = load_hqq(folders, arch)
    delta_model = LoraModel(model)
    hosts = {i.host for i in delta_model.insertions()}
    names = {n for n, m in model.named_modules() if m in hosts}
    assert names and all(n.rsplit(".", 1)[-1] in DEFAULT_LORA_TARGETS[arch] for n in names)
    assert len(names) == 2 * ARCHS[arch][1].num_hidden_layers and all(isinstance(h, HQQLinear) for h in hosts)
    assert {p.dtype for p in delta_model.parameters()} == {torch.float32}


METHODS = {
    "lora": lambda model: LoraModel(model),
    "lora-all-linear": lambda model: LoraModel(model, modified_modules="all-linear"),
    "bitfit": lambda model: BitFitModel(model),
    "adapter": lambda model: AdapterModel(model),
    "low-rank-adapter": lambda model: LowRankAdapterModel(model),
    "parallel-adapter": lambda model: ParallelAdapterModel(model),
}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ARCHS)
def test_a_training_step_moves_only_the_deltas(folders, arch, method):
    model = load_hqq(folders, arch)
    bare = output(model)
    storage = hqq_storage(model)
    delta_model = METHODS[method](model)
    delta_model.freeze_module(exclude=["deltas"])
    perturb(delta_model, scale=0.05)  # LoRA's B starts at zero, and A gets no gradient then
    deltas = delta_parameter_names(model)
    assert deltas and {n for n, p in model.named_parameters() if p.requires_grad} == deltas
    before = train_step(model)
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == deltas
    assert all(torch.isfinite(p.grad).all() for n, p in model.named_parameters() if n in deltas)
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if n in deltas)
    assert hqq_storage(model) == storage  # bit for bit: W_q, scale, zero, bias
    delta_model.detach()
    assert torch.equal(output(model), bare)


@pytest.mark.parametrize("arch", ARCHS)
def test_detach_and_attach_are_exact(folders, arch):
    model = load_hqq(folders, arch)
    bare = output(model)
    delta_model = LoraModel(model)
    perturb(delta_model, scale=0.05)
    tuned = output(model)
    assert not torch.allclose(tuned, bare)
    delta_model.detach()
    assert torch.equal(output(model), bare)
    delta_model.attach()
    assert torch.equal(output(model), tuned)


@pytest.mark.parametrize("arch", ARCHS)
def test_a_saved_delta_loads_onto_a_freshly_loaded_hqq_backbone(folders, arch, tmp_path):
    model = load_hqq(folders, arch)
    delta_model = LoraModel(model)
    perturb(delta_model, scale=0.05)
    tuned = output(model)
    delta_model.save_finetuned(tmp_path)
    fresh = load_hqq(folders, arch)
    assert backbone_hash(fresh) == backbone_hash(model)
    LoraModel.from_finetuned(tmp_path, fresh)
    assert torch.equal(output(fresh), tuned)


def merge_errors(delta_model: LoraModel) -> tuple[float, float]:
    """The largest relative weight error and lost share of the update over the layers a merge requantized."""
    records = [i.merge_record.quantized for i in delta_model.insertions() if i.merge_record is not None]
    assert records and all(r is not None for r in records)
    return max(r.weight_error for r in records), max(r.update_error for r in records)


@pytest.mark.parametrize("modified", [None, "all-linear"])
@pytest.mark.parametrize("arch", ARCHS)
def test_merge_requantizes_with_a_warning_and_unmerge_restores_the_storage(folders, arch, modified):
    model = load_hqq(folders, arch)
    bare = output(model)
    delta_model = LoraModel(model) if modified is None else LoraModel(model, modified_modules=modified)
    perturb(delta_model, scale=0.02)
    tuned = output(model)
    storage = hqq_storage(model)
    objects = {n: (layer.W_q, layer.meta) for n, layer in hqq_layers(model).items()}
    with pytest.warns(OpenDeltaQuantizationWarning, match=r"quantized layer\(s\) \(hqq\)"):
        delta_model.merge()
    weight_error, update_error = merge_errors(delta_model)
    assert weight_error < 0.15 and update_error < 0.5  # 4-bit rounding of W + update; most of the update survives
    merged = output(model)
    # closer to the tuned model than the bare backbone is: the merge kept the update
    assert (merged - tuned).norm() < 0.5 * (bare - tuned).norm()
    assert hqq_storage(model) != storage
    delta_model.unmerge()
    assert hqq_storage(model) == storage
    assert all(layer.W_q is objects[n][0] and layer.meta is objects[n][1] for n, layer in hqq_layers(model).items())
    assert torch.equal(output(model), tuned)


_RELOAD_WITHOUT_HQQ = textwrap.dedent(
    """
    import os, sys
    site, shadow, folder, inputs, out = sys.argv[1:]
    sys.path[:] = [shadow if os.path.realpath(p) == site else p for p in sys.path]  # the same packages but hqq
    import importlib.util
    assert importlib.util.find_spec("hqq") is None
    import torch
    from transformers import AutoModel
    model = AutoModel.from_pretrained(folder)
    assert not any("hqq" in type(m).__module__ for m in model.modules())
    with torch.no_grad():
        torch.save(model(**torch.load(inputs, weights_only=True)).last_hidden_state, out)
    """
)


def reload_without_hqq(folder: Path, tmp_path: Path) -> torch.Tensor:
    """``folder``'s model loaded and run in a process where hqq is not installed (its site dir, hqq left out)."""
    import hqq

    site = Path(hqq.__file__).resolve().parents[1]
    shadow = tmp_path / "site-without-hqq"
    shadow.mkdir()
    for entry in site.iterdir():
        if not entry.name.lower().startswith("hqq"):
            (shadow / entry.name).symlink_to(entry)
    torch.save(INPUTS, tmp_path / "inputs.pt")
    subprocess.run(
        [
            sys.executable,
            "-c",
            _RELOAD_WITHOUT_HQQ,
            str(site),
            str(shadow),
            str(folder),
            str(tmp_path / "inputs.pt"),
            str(tmp_path / "out.pt"),
        ],
        check=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=120,
    )
    return torch.load(tmp_path / "out.pt", weights_only=True)


@pytest.mark.parametrize("arch", ARCHS)
def test_merge_and_unload_dequantized_gives_a_float_model_that_reloads_without_hqq(folders, arch, tmp_path):
    model = load_hqq(folders, arch)
    delta_model = LoraModel(model)
    perturb(delta_model, scale=0.05)
    tuned = output(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", OpenDeltaQuantizationWarning)  # nothing is requantized
        plain = delta_model.merge_and_unload(dequantize=True)
    assert not hqq_layers(plain) and not quantized_modules(plain)
    linears = [m for m in plain.modules() if isinstance(m, nn.Linear)]
    assert linears and all(type(m) is nn.Linear and m.weight.dtype == torch.float32 for m in linears)
    torch.testing.assert_close(output(plain), tuned, rtol=1e-5, atol=1e-5)
    plain.save_pretrained(tmp_path / "merged")
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config
    with safe_open(tmp_path / "merged" / "model.safetensors", "pt") as saved:
        assert not any(".W_q" in key or key.endswith((".scale", ".zero")) for key in saved.keys())
    reloaded = ARCHS[arch][0].from_pretrained(tmp_path / "merged").eval()
    assert not hqq_layers(reloaded)
    assert torch.equal(output(reloaded), output(plain))
    if arch == "bert":  # and in a process without hqq (once: a process costs seconds)
        assert torch.equal(reload_without_hqq(tmp_path / "merged", tmp_path), output(plain))


def test_merge_and_unload_keeps_an_hqq_model_that_transformers_saves_and_reloads(folders, tmp_path):
    model = load_hqq(folders, "llama")
    delta_model = LoraModel(model)
    perturb(delta_model, scale=0.02)
    with pytest.warns(OpenDeltaQuantizationWarning):
        merged = delta_model.merge_and_unload()
    assert hqq_layers(merged) and not delta_parameter_names(merged)
    expected = output(merged)
    merged.save_pretrained(tmp_path)
    reloaded = ARCHS["llama"][0].from_pretrained(tmp_path, device_map="cpu").eval()  # HQQ's pre-quantized path
    assert hqq_storage(reloaded) == hqq_storage(merged)
    assert backbone_hash(reloaded) == backbone_hash(merged)
    assert torch.equal(output(reloaded), expected)
    again = LoraModel(reloaded)  # the quant_config HQQ rebuilt from the checkpoint requantizes too
    perturb(again, scale=0.02)
    tuned = output(reloaded)
    with pytest.warns(OpenDeltaQuantizationWarning):
        again.merge()
    again.unmerge()
    assert hqq_storage(reloaded) == hqq_storage(merged) and torch.equal(output(reloaded), tuned)


def test_a_delta_saved_while_merged_loads_onto_a_fresh_backbone(folders, tmp_path):
    model = load_hqq(folders, "llama")
    delta_model = LoraModel(model)
    perturb(delta_model, scale=0.02)
    tuned = output(model)
    with pytest.warns(OpenDeltaQuantizationWarning):
        delta_model.merge()
    delta_model.save_finetuned(tmp_path)
    fresh = load_hqq(folders, "llama")
    LoraModel.from_finetuned(tmp_path, fresh)
    assert torch.equal(output(fresh), tuned)


@pytest.mark.xfail(
    strict=True,
    reason=(
        "HQQLinear overrides state_dict() with one that writes its own W_q and meta and never recurses into its "
        "children, where core places LoRA ('q_proj.lora'): model.state_dict() (and so freeze_module's trimmed one) "
        "holds none of those deltas; save_finetuned is unaffected (it reads the delta modules)"
    ),
)
def test_the_models_state_dict_holds_the_deltas_placed_on_hqq_layers(folders):
    model = load_hqq(folders, "llama")
    LoraModel(model).freeze_module()
    assert set(model.state_dict()) == delta_parameter_names(model)


# ---------------------------------------------------------------------------------------------------- all-linear
@pytest.mark.parametrize("arch", ARCHS)
def test_all_linear_targets_every_hqq_layer_in_the_blocks(folders, arch):
    model = load_hqq(folders, arch)
    delta_model = LoraModel(model, modified_modules="all-linear")
    hosts = [i.host for i in delta_model.insertions()]
    config = ARCHS[arch][1]
    assert len(hosts) == BLOCK_LINEARS[arch] * config.num_hidden_layers
    assert all(isinstance(h, HQQLinear) for h in hosts)
    names = {n for n, m in model.named_modules() if any(m is h for h in hosts)}
    assert not any(n.startswith(("lm_head", "pooler")) for n in names)


# ---------------------------------------------------------------------------------------------------- serving
def test_route_rows_sends_each_row_through_its_own_lora(folders):
    model = load_hqq(folders, "llama")
    tasks = {"a": LoraModel(model, lora_r=4), "b": LoraModel(model, lora_r=2)}
    for seed, task in enumerate(tasks.values()):
        perturb(task, seed=seed, scale=0.1)
    inputs = {k: v.repeat(2, 1)[:3] for k, v in INPUTS.items()}
    plan = ["a", None, "b"]
    with route_rows(model, [tasks[name] if name else None for name in plan]):
        routed = output(model, inputs)
    for row, name in enumerate(plan):
        for other, task in tasks.items():
            if other != name:
                task.detach()
        try:
            alone = output(model, inputs)
        finally:
            for other, task in tasks.items():
                if other != name:
                    task.attach()
        torch.testing.assert_close(routed[row], alone[row], rtol=1e-5, atol=1e-5)


def test_prepare_for_kbit_training_then_lora_trains_through_hqq_layers(folders):
    model = prepare_for_kbit_training(load_hqq(folders, "llama"))
    storage = hqq_storage(model)
    LoraModel(model)
    model.train()
    model(**INPUTS, labels=INPUTS["input_ids"]).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == delta_parameter_names(model)
    assert hqq_storage(model) == storage
