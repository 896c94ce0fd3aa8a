"""The ``opendelta`` command line with core alone: plugins, show, inspect, merge, new-plugin.

Most cases call ``main(argv)`` in-process; a few run the real console script and ``python -m opendelta`` in a
subprocess, and the scaffolded plugin is built and installed with pip and its own tests run by pytest in a
subprocess. Methods come from throwaway plugins registered by the tests (the toy, and a mergeable "shift"), since
core's tests run with no method plugin installed; tests with real methods are in ``tests/test_cli_with_plugins.py``.
"""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from inspect import signature
from pathlib import Path
from typing import ClassVar

import pytest
import torch
import transformers
from safetensors.torch import load_file
from torch import nn

import opendelta
from opendelta import DeltaConfig, DeltaModel, Target
from opendelta.cli import main
from opendelta.cli.backbones import build_skeleton, load_config
from opendelta.registry import reload
from opendelta.scaffold import core_requirement, plugin_names
from opendelta.testing import ARCHITECTURES, DeltaMethodSuite, perturb, tiny_inputs, tiny_model
from opendelta.testing.tiny_models import tiny_config

SCRIPT = shutil.which("opendelta", path=str(Path(sys.executable).parent))


def start_cli(*args):
    """Start the installed console script (or ``python -m opendelta`` when args start with "-m") in a new process."""
    command = [sys.executable, *args] if args[0] == "-m" else [SCRIPT, *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def logits(model, arch="bert"):
    with torch.no_grad():
        return model(**tiny_inputs(arch)).logits


# ------------------------------------------------------------------------------------- a mergeable test method
class Shift(nn.Module):
    """``h -> h + b`` after a linear layer: a change of its bias, so it merges."""

    def __init__(self, features):
        super().__init__()
        self.b = nn.Parameter(torch.zeros(features))

    def forward(self, hidden):
        return hidden + self.b

    def can_merge(self, host):
        return isinstance(host, nn.Linear) and host.bias is not None

    def merge_update(self, host):
        return {"bias": self.b.detach()}


@dataclass(kw_only=True)
class ShiftConfig(DeltaConfig):
    delta_type: ClassVar[str] = "shift"


class ShiftModel(DeltaModel):
    config_class = ShiftConfig
    delta_type = "shift"
    delta_name = "shift"
    default_modified_modules = ("attn.proj", "ff.w2")
    insertion = "after"

    def _build_delta(self, target: Target) -> nn.Module:
        return Shift(target.module.out_features)


class ShiftPlugin:
    @opendelta.hookimpl
    def register_delta_methods(self, register):
        register("shift", ShiftConfig, ShiftModel)


@pytest.fixture
def shift():
    reload()
    opendelta.plugins.load_plugins()
    opendelta.plugins.pm.register(ShiftPlugin(), name="shift")
    try:
        yield ShiftModel
    finally:
        reload()


@pytest.fixture
def bert_dir(tmp_path):
    """A saved tiny BertForSequenceClassification (config.json + model.safetensors)."""
    tiny_model("bert").save_pretrained(tmp_path / "bert")
    return tmp_path / "bert"


# ------------------------------------------------------------------------------------------ the command line
def test_console_script_and_python_m_opendelta_run_in_their_own_process(tmp_path):
    assert SCRIPT, "the opendelta console script is not installed next to this Python (pip install -e opendelta-core)"
    listing = start_cli("plugins")  # both at once: each process spends seconds importing torch
    failure = start_cli("-m", "opendelta", "inspect", str(tmp_path / "nowhere"))
    out, err = listing.communicate(timeout=300)
    assert listing.returncode == 0, err
    assert re.search(r"^  bert\s+BertModel, .*opendelta-common-structures \d", out, re.MULTILINE)
    assert re.search(r"^  common_structures\s+opendelta-common-structures\s", out, re.MULTILINE)
    out, err = failure.communicate(timeout=300)
    assert failure.returncode == 1 and out == ""
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("opendelta inspect: error: no delta checkpoint at")


def test_usage_errors_exit_with_status_2(capsys):
    assert main([]) == 2
    assert main(["no-such-command"]) == 2
    assert main(["show"]) == 2
    assert "MODEL_DIR_OR_CONFIG" in capsys.readouterr().err
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"opendelta-core {opendelta.__version__}"


def test_traceback_flag_shows_the_exception(tmp_path):
    with pytest.raises(opendelta.CheckpointError):
        main(["--traceback", "inspect", str(tmp_path)])


# -------------------------------------------------------------------------------------------------- plugins
def test_plugins_lists_methods_mappings_and_plugins_with_their_distributions(toy, capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^  toy\s+ToyModel\s+ToyConfig\s+plugin toy$", out, re.MULTILINE)  # no distribution: a test
    for model_type in ("bart", "bert", "deberta-v2", "gpt2", "opt", "roberta", "t5"):
        assert re.search(rf"^  {model_type}\s.*opendelta-common-structures \d", out, re.MULTILINE)

    assert main(["plugins", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    toy_entry = next(m for m in report["methods"] if m["name"] == "toy")
    assert toy_entry == {
        "name": "toy",
        "model_class": "ToyModel",
        "config_class": "ToyConfig",
        "aliases": [],
        "plugin": "toy",
        "distribution": None,
        "version": None,
    }
    bert = next(s for s in report["structures"] if s["model_type"] == "bert")
    assert bert["plugin"] == "common_structures" and bert["distribution"] == "opendelta-common-structures"
    assert report["problems"] == []


def test_plugins_reports_a_distribution_whose_plugin_fails_to_import(tmp_path, monkeypatch, capsys):
    """A real (if tiny) installed distribution: a dist-info with an entry point whose module raises on import."""
    dist_info = tmp_path / "opendelta_broken-0.3.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: opendelta-broken\nVersion: 0.3\n")
    (dist_info / "entry_points.txt").write_text("[opendelta]\nbroken = opendelta_broken_plugin\n")
    (tmp_path / "opendelta_broken_plugin.py").write_text("raise ImportError('needs libfoo >= 2')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reload()
    try:
        assert main(["plugins"]) == 0
    finally:
        monkeypatch.undo()
        sys.modules.pop("opendelta_broken_plugin", None)
        reload()
    out = capsys.readouterr().out
    failed = out.split("Plugins that failed to load (1):")[1]
    assert re.search(r"broken\s+opendelta-broken\s+0\.3\s+ImportError: needs libfoo >= 2", failed)
    assert "OPENDELTA_DISABLE_PLUGINS=broken" in out.split("Problems reported while loading")[1]


# ----------------------------------------------------------------------------------------------------- show
def test_show_prints_the_folded_tree_of_the_saved_task_head_class(bert_dir, capsys):
    assert main(["show", str(bert_dir)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("BertForSequenceClassification from ")
    assert "0-1 (BertLayer)" in out and "query,key,value (Linear) weight:[32, 32] bias:[32]" in out
    assert "classifier (Linear) weight:[3, 32] bias:[3]" in out
    total = sum(p.numel() for p in tiny_model("bert").parameters())
    assert out.rstrip().endswith(f"{total:,} parameters")


def test_show_can_keep_modules_without_parameters_and_expand_parameters(bert_dir, capsys):
    assert main(["show", str(bert_dir)]) == 0
    assert "dropout" not in capsys.readouterr().out
    assert main(["show", str(bert_dir), "--keep-non-params", "--expand-params"]) == 0
    out = capsys.readouterr().out
    assert "dropout (Dropout)" in out
    assert re.search(r"classifier \(Linear\)\n\s+├──\s+weight:\[3, 32\]\n\s+└──\s+bias:\[3\]", out), out


def test_show_reads_no_weights_and_accepts_a_config_file(bert_dir, capsys):
    (bert_dir / "model.safetensors").write_bytes(b"not a weights file")
    assert main(["show", str(bert_dir / "config.json"), "--class", "BertModel"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("BertModel from ") and "classifier" not in out and "pooler (BertPooler)" in out


def test_skeletons_live_on_the_meta_device(bert_dir):
    model = build_skeleton(load_config(bert_dir), transformers.BertModel)
    assert {p.device.type for p in model.parameters()} == {"meta"}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_show_common_prints_common_names_with_the_real_ones(arch, tmp_path, capsys):
    tiny_config(arch).save_pretrained(tmp_path)
    assert main(["show", str(tmp_path), "--common"]) == 0
    out = capsys.readouterr().out
    assert "common structure" in out.splitlines()[0]
    assert re.search(r"└── 0-1 \(\w+\)", out), out  # the two blocks folded into one
    assert re.search(r"\bq \(\w+: [\w.]+(, part 1/3)?\)", out), out  # q with its real name (GPT-2: a fused part)
    assert re.search(r"\bw2 \((Linear|Conv1D): [\w.]+\)", out), out


def test_show_common_on_bert_names_each_module(bert_dir, capsys):
    assert main(["show", str(bert_dir), "--common"]) == 0
    out = capsys.readouterr().out
    expected = [
        "embeddings (Embedding: bert.embeddings.word_embeddings) weight:[99, 32]",
        "attn (BertAttention: attention)",
        "q (Linear: attention.self.query), k (Linear: attention.self.key), v (Linear: attention.self.value), "
        "proj (Linear: attention.output.dense)",
        "w1 (Linear: intermediate.dense) weight:[37, 32] bias:[37]",
    ]
    for line in expected:
        assert line in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["show", "{tmp}/nowhere"], "no such file or folder"),
        (["show", "{tmp}"], "holds no config.json"),
        (["show", "{bert}", "--class", "BertModle"], "no model class of that name (did you mean BertModel"),
        (["show", "{bert}", "--class", "GPT2Model"], "GPT2Model is built from a GPT2Config, but the folder's config"),
    ],
)
def test_show_errors_are_one_line_and_status_1(args, message, bert_dir, tmp_path, capsys):
    argv = [a.format(tmp=tmp_path / "empty", bert=bert_dir) for a in args]
    (tmp_path / "empty").mkdir()
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("opendelta show: error: ") and message in err and err.count("\n") == 1


def test_show_common_without_a_mapping_says_how_to_proceed(no_inference, tmp_path, capsys):
    transformers.AutoConfig.for_model("electra", hidden_size=32, num_hidden_layers=2).save_pretrained(tmp_path)
    assert main(["show", str(tmp_path), "--common"]) == 1
    err = capsys.readouterr().err
    assert "no common-structure mapping for ElectraModel (model_type='electra')" in err


# -------------------------------------------------------------------------------------------------- inspect
@pytest.fixture
def toy_checkpoint(toy, tmp_path):
    model = tiny_model("bert")
    delta_model = toy(model, width=3)
    perturb(delta_model)
    delta_model.freeze_module(exclude=["deltas", "classifier"])
    delta_model.save_finetuned(tmp_path / "toy")
    return tmp_path / "toy", delta_model


def test_inspect_describes_and_verifies_a_checkpoint(toy_checkpoint, capsys):
    folder, delta_model = toy_checkpoint
    assert main(["inspect", str(folder)]) == 0
    out = capsys.readouterr().out
    delta_params = sum(p.numel() for p in delta_model.parameters())
    assert "delta_type: toy (ToyModel from an unregistered plugin)" in out
    assert "hyper-parameters: width=3" in out
    assert "backbone: BertForSequenceClassification (checkpoint None)" in out
    assert f"backbone hash: {delta_model.config.backbone_hash}" in out
    assert f"delta: 4 tensors, {delta_params:,} parameters" in out
    assert "2 tensors, 99 parameters: classifier.bias, classifier.weight" in out  # the head saved with it
    weights_line = r"weights: delta_model-[0-9a-f]{16}\.safetensors \(safetensors\), [\d.]+ KiB, sha256 verified"
    assert re.search(weights_line, out)
    assert f"saved with: opendelta {opendelta.__version__}, transformers {transformers.__version__}" in out


def test_inspect_json_and_tensor_list(toy_checkpoint, capsys):
    folder, delta_model = toy_checkpoint
    assert main(["inspect", str(folder), "--json", "--tensors"]) == 0
    report = json.loads(capsys.readouterr().out)
    saved = {**delta_model.delta_state_dict()}
    listed = report["tensors"]["list"]
    assert set(listed) == set(saved) | {"classifier.weight", "classifier.bias"}
    for name, tensor in saved.items():
        assert listed[name] == {"dtype": "F32", "shape": list(tensor.shape), "bytes": 4 * tensor.numel()}
    assert report["tensors"]["delta"]["parameters"] == sum(t.numel() for t in saved.values())
    assert report["weights"]["verified"] is True and report["hyper_parameters"] == {"width": 3}
    assert report["backbone"]["class"] == "BertForSequenceClassification"


def test_inspect_refuses_a_damaged_weights_file(toy_checkpoint, capsys):
    folder, _ = toy_checkpoint
    weights = next(folder.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the last tensor's data: the header still parses
    weights.write_bytes(bytes(data))
    assert main(["inspect", str(folder)]) == 1
    captured = capsys.readouterr()
    assert "sha256 MISMATCH" in captured.out
    assert "does not match the sha256 recorded in config.json" in captured.err


def test_inspect_a_checkpoint_of_a_method_not_installed_here(toy_checkpoint, capsys):
    folder, _ = toy_checkpoint
    reload()  # the toy is gone: as on a machine without its plugin
    assert main(["inspect", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "delta_type: toy (not installed here: pip install opendelta-toy)" in out
    assert "hyper-parameters: width=3" in out and "tensors: 6 (" in out and "sha256 verified" in out


def as_legacy_checkpoint(folder, extra=None):
    """Rewrite a checkpoint the way OpenDelta 0.3.x saved it: config.json without a weights file + pytorch_model.bin."""
    config = json.loads((folder / "config.json").read_text())
    weights = folder / config.pop("weights_file")
    del config["weights_sha256"]
    torch.save({**load_file(weights), **(extra or {})}, folder / "pytorch_model.bin")
    weights.unlink()
    (folder / "config.json").write_text(json.dumps(config))


def test_inspect_reads_an_opendelta_0_3_checkpoint(toy_checkpoint, capsys):
    folder, delta_model = toy_checkpoint
    as_legacy_checkpoint(folder)
    assert main(["inspect", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "weights: pytorch_model.bin (OpenDelta 0.3.x pickle, read with weights_only=True)" in out
    assert "no digest recorded to verify" in out
    assert f"delta: 4 tensors, {sum(p.numel() for p in delta_model.parameters()):,} parameters" in out


class Payload:
    """Unpickling this would run code: a checkpoint holding it must be refused, not opened."""

    def __reduce__(self):
        return (print, ("code ran",))


def test_inspect_refuses_a_pickle_holding_more_than_tensors(toy_checkpoint, capsys):
    folder, _ = toy_checkpoint
    as_legacy_checkpoint(folder, extra={"payload": Payload()})
    assert main(["inspect", str(folder)]) == 1
    captured = capsys.readouterr()
    assert "code ran" not in captured.out
    assert "holds Python objects other than tensors, so it was refused without running them" in captured.err


def test_inspect_a_folder_that_is_not_a_checkpoint(bert_dir, tmp_path, capsys):
    assert main(["inspect", str(bert_dir)]) == 1
    assert "has no delta_type: not an OpenDelta delta checkpoint" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path)]) == 1
    assert "holds no config.json: not a delta checkpoint" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- merge
def shift_checkpoint(shift_cls, folder, seed=0):
    model = tiny_model("bert", seed=seed)
    delta_model = shift_cls(model)
    perturb(delta_model, scale=0.5)
    delta_model.freeze_module(exclude=["deltas", "classifier"])
    with torch.no_grad():
        model.classifier.bias.add_(1.0)  # a trained head: saved with the delta, it must reach the merged model
    delta_model.save_finetuned(folder)
    return logits(model)


def test_merge_bakes_the_delta_into_a_plain_transformers_model(shift, bert_dir, tmp_path, capsys):
    expected = shift_checkpoint(shift, tmp_path / "delta")
    (bert_dir / "vocab.txt").write_text("[PAD]\n[UNK]\n")
    out_dir = tmp_path / "merged"
    argv = ["merge", "--delta", str(tmp_path / "delta"), "--backbone", str(bert_dir), "--output", str(out_dir)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "saved a plain transformers model to" in out and "(with vocab.txt)" in out
    merged = transformers.BertForSequenceClassification.from_pretrained(out_dir)  # transformers alone
    assert set(merged.state_dict()) == set(tiny_model("bert").state_dict())  # no delta, no extra parameter
    torch.testing.assert_close(logits(merged.eval()), expected, rtol=0, atol=1e-5)
    assert (out_dir / "vocab.txt").read_text() == "[PAD]\n[UNK]\n"


def test_merge_refuses_another_backbone_unless_told(shift, tmp_path, capsys):
    shift_checkpoint(shift, tmp_path / "delta", seed=1)
    tiny_model("bert", seed=0).save_pretrained(tmp_path / "other")
    argv = ["merge", "--delta", str(tmp_path / "delta"), "--backbone", str(tmp_path / "other")]
    assert main([*argv, "--output", str(tmp_path / "a")]) == 1
    err = capsys.readouterr().err
    assert "was trained on another backbone" in err and "--no-check-hash" in err and not (tmp_path / "a").exists()
    with pytest.warns(UserWarning, match="trained on another backbone"):
        assert main([*argv, "--output", str(tmp_path / "b"), "--no-check-hash"]) == 0
    assert (tmp_path / "b" / "config.json").is_file()


def test_merge_refuses_a_method_that_cannot_merge(toy, bert_dir, tmp_path, capsys):
    delta_model = toy(tiny_model("bert"))
    delta_model.freeze_module()
    delta_model.save_finetuned(tmp_path / "delta")
    argv = ["merge", "--delta", str(tmp_path / "delta"), "--backbone", str(bert_dir), "--output", str(tmp_path / "m")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "the 'toy' delta cannot be merged into plain weights" in err and "AutoDeltaModel.from_finetuned" in err
    assert not (tmp_path / "m").exists()


def test_merge_refuses_to_overwrite_and_names_a_missing_plugin(toy_checkpoint, bert_dir, tmp_path, capsys):
    folder, _ = toy_checkpoint
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    argv = ["merge", "--delta", str(folder), "--backbone", str(bert_dir)]
    assert main([*argv, "--output", str(tmp_path / "taken")]) == 1
    assert "already exists and is not an empty folder" in capsys.readouterr().err
    reload()  # the toy's plugin is gone
    assert main([*argv, "--output", str(tmp_path / "new")]) == 1
    assert "unknown delta_type 'toy'" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- new-plugin
@pytest.mark.parametrize(
    "name, method, distribution, package, prefix",
    [
        ("scale_shift", "scale_shift", "opendelta-scale-shift", "opendelta_scale_shift", "ScaleShift"),
        ("opendelta-scale-shift", "scale_shift", "opendelta-scale-shift", "opendelta_scale_shift", "ScaleShift"),
        ("ia3", "ia3", "opendelta-ia3", "opendelta_ia3", "Ia3"),
    ],
)
def test_plugin_names(name, method, distribution, package, prefix):
    names = plugin_names(name)
    assert (names.method, names.distribution, names.package, names.class_prefix) == (
        method,
        distribution,
        package,
        prefix,
    )


@pytest.mark.parametrize(
    "name, hint", [("Scale Shift", "'scale_shift'"), ("9lives", "'my_9lives'"), ("a__b", "'a_b'"), ("class", "keyword")]
)
def test_bad_plugin_names_are_refused_with_a_suggestion(name, hint, tmp_path, capsys):
    assert main(["new-plugin", name, "--output", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("opendelta new-plugin: error: plugin name") and hint in err
    assert list(tmp_path.iterdir()) == []


def test_new_plugin_refuses_a_taken_name_or_an_existing_folder(toy, tmp_path, capsys):
    assert main(["new-plugin", "toy", "--output", str(tmp_path)]) == 1
    assert "taken by the installed method 'toy'" in capsys.readouterr().err
    (tmp_path / "opendelta-mine").mkdir()
    assert main(["new-plugin", "mine", "--output", str(tmp_path)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert main(["new-plugin", "mine", "--output", str(tmp_path / "nowhere")]) == 1
    assert "is not an existing folder" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["opendelta-mine"]  # nothing half-written


def test_core_requirement_pins_the_hook_api_minor_version():
    assert core_requirement("0.1.0") == "opendelta-core>=0.1,<0.2"
    assert core_requirement("1.12.3.dev0") == "opendelta-core>=1.12,<1.13"


def test_new_plugin_writes_a_complete_distribution(tmp_path, capsys):
    assert main(["new-plugin", "scale-shift", "--output", str(tmp_path)]) == 0
    root = tmp_path / "opendelta-scale-shift"
    assert f"created {root}" in capsys.readouterr().out
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert files == [
        "README.md",
        "pyproject.toml",
        "src/opendelta_scale_shift/__init__.py",
        "src/opendelta_scale_shift/config.py",
        "src/opendelta_scale_shift/layer.py",
        "src/opendelta_scale_shift/model.py",
        "src/opendelta_scale_shift/plugin.py",
        "src/opendelta_scale_shift/py.typed",
        "tests/conftest.py",
        "tests/test_scale_shift.py",
        "tests/test_scale_shift_conformance.py",
    ]
    for path in root.rglob("*"):
        if path.is_file():
            assert "{{" not in path.read_text(), path
    pyproject = (root / "pyproject.toml").read_text()
    assert '[project.entry-points.opendelta]\nscale_shift = "opendelta_scale_shift.plugin"' in pyproject
    assert f'dependencies = ["{core_requirement(opendelta.__version__)}"]' in pyproject
    for path in root.rglob("*.py"):
        compile(path.read_text(), str(path), "exec")  # valid Python once filled in


def test_the_scaffolded_plugin_installs_and_its_generated_tests_pass(tmp_path):
    """Scaffold, build and install with pip (into a target folder), then run the generated tests in a subprocess.

    The install goes into ``site/`` (put on PYTHONPATH for the test run only), so the environment running this test
    never sees the new method. pip builds it with this environment's hatchling (core's ``testing`` extra), or fetches
    hatchling from the package index into an isolated build environment when it is not installed.
    """
    assert main(["new-plugin", "scale-shift", "--output", str(tmp_path)]) == 0
    root = tmp_path / "opendelta-scale-shift"
    site = tmp_path / "site"
    isolation = [] if importlib.util.find_spec("hatchling") is None else ["--no-build-isolation"]  # else: from PyPI
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", *isolation, "--target", str(site)]
    installed = subprocess.run([*pip, str(root)], capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr
    assert (site / "opendelta_scale_shift" / "plugin.py").is_file()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])),
    }
    command = [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider"]
    result = subprocess.run(command, cwd=root, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    passed = set(re.findall(r"^PASSED \S+::TestScaleShiftConformance::(test_\w+)\[([\w-]+)\]", result.stdout, re.M))
    battery = [
        n
        for n in dir(DeltaMethodSuite)
        if n.startswith("test_") and "arch" in signature(getattr(DeltaMethodSuite, n)).parameters
    ]
    assert battery and passed == {(test, arch) for test in battery for arch in ARCHITECTURES}
    assert re.search(r"^PASSED \S+::test_scaling_a_target_changes_the_output$", result.stdout, re.M)
