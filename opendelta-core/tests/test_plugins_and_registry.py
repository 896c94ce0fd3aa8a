import pytest
from toy_method import ToyConfig, ToyModel, ToyPlugin

import opendelta
from opendelta import DeltaMethodNotInstalledError, OpenDeltaPluginWarning, list_plugins
from opendelta.plugins import pm
from opendelta.registry import get_method, list_methods, reload


def test_common_structures_come_from_their_distribution():
    info = {p.name: p for p in list_plugins()}["common_structures"]
    assert info.distribution == "opendelta-common-structures" and info.version
    assert "register_common_structures" in info.hooks


class Duplicate:
    @opendelta.hookimpl
    def register_delta_methods(self, register):
        register("toy", ToyConfig, ToyModel)


class Broken:
    @opendelta.hookimpl
    def register_delta_methods(self, register):
        raise RuntimeError("boom")


class BadName:
    @opendelta.hookimpl
    def register_delta_methods(self, register):
        register("Bad-Name", ToyConfig, ToyModel)


@pytest.mark.parametrize(
    "plugin, message",
    [(Duplicate(), "already registered by plugin 'toy'"), (Broken(), "boom"), (BadName(), "must match")],
)
def test_bad_registrations_warn_and_the_good_one_stays(toy, plugin, message):
    reload()
    opendelta.plugins.load_plugins()
    pm.register(ToyPlugin(), name="toy")
    pm.register(plugin, name="zz-bad")
    with pytest.warns(OpenDeltaPluginWarning, match=message):
        spec = get_method("toy")
    assert spec.model_cls is ToyModel and spec.plugin == "toy"


def test_missing_method_class_says_what_to_install():
    with pytest.raises(DeltaMethodNotInstalledError, match="pip install opendelta-no-such-thing"):
        from opendelta import NoSuchThingModel  # noqa: F401


def test_disabled_lora_says_pip_install_opendelta_lora(monkeypatch):
    monkeypatch.setenv("OPENDELTA_DISABLE_PLUGINS", "lora")
    reload()
    try:
        with pytest.raises(DeltaMethodNotInstalledError, match="pip install opendelta-lora"):
            from opendelta import LoraModel  # noqa: F401
    finally:
        monkeypatch.delenv("OPENDELTA_DISABLE_PLUGINS")
        reload()


def test_autoload_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("OPENDELTA_DISABLE_PLUGIN_AUTOLOAD", "1")
    reload()
    try:
        assert list_methods() == [] and list_plugins() == []
    finally:
        monkeypatch.delenv("OPENDELTA_DISABLE_PLUGIN_AUTOLOAD")
        reload()


def test_not_a_method_class_name_is_a_plain_attribute_error():
    with pytest.raises(AttributeError):
        opendelta.no_such_function
