"""Checkpoints written by another release than the one reading them (issue 7, point 6).

Two releases of one plugin distribution, ``opendelta-vskew``, are installed for real: ``<name>-<version>.dist-info``
folders (METADATA and entry_points.txt) beside the plugin's module, put on ``sys.path`` one at a time, so
``importlib.metadata`` reports the version exactly as it does for a pip-installed plugin. Release 1.0.0 adds the
setting ``gain``, declared ``since="1.0.0"``; release 0.9.0 does not know it. A checkpoint that uses ``gain`` must be
refused by 0.9.0 naming the version to install, and one that leaves it at its default must load there with a
warning and compute the same. Core's own version is the installed ``opendelta-core``.
"""

from __future__ import annotations

import importlib
import json
import sys
import textwrap

import pytest
import torch

from opendelta import (
    AutoDeltaConfig,
    AutoDeltaModel,
    CheckpointError,
    DeltaConfigError,
    OpenDeltaVersionWarning,
    UnknownDeltaMethodError,
)
from opendelta.compat import CORE_DISTRIBUTION, installed_version
from opendelta.registry import get_method, reload
from opendelta.testing import Pristine, model_output_tensor, perturb, tiny_inputs, tiny_model

DISTRIBUTION = "opendelta-vskew"
MODULE_PREFIX = "odvs_"

PLUGIN = '''
"""Release {version} of the ``vskew`` method: ``h * (1 + s)`` after the attention output{gain_doc}."""
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from opendelta import DeltaConfig, DeltaModel, hookimpl


class Scale(nn.Module):
    def __init__(self, features, gain):
        super().__init__()
        self.s = nn.Parameter(torch.zeros(features))
        self.gain = gain

    def forward(self, hidden):
        return hidden * (1 + self.s) * self.gain


@dataclass(kw_only=True)
class VskewConfig(DeltaConfig):
    delta_type: ClassVar[str] = "vskew"
{gain_field}

class VskewModel(DeltaModel):
    config_class = VskewConfig
    delta_type = "vskew"
    delta_name = "vskew"
    default_modified_modules = ("attn.proj",)
    insertion = "after"

    def _build_delta(self, target):
        return Scale(self.features(target.module)[1], getattr(self.config, "gain", 1.0))


@hookimpl
def register_delta_methods(register):
    register("vskew", VskewConfig, VskewModel)
'''

RELEASES = {
    "1.0.0": {
        "gain_doc": ", times ``gain`` (new in 1.0.0)",
        "gain_field": '    gain: float = field(default=1.0, metadata={"since": "1.0.0"})\n',
    },
    "0.9.0": {"gain_doc": "", "gain_field": ""},
}


class Releases:
    """Writes each release as an installed distribution; :meth:`use` makes one (or none) the installed one."""

    def __init__(self, root, monkeypatch):
        self.root, self.monkeypatch, self.path = root, monkeypatch, list(sys.path)
        for release, parts in RELEASES.items():
            folder = root / release
            module = f"{MODULE_PREFIX}{release.replace('.', '')}"
            info = folder / f"{DISTRIBUTION.replace('-', '_')}-{release}.dist-info"
            info.mkdir(parents=True)
            (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {DISTRIBUTION}\nVersion: {release}\n")
            (info / "entry_points.txt").write_text(f"[opendelta]\nvskew = {module}\n")
            (folder / f"{module}.py").write_text(textwrap.dedent(PLUGIN.format(version=release, **parts)))

    def use(self, release: str | None) -> None:
        """Install ``release`` (``None``: uninstall the plugin) and reload the registry."""
        folders = [str(self.root / release)] if release else []
        self.monkeypatch.setattr(sys, "path", folders + self.path)
        importlib.invalidate_caches()
        reload()
        assert installed_version(DISTRIBUTION) == release


@pytest.fixture
def releases(tmp_path, monkeypatch):
    try:
        yield Releases(tmp_path / "site", monkeypatch)
    finally:
        monkeypatch.undo()
        for module in [m for m in sys.modules if m.startswith(MODULE_PREFIX)]:
            del sys.modules[module]
        importlib.invalidate_caches()
        reload()


def run(model) -> torch.Tensor:
    with torch.no_grad():
        return model_output_tensor(model(**tiny_inputs("bert")))


def save(releases: Releases, folder, release: str = "1.0.0", **settings):
    """A trained ``vskew`` checkpoint written by ``release``; returns its outputs and its config.json."""
    releases.use(release)
    model = tiny_model("bert")
    delta_model = get_method("vskew").model_cls(model, **settings)
    delta_model.freeze_module(exclude=["deltas", "classifier"])
    perturb(delta_model, seed=3)
    delta_model.save_finetuned(folder)
    return run(model), json.loads((folder / "config.json").read_text())


def edit(folder, **changes) -> None:
    path = folder / "config.json"
    document = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            document.pop(key, None)
        else:
            document[key] = value
    path.write_text(json.dumps(document))


def test_a_checkpoint_records_who_wrote_it_and_what_a_setting_from_a_newer_release_requires(releases, tmp_path):
    _, document = save(releases, tmp_path / "gain", gain=2.0)
    assert document["written_by"] == {
        CORE_DISTRIBUTION: installed_version(CORE_DISTRIBUTION),
        DISTRIBUTION: "1.0.0",
    }
    assert document["requires"] == {DISTRIBUTION: ">=1.0.0"}
    _, document = save(releases, tmp_path / "default")  # gain left at its default: older releases compute the same
    assert document["requires"] == {}
    AutoDeltaConfig.from_finetuned(tmp_path / "gain").save_finetuned(tmp_path / "config-only")
    alone = json.loads((tmp_path / "config-only" / "config.json").read_text())
    assert alone["requires"] == {DISTRIBUTION: ">=1.0.0"}, "a config saved on its own says what it needs, too"


def test_an_older_plugin_refuses_a_setting_it_does_not_have_and_says_which_version_to_install(releases, tmp_path):
    folder = tmp_path / "ckpt"
    save(releases, folder, gain=2.0)
    releases.use("0.9.0")
    model = tiny_model("bert")
    pristine = Pristine.of(model)
    expected = (
        rf"needs {DISTRIBUTION}>=1\.0\.0, but {DISTRIBUTION} 0\.9\.0 is installed.*"
        rf"pip install -U '{DISTRIBUTION}>=1\.0\.0'"
    )
    with pytest.raises(CheckpointError, match=expected):
        AutoDeltaModel.from_finetuned(folder, backbone_model=model)
    with pytest.raises(CheckpointError, match=expected):
        get_method("vskew").model_cls.from_finetuned(folder, backbone_model=model)
    with pytest.raises(CheckpointError, match=expected):
        AutoDeltaConfig.from_finetuned(folder)
    pristine.assert_unchanged(model)


def test_optional_fields_of_a_newer_release_load_in_an_older_one_with_a_warning(releases, tmp_path):
    folder = tmp_path / "ckpt"
    trained, _ = save(releases, folder)  # gain=1.0, the default: written into config.json, not required
    releases.use("0.9.0")
    model = tiny_model("bert")
    with pytest.warns(
        OpenDeltaVersionWarning, match=rf"written by {DISTRIBUTION} 1\.0\.0 \(installed 0\.9\.0\).*'gain'"
    ):
        AutoDeltaModel.from_finetuned(folder, backbone_model=model)
    assert torch.equal(run(model), trained)


def test_an_unknown_field_not_explained_by_a_newer_writer_is_refused_by_name(releases, tmp_path):
    folder = tmp_path / "ckpt"
    save(releases, folder)
    releases.use("0.9.0")
    for written_by in (
        {DISTRIBUTION: "0.9.0"},  # the same release wrote it: 'gain' is a tampered or mistyped field
        {DISTRIBUTION: "0.8.0"},  # an older one
        {"someone-else": "9.0"},  # a distribution that does not define this method
        None,  # no record at all
    ):
        edit(folder, written_by=written_by)
        model = tiny_model("bert")
        pristine = Pristine.of(model)
        with pytest.raises(DeltaConfigError, match=r"unknown field\(s\) \['gain'\] for VskewConfig"):
            AutoDeltaModel.from_finetuned(folder, backbone_model=model)
        pristine.assert_unchanged(model)


def test_a_mistyped_keyword_is_refused_even_when_a_newer_release_wrote_the_checkpoint(releases, tmp_path):
    folder = tmp_path / "ckpt"
    save(releases, folder)
    releases.use("0.9.0")
    model = tiny_model("bert")
    pristine = Pristine.of(model)
    with pytest.raises(DeltaConfigError, match=r"unknown field\(s\) \['gain', 'modified_modlues'\]"):
        AutoDeltaModel.from_finetuned(folder, backbone_model=model, modified_modlues=["query"])
    releases.use("1.0.0")
    with pytest.raises(DeltaConfigError, match=r"unknown field\(s\) \['gian'\]"):
        AutoDeltaModel.from_finetuned(folder, backbone_model=model, gian=2.0)
    pristine.assert_unchanged(model)


def test_a_checkpoint_of_a_plugin_that_is_not_installed_names_the_distribution_to_install(releases, tmp_path):
    folder = tmp_path / "ckpt"
    save(releases, folder, gain=2.0)
    releases.use(None)
    model = tiny_model("bert")
    pristine = Pristine.of(model)
    with pytest.raises(UnknownDeltaMethodError, match=rf"'vskew'.*pip install '{DISTRIBUTION}>=1\.0\.0'"):
        AutoDeltaModel.from_finetuned(folder, backbone_model=model)
    with pytest.raises(UnknownDeltaMethodError, match=rf"pip install '{DISTRIBUTION}>=1\.0\.0'"):
        AutoDeltaConfig.from_finetuned(folder)
    pristine.assert_unchanged(model)


def test_core_requirements_and_core_fields_of_a_newer_core(releases, tmp_path):
    folder = tmp_path / "ckpt"
    trained, document = save(releases, folder)
    core = installed_version(CORE_DISTRIBUTION)
    edit(folder, requires={CORE_DISTRIBUTION: ">=99.0"})
    model = tiny_model("bert")
    pristine = Pristine.of(model)
    with pytest.raises(
        CheckpointError,
        match=rf"needs {CORE_DISTRIBUTION}>=99\.0, but {CORE_DISTRIBUTION} {core} is installed.*pip install -U",
    ):
        AutoDeltaModel.from_finetuned(folder, backbone_model=model)
    pristine.assert_unchanged(model)
    edit(folder, requires={}, written_by={**document["written_by"], CORE_DISTRIBUTION: "99.0"}, share_prompt=True)
    with pytest.warns(OpenDeltaVersionWarning, match=rf"{CORE_DISTRIBUTION} 99\.0 \(installed {core}\).*share_prompt"):
        AutoDeltaModel.from_finetuned(folder, backbone_model=model)
    assert torch.equal(run(model), trained)


@pytest.mark.parametrize(
    ("requires", "message"),
    [
        ({DISTRIBUTION: "1.0.0"}, "is not of the form"),
        ({DISTRIBUTION: ">=latest"}, "is not of the form"),
        ({DISTRIBUTION: ["1.0.0"]}, "'requires' must map"),
        ({"opendelta-never-published": ">=0.1"}, "opendelta-never-published is not installed"),
    ],
    ids=["no-operator", "not-a-version", "list", "missing-distribution"],
)
def test_a_malformed_or_unmet_requirement_is_refused_by_name(releases, tmp_path, requires, message):
    folder = tmp_path / "ckpt"
    save(releases, folder)
    edit(folder, requires=requires)
    model = tiny_model("bert")
    pristine = Pristine.of(model)
    with pytest.raises(CheckpointError, match=message):
        AutoDeltaModel.from_finetuned(folder, backbone_model=model)
    pristine.assert_unchanged(model)
