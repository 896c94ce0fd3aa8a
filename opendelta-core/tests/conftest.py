"""Registers the test-only toy method through a throwaway plugin, for one test at a time."""

import pytest
from toy_method import ToyModel, ToyPlugin

import opendelta
from opendelta.registry import reload


@pytest.fixture
def toy():
    """Register the toy method for one test; core's registry is restored afterwards."""
    reload()
    opendelta.plugins.load_plugins()
    opendelta.plugins.pm.register(ToyPlugin(), name="toy")
    try:
        yield ToyModel
    finally:
        reload()


@pytest.fixture
def toy_checkpoint_dir(toy, tmp_path):
    """A trained toy delta on tiny BERT saved with its task head: ``tmp_path / "ckpt"``."""
    from opendelta.testing import perturb, tiny_model

    delta_model = toy(tiny_model("bert"))
    perturb(delta_model)
    delta_model.freeze_module(exclude=["deltas", "classifier"])
    return delta_model.save_finetuned(tmp_path / "ckpt")


@pytest.fixture
def no_inference(monkeypatch):
    """Core's mapping inference switched off (``OPENDELTA_DISABLE_PLUGINS=structure_inference``), for tests of what
    a user meets when nothing maps a model; the registry is reloaded on both sides."""
    monkeypatch.setenv("OPENDELTA_DISABLE_PLUGINS", "structure_inference")
    reload()
    yield
    monkeypatch.delenv("OPENDELTA_DISABLE_PLUGINS")
    reload()
