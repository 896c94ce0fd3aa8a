"""Every "install X" message names the published distribution and, for ours, the wheelhouse install that works today."""

from pathlib import Path

import pytest
import tomllib
from transformers import AutoConfig, DistilBertModel

from opendelta import DeltaMethodNotInstalledError, UnknownDeltaMethodError
from opendelta.errors import StructureNotFoundError
from opendelta.install_hint import SHIPPED, install_hint
from opendelta.registry import get_method, reload, structure_for_model

REPO = Path(__file__).resolve().parents[2]
WHEELHOUSE_FORM = "pip install --find-links wheelhouse opendelta-lora"


def test_shipped_names_exactly_the_distributions_this_repository_builds():
    folders = [REPO / "opendelta-core", REPO / "common_structures", *sorted((REPO / "plugins").glob("opendelta-*"))]
    names = {tomllib.loads((f / "pyproject.toml").read_text())["project"]["name"] for f in folders}
    assert names == SHIPPED


def test_a_missing_first_party_class_names_both_install_forms(monkeypatch):
    monkeypatch.setenv("OPENDELTA_DISABLE_PLUGINS", "lora")
    reload()
    try:
        with pytest.raises(DeltaMethodNotInstalledError) as caught:
            from opendelta import LoraModel  # noqa: F401
    finally:
        monkeypatch.delenv("OPENDELTA_DISABLE_PLUGINS")
        reload()
    message = str(caught.value)
    assert "pip install opendelta-lora (" in message and WHEELHOUSE_FORM in message and "nox -s wheels" in message


def test_an_unknown_delta_type_names_both_install_forms(monkeypatch):
    monkeypatch.setenv("OPENDELTA_DISABLE_PLUGINS", "lora")
    reload()
    try:
        with pytest.raises(UnknownDeltaMethodError, match="install its plugin: pip install opendelta-lora") as caught:
            get_method("lora")
    finally:
        monkeypatch.delenv("OPENDELTA_DISABLE_PLUGINS")
        reload()
    assert WHEELHOUSE_FORM in str(caught.value)


def test_a_third_party_distribution_gets_only_its_published_name():
    assert install_hint("opendelta-toy") == "pip install opendelta-toy"
    assert "wheelhouse" not in install_hint("opendelta-lora", "someone-elses-plugin")


def test_version_specifiers_are_quoted_in_both_forms():
    hint = install_hint("opendelta-lora>=1.2", upgrade=True)
    assert hint.startswith("pip install -U 'opendelta-lora>=1.2' (")
    assert "pip install -U --find-links wheelhouse 'opendelta-lora>=1.2'" in hint


def test_an_unmapped_architecture_points_to_opendelta_show(no_inference):
    reload()
    config = AutoConfig.for_model("distilbert", dim=32, hidden_dim=37, n_layers=2, n_heads=4, vocab_size=99)
    with pytest.raises(StructureNotFoundError, match="opendelta show <model folder>") as caught:
        structure_for_model(DistilBertModel(config))
    assert "bigmodelvis" not in str(caught.value)


def test_extras_are_quoted_so_a_shell_does_not_glob_them():
    hint = install_hint("opendelta-core[testing]")
    assert hint.startswith("pip install 'opendelta-core[testing]' (")
    assert "--find-links wheelhouse 'opendelta-core[testing]'" in hint
