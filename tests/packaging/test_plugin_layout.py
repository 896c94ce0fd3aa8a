"""Every first-party plugin ships its own conformance battery (CI relies on it: see ``noxfile.tests_all``)."""

import ast
from pathlib import Path

import pytest

PLUGINS = sorted(p for p in (Path(__file__).resolve().parents[2] / "plugins").glob("opendelta-*") if p.is_dir())


def _registered_methods(plugin: Path) -> set[str]:
    """The ``delta_type`` of every config class in the plugin's sources (what ``register`` makes a method name)."""
    names = set()
    for source in (plugin / "src").rglob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == "delta_type":
                if isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
                    names.add(node.value.value)
    return names


def _battery_methods(plugin: Path) -> set[str]:
    """The ``method_name`` of every ``DeltaMethodSuite`` subclass in the plugin's tests."""
    names = set()
    for test in (plugin / "tests").rglob("test_*.py"):
        for node in ast.walk(ast.parse(test.read_text())):
            if isinstance(node, ast.ClassDef) and any(getattr(b, "id", None) == "DeltaMethodSuite" for b in node.bases):
                for item in node.body:
                    if isinstance(item, ast.Assign) and getattr(item.targets[0], "id", None) == "method_name":
                        names.add(getattr(item.value, "value", None))
    return names


def test_there_are_plugins():
    assert len(PLUGINS) >= 10


@pytest.mark.parametrize("plugin", PLUGINS, ids=[p.name for p in PLUGINS])
def test_each_method_of_each_plugin_has_its_conformance_battery_in_the_plugins_own_tests(plugin):
    methods = _registered_methods(plugin)
    assert methods, f"{plugin.name}: no config class with a delta_type found"
    missing = methods - _battery_methods(plugin)
    assert not missing, f"{plugin.name}: no DeltaMethodSuite subclass with method_name in {sorted(missing)}"


def _public_classes(plugin: Path) -> set[str]:
    """The ``XxxModel`` / ``XxxConfig`` names in the ``__all__`` of the plugin's package (what ``from opendelta``
    serves once it is installed)."""
    names = set()
    for init in (plugin / "src").glob("*/__init__.py"):
        for node in ast.walk(ast.parse(init.read_text())):
            if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "__all__":
                names |= {e.value for e in node.value.elts if e.value.endswith(("Model", "Config"))}
    return names


@pytest.mark.parametrize("plugin", PLUGINS, ids=[p.name for p in PLUGINS])
def test_every_class_and_method_name_of_a_plugin_points_the_install_hint_at_that_plugin(plugin):
    """``from opendelta import BOFTModel`` without the plugin must say ``pip install opendelta-oft``."""
    from opendelta.plugins import first_party_distribution

    names = _public_classes(plugin) | _registered_methods(plugin)
    assert names
    wrong = {n: first_party_distribution(n) for n in names if first_party_distribution(n) != plugin.name}
    assert not wrong, f"the install hint for these names does not name {plugin.name}: {wrong}"
