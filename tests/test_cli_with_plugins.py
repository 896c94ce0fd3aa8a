"""The ``opendelta`` command line with the real method plugins installed: plugins, inspect and merge."""

import json
import re
import subprocess
import sys

import pytest
import torch
import transformers

from opendelta import get_method, list_methods
from opendelta.cli import main
from opendelta.testing import perturb, tiny_inputs, tiny_model

INSTALLED = [spec.name for spec in list_methods()]


def logits(model, arch):
    with torch.no_grad():
        return model(**tiny_inputs(arch)).logits


def test_plugins_lists_every_installed_method_with_its_distribution(capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert INSTALLED, "no method plugin is installed"
    for spec in list_methods():
        row = rf"^  {spec.name}\s+{spec.model_cls.__name__}\s+{spec.config_cls.__name__}\s+{spec.distribution} \d"
        assert re.search(row, out, re.MULTILINE), spec.name
        assert spec.distribution.startswith("opendelta-")


@pytest.mark.parametrize("method", INSTALLED)
def test_inspect_tells_the_delta_tensors_of_every_method_from_the_backbone_ones(method, tmp_path, capsys):
    model = tiny_model("bert")
    delta_model = get_method(method).model_cls(model)
    delta_model.freeze_module(exclude=["deltas", "classifier"])
    delta_model.save_finetuned(tmp_path / "delta")
    assert main(["inspect", str(tmp_path / "delta"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    own = delta_model.delta_state_dict()
    assert report["tensors"]["delta"] == {
        "count": len(own),
        "parameters": sum(t.numel() for t in own.values()),
        "bytes": sum(t.numel() * t.element_size() for t in own.values()),
    }
    assert report["tensors"]["backbone"]["names"] == ["classifier.bias", "classifier.weight"]
    assert report["method"]["distribution"] == get_method(method).distribution
    assert report["weights"]["verified"] is True


@pytest.mark.parametrize(
    "method, arch, head",
    [
        ("lora", "bert", ["classifier"]),  # LoRA plus a trained head: both reach the merged model
        ("lora", "gpt2", []),  # GPT-2's fused, transposed Conv1D c_attn: only the q and v slices change
        ("bitfit", "bert", []),
    ],
)
def test_merge_writes_a_plain_model_that_computes_what_backbone_and_delta_did(method, arch, head, tmp_path, capsys):
    if method not in INSTALLED:
        pytest.skip(f"opendelta-{method} is not installed")  # tests_all installs every plugin
    tiny_model(arch).save_pretrained(tmp_path / "backbone")
    model = tiny_model(arch)
    delta_model = get_method(method).model_cls(model)
    delta_model.freeze_module(exclude=["deltas", *head])
    perturb(delta_model, scale=0.5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if head and name.startswith(head[0]):
                param.add_(0.25)  # a trained head
    expected = logits(model, arch)
    delta_model.save_finetuned(tmp_path / "delta")

    out = tmp_path / "merged"
    argv = ["merge", "--delta", str(tmp_path / "delta"), "--backbone", str(tmp_path / "backbone"), "--output", str(out)]
    assert main([*argv, "--safe-merge"]) == 0
    assert f"merged the {method!r} delta" in capsys.readouterr().out
    cls = getattr(transformers, type(model).__name__)
    merged = cls.from_pretrained(out).eval()  # plain transformers: no opendelta hook, child or parameter
    assert set(merged.state_dict()) == set(tiny_model(arch).state_dict())
    torch.testing.assert_close(logits(merged, arch), expected, rtol=0, atol=1e-5)


def test_merge_refuses_an_adapter_and_writes_nothing(tmp_path, capsys):
    if "adapter" not in INSTALLED:
        pytest.skip("opendelta-adapter is not installed")
    tiny_model("bert").save_pretrained(tmp_path / "backbone")
    delta_model = get_method("adapter").model_cls(tiny_model("bert"))
    delta_model.freeze_module()
    delta_model.save_finetuned(tmp_path / "delta")
    argv = ["merge", "--delta", str(tmp_path / "delta"), "--backbone", str(tmp_path / "backbone")]
    capsys.readouterr()
    assert main([*argv, "--output", str(tmp_path / "merged")]) == 1
    err = capsys.readouterr().err.splitlines()[-1]  # after transformers' progress bars, if any
    assert err.startswith("opendelta merge: error: the 'adapter' delta cannot be merged into plain weights")
    assert "such as lora and bitfit" in err
    assert not (tmp_path / "merged").exists()


def test_merge_onto_a_headless_backbone_reports_that_the_delta_supplied_the_head(tmp_path):
    if "lora" not in INSTALLED:
        pytest.skip("opendelta-lora is not installed")
    model = tiny_model("bert")
    model.bert.save_pretrained(tmp_path / "backbone")  # a published base model: no classifier in its weights
    delta_model = get_method("lora").model_cls(model)
    perturb(delta_model, scale=0.5)
    delta_model.freeze_module(exclude=["deltas", "classifier"])
    delta_model.save_finetuned(tmp_path / "delta")
    expected = logits(model, "bert")
    argv = ["merge", "--delta", str(tmp_path / "delta"), "--backbone", str(tmp_path / "backbone")]
    argv += ["--output", str(tmp_path / "merged")]
    # its own process: transformers' logging writes to the stderr it found first, which capsys does not see
    run = subprocess.run([sys.executable, "-m", "opendelta", *argv], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    both = run.stdout + run.stderr
    assert "MISSING" not in both and "newly initialized" not in both  # transformers' report, which was wrong here
    assert "lacked 2 weight(s) that the delta supplied: classifier.bias, classifier.weight" in run.stdout
    assert "randomly initialised" not in both
    merged = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(logits(merged, "bert"), expected, rtol=0, atol=1e-5)
