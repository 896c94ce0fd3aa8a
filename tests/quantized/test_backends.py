"""Every delta method that targets linear layers, on backbones quantized by the real libraries through transformers.

Tiny Llama and BERT models are built from configs, saved, and loaded back with ``quantization_config=`` by
transformers' own quantizers (bitsandbytes int8 / nf4 / fp4, torchao int8 weight-only, optimum-quanto int8 / int4):
no mocks. For each backend, architecture and method: the deltas are float32 and alone receive gradients, the
quantized storage is bit-identical after training, detach/attach are exact, and a saved delta loads onto a freshly
quantized backbone (the backbone hash reads the quantized storage) with the same outputs. Merging requantizes with
a warning that gives the loss, unmerging restores the storage bit for bit, and ``merge_and_unload(dequantize=True)``
returns a plain float model that transformers saves and reloads without the quantization library. Per-row routing
of two LoRA tasks over one quantized backbone equals separate passes.

A backend whose library is not installed is skipped with the reason printed (``-rs``), never silently.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import opendelta
from opendelta import AutoDeltaModel, DeltaStateError, route_rows
from opendelta.errors import OpenDeltaQuantizationWarning
from opendelta.quantization import quantized_modules

transformers = pytest.importorskip("transformers")


def _bnb(**kwargs: object) -> Callable[[], object]:
    return lambda: transformers.BitsAndBytesConfig(**kwargs)


def _torchao_int8() -> object:
    from torchao.quantization import Int8WeightOnlyConfig

    return transformers.TorchAoConfig(Int8WeightOnlyConfig())


BACKENDS: dict[str, tuple[str, Callable[[], object]]] = {
    "bnb-int8": ("bitsandbytes", _bnb(load_in_8bit=True)),
    "bnb-nf4": (
        "bitsandbytes",
        _bnb(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
    ),
    "bnb-fp4": (
        "bitsandbytes",
        _bnb(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32),
    ),
    "torchao-int8": ("torchao", _torchao_int8),
    "quanto-int8": ("optimum.quanto", lambda: transformers.QuantoConfig(weights="int8")),
    "quanto-int4": ("optimum.quanto", lambda: transformers.QuantoConfig(weights="int4")),
}
"""Backend id -> (the import it needs, its transformers quantization config)."""

MERGE_TOLERANCE = {"bnb-int8": 0.05, "bnb-nf4": 0.5, "bnb-fp4": 0.5, "quanto-int4": 0.5}
"""Largest |merged - unmerged| output difference accepted after a requantizing merge (default 0.05): a merge into
4-bit storage rounds the whole weight again."""

METHODS: dict[str, dict[str, object]] = {
    "lora": {},
    "lora-dora": {"use_dora": True},
    "bitfit": {},
    "adapter": {},
    "low_rank_adapter": {},
    "parallel_adapter": {},
    "ia3": {},
    "loha": {},
    "lokr": {},
    "vera": {},
    "adalora": {"lora_alpha": 256.0},  # its update starts at E = 0 with A, B ~ N(0, 0.02): two steps would move
    # tiny BERT's logits by < 1e-6 at the default scale (8 / init_r), too little to show training did anything
    "fourierft": {},
    "oft": {},
    "boft": {},
}
"""Method name (``lora-dora``: LoRA with an option) -> extra constructor arguments (their defaults otherwise: no
modified_modules anywhere)."""


def _installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except ModuleNotFoundError:  # "optimum" itself missing
        return False


def _require(backend: str) -> Callable[[], object]:
    package, make_config = BACKENDS[backend]
    if not _installed(package):
        pytest.skip(f"{backend}: the quantization library {package} is not installed (nox -s tests_quant has it)")
    return make_config


def _require_method(method: str) -> type:
    try:
        return opendelta.get_method(method).model_cls
    except Exception as exc:
        pytest.skip(f"method {method}: its plugin is not installed ({type(exc).__name__})")


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny Llama (causal LM) and a tiny BERT (encoder), saved once, float32."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("tiny")
    llama = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    bert = transformers.BertModel(
        transformers.BertConfig(
            vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4
        )
    )
    out = {}
    for name, model in (("llama", llama), ("bert", bert)):
        out[name] = root / name
        model.save_pretrained(out[name])
    return out


def _load(folder: Path, arch: str, make_config: Callable[[], object]) -> nn.Module:
    auto = transformers.AutoModelForCausalLM if arch == "llama" else transformers.AutoModel
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the libraries' own notices (bnb's fp16 cast of int8 inputs...)
        # float32 for what stays unquantized (transformers 4.57 would pick float16 for bitsandbytes)
        model = auto.from_pretrained(folder, quantization_config=make_config(), device_map="cpu", dtype=torch.float32)
    assert quantized_modules(model), "the backbone was not quantized: the test would check nothing"
    return model


IDS = torch.tensor([[5, 17, 3, 99, 42, 7], [8, 1, 64, 12, 30, 2]])


def _outputs(model: nn.Module) -> torch.Tensor:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model(input_ids=IDS)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _loss(model: nn.Module, arch: str) -> torch.Tensor:
    if arch == "llama":
        return model(input_ids=IDS, labels=IDS).loss
    return model(input_ids=IDS).last_hidden_state.pow(2).mean()


def _plain(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors holding ``tensor`` (a quantized tensor subclass's inner tensors)."""
    if type(tensor) in (torch.Tensor, nn.Parameter) or not hasattr(tensor, "__tensor_flatten__"):
        return [tensor.detach().clone()]
    return [p for name in tensor.__tensor_flatten__()[0] for p in _plain(getattr(tensor, name))]


def _storage(model: nn.Module) -> dict[str, list[torch.Tensor]]:
    """Every quantized layer's tensors (parameters, buffers, and a 4-bit weight's quant-state tensors), copied."""
    out = {}
    for name, module, _backend in quantized_modules(model):
        tensors = {**dict(module.named_parameters(recurse=False)), **dict(module.named_buffers(recurse=False))}
        for key, tensor in tensors.items():
            out[f"{name}.{key}"] = _plain(tensor)
            state = getattr(tensor, "quant_state", None)
            if state is not None:
                out[f"{name}.{key}.absmax"] = [state.absmax.clone()]
    return out


def _assert_same_storage(before: dict[str, list[torch.Tensor]], after: dict[str, list[torch.Tensor]]) -> None:
    assert before.keys() == after.keys()
    for name, tensors in before.items():
        assert all(torch.equal(a, b) for a, b in zip(tensors, after[name], strict=True)), name


def _train(model: nn.Module, delta: nn.Module, arch: str, steps: int = 2) -> None:
    """A few AdamW steps on the delta, in training mode (bitsandbytes trains only through its training layout)."""
    model.train()
    trainable = [p for p in delta.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=5e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _loss(model, arch).backward()
        optimizer.step()
    model.eval()


BACKEND_IDS = list(BACKENDS)


@pytest.mark.parametrize("arch", ["llama", "bert"])
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("backend", BACKEND_IDS)
def test_method_trains_on_quantized_backbone(
    folders: dict[str, Path], tmp_path: Path, backend: str, method: str, arch: str
) -> None:
    make_config = _require(backend)
    cls = _require_method(method.split("-")[0])
    model = _load(folders[arch], arch, make_config)
    delta = cls(backbone_model=model, **METHODS[method])
    delta.freeze_module(exclude=["deltas"])
    delta.detach()
    bare = _outputs(model)
    delta.attach()
    storage = _storage(model)
    own = [p for p in delta.parameters() if p.requires_grad]
    assert own and all(p.dtype == torch.float32 for p in own), "deltas must be built in the compute dtype"
    _train(model, delta, arch)
    ids_of_own = {id(p) for p in own}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.train()
        _loss(model, arch).backward()
        model.eval()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in own), "no delta parameter got a gradient"
    assert all(p.grad is None for p in model.parameters() if id(p) not in ids_of_own), "a backbone tensor got one"
    _assert_same_storage(storage, _storage(model))
    tuned = _outputs(model)
    assert (tuned - bare).abs().max() > 1e-6, "training changed nothing: the test would check nothing"

    delta.detach()
    assert torch.equal(_outputs(model), bare)
    delta.attach()
    assert torch.equal(_outputs(model), tuned)

    delta.save_finetuned(tmp_path / "delta")
    fresh = _load(folders[arch], arch, make_config)
    loaded = AutoDeltaModel.from_finetuned(tmp_path / "delta", backbone_model=fresh)
    assert type(loaded) is cls
    torch.testing.assert_close(_outputs(fresh), tuned, rtol=0, atol=1e-6)


def _trained_lora(folders: dict[str, Path], arch: str, make_config: Callable[[], object], **options: object) -> tuple:
    model = _load(folders[arch], arch, make_config)
    delta = _require_method("lora")(backbone_model=model, **options)
    delta.freeze_module(exclude=["deltas"])
    _train(model, delta, arch)
    return model, delta


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("arch", ["llama", "bert"])
@pytest.mark.parametrize("backend", BACKEND_IDS)
def test_merge_requantizes_with_the_loss_reported_and_unmerge_restores_the_storage(
    folders: dict[str, Path], backend: str, arch: str, dora: bool
) -> None:
    model, delta = _trained_lora(folders, arch, _require(backend), use_dora=dora)
    tuned, storage = _outputs(model), _storage(model)
    with pytest.warns(OpenDeltaQuantizationWarning, match=r"quantized layer\(s\).*differ from W \+ delta by up to"):
        assert delta.merge() > 0
    merged = _outputs(model)
    assert (merged - tuned).abs().max() < MERGE_TOLERANCE.get(backend, 0.05)
    changed = _storage(model)
    rewritten = [n for n in storage if not all(map(torch.equal, storage[n], changed[n]))]
    assert rewritten, "the merge left every quantized tensor as it was"
    delta.unmerge()
    _assert_same_storage(storage, _storage(model))
    assert torch.equal(_outputs(model), tuned)


@pytest.mark.parametrize("backend", BACKEND_IDS)
def test_ia3_merges_into_quantized_weights_through_the_backend(folders: dict[str, Path], backend: str) -> None:
    """A multiplicative delta too: IA3's row and column scalings are read off the dequantized weight."""
    model = _load(folders["llama"], "llama", _require(backend))
    delta = _require_method("ia3")(backbone_model=model)
    delta.freeze_module(exclude=["deltas"])
    _train(model, delta, "llama")
    tuned, storage = _outputs(model), _storage(model)
    with pytest.warns(OpenDeltaQuantizationWarning):
        delta.merge()
    assert (_outputs(model) - tuned).abs().max() < MERGE_TOLERANCE.get(backend, 0.05)
    delta.unmerge()
    _assert_same_storage(storage, _storage(model))
    assert torch.equal(_outputs(model), tuned)


@pytest.mark.parametrize("arch", ["llama", "bert"])
@pytest.mark.parametrize("backend", BACKEND_IDS)
def test_merge_and_unload_dequantize_gives_a_plain_float_model(
    folders: dict[str, Path], tmp_path: Path, backend: str, arch: str
) -> None:
    model, delta = _trained_lora(folders, arch, _require(backend))
    tuned = _outputs(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", OpenDeltaQuantizationWarning)  # no requantization: no loss to report
        plain = delta.merge_and_unload(dequantize=True)
    assert not quantized_modules(plain)
    assert not getattr(plain, "is_quantized", False)
    assert all(p.is_floating_point() for p in plain.parameters())
    out = _outputs(plain)
    # the float model computes deq(q(W)) x exactly; bitsandbytes' CPU kernels compute in lower precision (int8 also
    # quantizes the activations, the 4-bit inference kernel works in bfloat16)
    torch.testing.assert_close(out, tuned, rtol=0, atol=5e-2 if backend.startswith("bnb") else 1e-4)
    plain.save_pretrained(tmp_path / "plain")
    auto = transformers.AutoModelForCausalLM if arch == "llama" else transformers.AutoModel
    reloaded = auto.from_pretrained(tmp_path / "plain")
    assert not quantized_modules(reloaded)
    torch.testing.assert_close(_outputs(reloaded), out, rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", BACKEND_IDS)
def test_two_lora_tasks_route_per_row_over_one_quantized_backbone(folders: dict[str, Path], backend: str) -> None:
    make_config = _require(backend)
    lora = _require_method("lora")
    model = _load(folders["llama"], "llama", make_config)
    tasks = []
    for seed in (1, 2):
        task = lora(backbone_model=model)
        torch.manual_seed(seed)
        with torch.no_grad():
            for name, param in task.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.2)
        tasks.append(task)
    separate = []
    for task in tasks:
        for other in tasks:
            other.detach() if other is not task else other.attach()
        separate.append(_outputs(model))
    for task in tasks:
        task.attach()
    with route_rows(model, [tasks[0], tasks[1]]):
        routed = _outputs(model)
    torch.testing.assert_close(routed[0], separate[0][0], rtol=0, atol=1e-5)
    torch.testing.assert_close(routed[1], separate[1][1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", ["bnb-nf4", "torchao-int8", "quanto-int8"])
def test_all_linear_reaches_the_quantized_layers(folders: dict[str, Path], backend: str) -> None:
    model = _load(folders["llama"], "llama", _require(backend))
    delta = _require_method("lora")(backbone_model=model, modified_modules="all-linear")
    hosts = {id(t.module) for t in delta.targets}
    quantized = {id(m) for _n, m, _b in quantized_modules(model)}
    assert hosts == quantized  # every linear layer of the blocks, which are all quantized; never the head


def test_prepare_for_kbit_training_keeps_gradients_flowing_after_inference(folders: dict[str, Path]) -> None:
    """bitsandbytes repacks 4-bit weights for a CPU kernel at the first eval call; no gradient flows through it."""
    model = _load(folders["llama"], "llama", _require("bnb-nf4"))
    _outputs(model)  # eval, no grad: the repacking happens here
    opendelta.prepare_for_kbit_training(model)
    delta = _require_method("lora")(backbone_model=model)
    delta.freeze_module(exclude=["deltas"])
    _outputs(model)  # inference again between training steps
    model.train()
    _loss(model, "llama").backward()
    # lora_B starts at zero, so only lora_B gets a gradient on the first step; it must reach the first block
    first_b = [p for n, p in model.named_parameters() if "layers.0." in n and "lora_B" in n]
    assert first_b and all(p.grad is not None and p.grad.abs().sum() > 0 for p in first_b)
    assert model.is_gradient_checkpointing


def test_a_torchao_tensor_that_cannot_be_requantized_is_refused_by_name(folders: dict[str, Path]) -> None:
    """float8 weights dequantize (so they train and unload to float) but OpenDelta requantizes only Int8Tensor."""
    _require("torchao-int8")
    from torchao.quantization import Float8WeightOnlyConfig

    model = _load(folders["llama"], "llama", lambda: transformers.TorchAoConfig(Float8WeightOnlyConfig()))
    delta, tuned = _trained_lora_on(model, "llama")
    storage = _storage(model)
    with pytest.raises(DeltaStateError, match=r"self_attn\.q_proj \(torchao\): torchao Float8Tensor weights can be"):
        delta.merge()
    assert not delta.merged and delta.attached and torch.equal(_outputs(model), tuned)
    _assert_same_storage(storage, _storage(model))
    plain = delta.merge_and_unload(dequantize=True)
    assert not quantized_modules(plain)
    torch.testing.assert_close(_outputs(plain), tuned, rtol=0, atol=1e-4)


def _trained_lora_on(model: nn.Module, arch: str) -> tuple:
    delta = _require_method("lora")(backbone_model=model)
    delta.freeze_module(exclude=["deltas"])
    _train(model, delta, arch)
    return delta, _outputs(model)
