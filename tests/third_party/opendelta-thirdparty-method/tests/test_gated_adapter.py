"""The gated adapter from a third-party distribution: found by core, importable from opendelta, listed by the CLI."""

import subprocess
import sys

import pytest
import torch

import opendelta
from opendelta import DeltaConfigError, get_method
from opendelta.cli import main
from opendelta.testing import tiny_inputs, tiny_model
from opendelta_thirdparty_method import GatedAdapterConfig, GatedAdapterModel


def test_registered_by_this_distribution_and_importable_from_opendelta():
    spec = get_method("gated_adapter")
    assert spec.model_cls is GatedAdapterModel and spec.config_cls is GatedAdapterConfig
    assert spec.distribution == "opendelta-thirdparty-method"
    assert opendelta.GatedAdapterModel is GatedAdapterModel


def test_zero_gate_is_exactly_the_identity_and_the_gate_opens_the_adapter():
    model = tiny_model("t5")
    inputs = tiny_inputs("t5")
    with torch.no_grad():
        bare = model(**inputs).logits
        delta_model = GatedAdapterModel(model, bottleneck_dim=4)
        for name, param in delta_model.named_parameters():
            if not name.endswith("gate"):
                param.normal_()  # large adapter weights: only the closed gate keeps the output unchanged
        assert torch.equal(model(**inputs).logits, bare)
        for name, param in delta_model.named_parameters():
            if name.endswith("gate"):
                param.fill_(0.5)
        assert not torch.allclose(model(**inputs).logits, bare)


@pytest.mark.parametrize(
    "kwargs, message", [({"bottleneck_dim": 0}, "bottleneck_dim must be >= 1"), ({"non_linearity": "nope"}, "nope")]
)
def test_bad_hyper_parameters_are_refused_by_name(kwargs, message):
    with pytest.raises(DeltaConfigError, match=message):
        GatedAdapterModel(tiny_model("bert"), **kwargs)


def test_opendelta_plugins_lists_the_method_and_its_distribution():
    command = [sys.executable, "-m", "opendelta", "plugins"]  # a fresh process: plugins found by entry point only
    result = subprocess.run(command, capture_output=True, text=True, check=True, timeout=300)
    line = next(line for line in result.stdout.splitlines() if line.split()[:1] == ["gated_adapter"])
    assert "GatedAdapterModel" in line and "opendelta-thirdparty-method 0.1.0" in line


def test_inspect_counts_the_gated_adapter_tensors_as_the_delta(tmp_path, capsys):
    model = tiny_model("bert")
    delta_model = GatedAdapterModel(model, bottleneck_dim=4)
    delta_model.freeze_module()
    delta_model.save_finetuned(tmp_path / "delta")
    assert main(["inspect", str(tmp_path / "delta")]) == 0
    out = capsys.readouterr().out
    # 2 blocks x (attn.proj, ff.w2) = 4 adapters of 5 tensors: down and up weights and biases, and the gate
    per_adapter = 4 * 32 + 4 + 32 * 4 + 32 + 1
    assert f"delta: 20 tensors, {4 * per_adapter:,} parameters" in out
    assert "bottleneck_dim=4" in out and "sha256 verified" in out
