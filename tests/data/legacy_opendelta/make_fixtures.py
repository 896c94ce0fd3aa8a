"""Generate the OpenDelta 0.3.x checkpoints that ``tests/test_legacy_checkpoints.py`` loads, with the REAL original.

Each case folder is what the original's ``save_finetuned`` wrote (``config.json`` + ``pytorch_model.bin``), plus what
the test needs to check it: ``case.json`` (architecture, model class, backbone file, the original call, whether the
checkpoint must be refused, generator versions) and ``expected.safetensors`` (the inputs, the bare backbone's output
and the output with the original's delta attached).
The backbones are stored once per model class in ``backbones/``: parameters and the config values they were built from
(random initialisation differs between transformers versions, so a seed alone would not rebuild them).

The original does not import with our dev environments (transformers >= 4.46, and it pulls DeltaCenter), so run this
in a throwaway virtualenv, never in ``.venv``/``.venv457``::

    python3.11 -m venv /tmp/legacy
    /tmp/legacy/bin/pip install -c constraints.txt torch==2.13.0 transformers==4.45.2 decorator rich pyyaml \\
        'setuptools<81' yacs oss2 web.py
    /tmp/legacy/bin/pip install --no-deps opendelta==0.3.2 delta-center-client==0.0.4
    /tmp/legacy/bin/python tests/data/legacy_opendelta/make_fixtures.py

It rewrites every case folder (deterministically, except the pickles' zip timestamps). The tiny models come from
``opendelta-core/src/opendelta/testing/tiny_models.py``, loaded by path (it imports nothing from our library, whose
import name ``opendelta`` the original takes here).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
TINY_MODELS = ROOT / "opendelta-core" / "src" / "opendelta" / "testing" / "tiny_models.py"
_spec = importlib.util.spec_from_file_location("tiny_models", TINY_MODELS)
tiny_models = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tiny_models)

import opendelta  # noqa: E402  (the ORIGINAL OpenDelta 0.3.x, installed in the throwaway venv)

PREFIX = {"prefix_token_num": 3, "mid_dim": 16, "embed_dim": 8}
CASES: dict[str, dict[str, Any]] = {
    # LoRA with its default common names, trained with the task head (freeze_module(exclude=[..., "classifier"])).
    "lora_bert_with_head": {
        "arch": "bert",
        "method": "LoraModel",
        "kwargs": {"lora_r": 4, "lora_alpha": 8},
        "unfrozen": ["deltas", "classifier"],
    },
    # LoRA on real module names (the original had no default mapping for BART at all).
    "lora_bart_real_names": {
        "arch": "bart",
        "method": "LoraModel",
        "kwargs": {"modified_modules": ["q_proj", "v_proj"], "lora_r": 2, "lora_alpha": 6},
        "noise": 1.0,  # BART's classification logits are small: a larger step so the change stands out
    },
    # Saved without freeze_module(): the original then wrote the WHOLE backbone state dict (with transformers < 4.31
    # that included the position_ids buffers; the test adds one by hand).
    "lora_roberta_unfrozen": {
        "arch": "roberta",
        "method": "LoraModel",
        "kwargs": {"lora_r": 2},
        "unfrozen": None,
    },
    "adapter_t5": {"arch": "t5", "method": "AdapterModel", "kwargs": {"bottleneck_dim": 6}},
    # BitFit trained the backbone's own biases in place: the checkpoint holds backbone names (...query.bias).
    "bitfit_bert": {"arch": "bert", "method": "BitFitModel", "kwargs": {}},
    "low_rank_adapter_gpt2": {"arch": "gpt2", "method": "LowRankAdapterModel", "kwargs": {"reduction_factor": 8}},
    # The original named this delta "compactor".
    "compacter_bert": {"arch": "bert", "method": "CompacterModel", "kwargs": {"reduction_factor": 4}},
    # Flat pairs ['attn@', 'attn@', 'ff@.w1@', 'ff@.w2@'], weights stored under the span's first module.
    "parallel_adapter_bert": {"arch": "bert", "method": "ParallelAdapterModel", "kwargs": {"bottleneck_dim": 6}},
    # Placed on the root model of an encoder (BertForSequenceClassification), on the encoder of an encoder-decoder.
    "soft_prompt_bert": {
        "arch": "bert",
        "method": "SoftPromptModel",
        "kwargs": {"soft_token_num": 3, "token_init": False},
    },
    "soft_prompt_t5": {
        "arch": "t5",
        "method": "SoftPromptModel",
        "kwargs": {"soft_token_num": 5, "token_init": False},
    },
    # The original's one shared network on the first block: its outputs are reproduced on GPT-2...
    "prefix_gpt2": {"arch": "gpt2", "method": "PrefixModel", "kwargs": PREFIX},
    # ...but not where it went through attention internals differently (T5's position bias, BART's masks): refused.
    "prefix_t5": {"arch": "t5", "method": "PrefixModel", "kwargs": PREFIX, "refused": True},
    "prefix_bart": {
        "arch": "bart",
        "method": "PrefixModel",
        "kwargs": {**PREFIX, "modified_modules": ["self_attn"]},
        "refused": True,
    },
}


def _head(arch: str) -> str:
    return "T5ForConditionalGeneration" if arch == "t5" else tiny_models._default_head(arch)


def _backbone(arch: str) -> tuple[torch.nn.Module, str]:
    """The tiny model, and the stem of its files under ``backbones/`` (written once per class).

    ``<class>.safetensors`` holds its parameters, ``<class>.json`` the config values it was built from, so the test
    rebuilds exactly this model even if ``tiny_models`` changes later.
    """
    head = _head(arch)
    model = tiny_models.tiny_model(arch, head=head, seed=1234)
    stem = HERE / "backbones" / head
    stem.parent.mkdir(exist_ok=True)
    save_file({n: p.detach().clone().contiguous() for n, p in model.named_parameters()}, f"{stem}.safetensors")
    config = {
        "model_type": arch,
        "vocab_size": tiny_models.VOCAB_SIZE,
        "num_labels": tiny_models.NUM_LABELS,
        **tiny_models.SPECIAL_TOKEN_IDS[arch],
        **tiny_models._ARCH_KWARGS[arch],
    }
    Path(f"{stem}.json").write_text(json.dumps(config, indent=2) + "\n")
    return model, f"backbones/{head}"


def _output(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():  # the original's soft prompt extends the caller's mask in place: pass copies
        return tiny_models.model_output_tensor(model(**{k: v.clone() for k, v in inputs.items()})).clone()


def make_case(name: str, spec: dict[str, Any]) -> None:
    """Build, perturb, save and record one case."""
    folder = HERE / name
    shutil.rmtree(folder, ignore_errors=True)
    model, backbone_file = _backbone(spec["arch"])
    inputs = tiny_models.tiny_inputs(spec["arch"], seed=7)
    bare = _output(model, inputs)
    delta_model = getattr(opendelta, spec["method"])(model, **spec["kwargs"])
    unfrozen = spec.get("unfrozen", ["deltas"])
    if unfrozen is not None:
        delta_model.freeze_module(exclude=unfrozen)
    generator = torch.Generator().manual_seed(sum(map(ord, name)))
    with torch.no_grad():  # "training": move every trainable tensor, so the checkpoint is not its initialisation
        trained = list(delta_model.parameters())
        if unfrozen is not None:  # what freeze_module left trainable: the deltas, BitFit's biases, a task head
            trained = [p for p in model.parameters() if p.requires_grad]
        for param in trained:
            param.add_(torch.randn(param.shape, generator=generator) * spec.get("noise", 0.2))
    delta_model.save_finetuned(str(folder))
    expected = {"bare_output": bare, "output": _output(model, inputs)}
    expected.update({f"input.{k}": v for k, v in inputs.items()})
    save_file(expected, str(folder / "expected.safetensors"))
    case = {
        "arch": spec["arch"],
        "model_class": type(model).__name__,
        "backbone": backbone_file,
        "original_call": f"{spec['method']}(model, **{spec['kwargs']!r}); "
        + (f"freeze_module(exclude={unfrozen!r})" if unfrozen is not None else "no freeze_module()"),
        "trained_backbone_modules": [m for m in unfrozen or [] if m != "deltas"],
        "refused": spec.get("refused", False),
        "generated_with": {
            "opendelta": "0.3.2",
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        },
    }
    (folder / "case.json").write_text(json.dumps(case, indent=2) + "\n")
    change = float((expected["output"] - bare).abs().max())
    print(f"{name}: {sorted(p.name for p in folder.iterdir())}, max output change {change:.3g}")


if __name__ == "__main__":
    for case_name, case_spec in CASES.items():
        make_case(case_name, case_spec)
