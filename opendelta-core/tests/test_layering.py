"""Core's layers: every import points down, and first-party plugins use only the public plugin contract.

The layers, bottom to top (a module may import its own layer and the ones below, never one above):

0. foundation: errors, marker names and delta-module queries, a call's main input and output, the optional
   behaviours' Protocols, shapes, addressing, file patterns, structures and their schema, sequences, reusable layers,
   the memory budget, tensor checks, ownership, install hints, positional arguments, save options, expert stacks,
   the quantized-layer protocol, the tensor arithmetic of combining deltas;
1. engine: switching gates, routing, merging (primitives, steps, and into quantized weights), insertion (the
   parameter placement included), freezing, preparing a quantized backbone for training, hashing, visualization;
2. plugins: the hook specifications, the plugin loader, the structure lookup, core's quantization backends;
3. model: the config value object, targets (expert targets included), the prefix and prompt mechanisms, task heads,
   ``DeltaModel`` and its 0.3.2 face, the methods registry and the method classes it serves, combining delta models;
4. persistence: file names and atomic writes, the Hub, version skew, OpenDelta 0.3 checkpoints, the backbone check,
   checkpoint readers and the apply step, hot-loading into an existing delta, PEFT's adapter folders, the Auto
   classes;
5. faces: the package ``__init__``, the CLI, the interactive page, integrations, testing, the scaffold, 0.3.2's
   module paths, and ``plugin_api``.

The only upward imports are the documented facades: ``save_finetuned``/``from_finetuned``/``load_weights`` (model ->
persistence) and ``interactive_modify`` (model -> faces), and the quantization backends' registry reading the plugin
hook (foundation -> plugins), each inside the function that is the facade. Imports under
``if TYPE_CHECKING:`` are annotations only and do not count. Besides the layers, the import graph (facades left out)
has no cycle, and no core module below the faces imports a name from the package ``__init__``.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

CORE = Path(importlib.util.find_spec("opendelta").origin).parent
PLUGINS = Path(__file__).resolve().parents[2] / "plugins"

LAYERS: dict[int, set[str]] = {
    0: {
        "errors",
        "markers",
        "module_io",
        "delta_protocols",
        "shapes",
        "pseudo_inputs",
        "addressing",
        "file_patterns",
        "structures",
        "fused_split",
        "sequence",
        "layers",
        "budget",
        "tensor_checks",
        "ownership",
        "install_hint",
        "positional",
        "save_options",
        "classic_config",
        "dynamo_guard",
        "legacy_names",
        "expert_stacks",
        "quantization",
        "merge_arithmetic",
    },
    1: {
        "concurrency",
        "routing",
        "row_groups",
        "merging",
        "merge_steps",
        "quantized_merge",
        "insertion",
        "parameter_insertion",
        "pre_post_forward",
        "freezing",
        "kbit_training",
        "hashing",
        "visualization",
    },
    2: {"hookspecs", "plugins", "structure_registry", "structure_inference", "quantization_backends", "versions"},
    3: {
        "config",
        "all_linear",
        "targets",
        "expert_targets",
        "prefix",
        "prompt",
        "stack_prompt",
        "task_heads",
        "classic_api",
        "method_class_checks",
        "base",
        "basemodel",
        "delta_configs",
        "registry",
        "method_classes",
        "combination",
    },
    4: {
        "saving",
        "hub_cache",
        "hub",
        "compat",
        "legacy",
        "backbone_check",
        "checkpoint",
        "checkpoint_record",
        "hot_loading",
        "peft_files",
        "auto",
    },
    5: {
        "__init__",
        "__main__",
        "cli",
        "interactive",
        "integrations",
        "testing",
        "scaffold",
        "utils",
        "delta_models",
        "plugin_api",
        "auto_delta",
    },
}
"""Each core module (its first name under ``opendelta``; a subpackage counts as one) by layer."""

FACADES: dict[tuple[str, str], set[str]] = {
    ("base", "save_finetuned"): {"checkpoint"},
    ("base", "from_finetuned"): {"checkpoint"},
    ("base", "load_weights"): {"hot_loading"},
    ("base", "__init__"): {"interactive"},
    ("basemodel", "__init__"): {"interactive"},
    ("config", "save_finetuned"): {"saving"},
    ("config", "from_finetuned"): {"saving"},
    ("quantization", "quantization_backends"): {"plugins"},
}
"""(module, function) -> the modules above it that function may import: the documented facades only."""


def _layer_of(module: str) -> int:
    for layer, names in LAYERS.items():
        if module in names:
            return layer
    raise AssertionError(f"opendelta.{module} is in no layer: add it to LAYERS in {__file__}")


def _top(dotted: str) -> str | None:
    """``opendelta.insertion`` -> ``insertion``; ``opendelta`` -> ``__init__``; other packages -> None."""
    parts = dotted.split(".")
    if parts[0] != "opendelta":
        return None
    return parts[1] if len(parts) > 1 else "__init__"


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and (
        (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING")
        or (isinstance(node.test, ast.Attribute) and node.test.attr == "TYPE_CHECKING")
    )


def _imports(path: Path, package: str) -> list[tuple[str, str | None, list[str], int]]:
    """``(imported module, enclosing function or None, imported names, line)`` of every runtime import in a file."""
    found: list[tuple[str, str | None, list[str], int]] = []

    def visit(node: ast.AST, function: str | None) -> None:
        for child in ast.iter_child_nodes(node):
            if _is_type_checking(child):
                continue
            if isinstance(child, ast.Import):
                found.extend((a.name, function, [], child.lineno) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parts = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    base = ".".join([*parts, base] if base else parts)
                found.append((base, function, [a.name for a in child.names], child.lineno))
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, function or child.name)
            else:
                visit(child, function)

    visit(ast.parse(path.read_text()), None)
    return found


def _core_files() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(CORE.rglob("*.py")):
        relative = path.relative_to(CORE)
        if "template" in relative.parts:  # the scaffold's template is a plugin's source, not core's
            continue
        out.append((relative.parts[0].removesuffix(".py"), path))
    return out


def _package_of(path: Path) -> str:
    """The package a file's relative imports start from (``opendelta.cli`` for ``cli/common.py``, ``cli/__init__``)."""
    return ".".join(path.relative_to(CORE.parent).with_suffix("").parts[:-1])


def _edges() -> list[tuple[str, str, str | None, list[str], str]]:
    edges = []
    for module, path in _core_files():
        for imported, function, names, line in _imports(path, _package_of(path)):
            target = _top(imported)
            if target is None:
                continue
            if target == "__init__" and names:  # from opendelta import x: a submodule is that module
                for name in names:
                    sub = name if (CORE / f"{name}.py").exists() or (CORE / name).is_dir() else "__init__"
                    edges.append((module, sub, function, [name], f"{path.relative_to(CORE)}:{line}"))
            else:
                edges.append((module, target, function, names, f"{path.relative_to(CORE)}:{line}"))
    return edges


def test_every_core_module_is_in_a_layer():
    for module, _ in _core_files():
        _layer_of(module)


def test_every_import_points_down_except_the_documented_facades():
    upward = []
    for module, target, function, _names, where in _edges():
        if module == target or _layer_of(target) <= _layer_of(module):
            continue
        if function is not None and target in FACADES.get((module, function), set()):
            continue
        upward.append(
            f"{where}: opendelta.{module} (layer {_layer_of(module)}) imports opendelta.{target} "
            f"(layer {_layer_of(target)}) in {function or 'the module body'}"
        )
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_module_below_the_faces_imports_the_package_init():
    offenders = [
        f"{where}: opendelta.{module} imports {names} from the package __init__"
        for module, target, _f, names, where in _edges()
        if target == "__init__" and _layer_of(module) < 5
    ]
    assert not offenders, "\n".join(offenders)


def test_the_import_graph_has_no_cycle_once_the_facades_are_left_out():
    graph: dict[str, set[str]] = {}
    for module, target, function, _names, _where in _edges():
        if module == target or (function is not None and target in FACADES.get((module, function), set())):
            continue
        graph.setdefault(module, set()).add(target)
    seen: dict[str, int] = {}
    path: list[str] = []

    def walk(node: str) -> None:
        seen[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if seen.get(nxt) == 1:
                cycle = [*path[path.index(nxt) :], nxt]
                raise AssertionError("import cycle: " + " -> ".join(f"opendelta.{m}" for m in cycle))
            if nxt not in seen:
                walk(nxt)
        path.pop()
        seen[node] = 2

    for node in sorted(graph):
        if node not in seen:
            walk(node)


def _plugin_sources() -> list[Path]:
    return sorted(PLUGINS.glob("opendelta-*/src/**/*.py"))


def test_the_scaffold_template_imports_core_only_through_the_plugin_api():
    """What ``opendelta new-plugin`` writes follows the contract a first-party plugin does."""
    sources = sorted((CORE / "scaffold" / "template" / "src").rglob("*.py.tmpl"))
    offenders = []
    for path in sources:
        text = path.read_text().replace("{{package}}", "opendelta_generated").replace("{{Class}}", "Generated")
        tree = ast.parse(text.replace("{{method}}", "generated"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "opendelta":
                if node.module != "opendelta.plugin_api":
                    offenders.append(f"{path.name}:{node.lineno}: imports {node.module}")
    assert sources and not offenders, "\n".join(offenders)


@pytest.mark.skipif(not PLUGINS.is_dir(), reason="needs a clone of the repository (the plugins/ folder)")
def test_first_party_plugins_import_core_only_through_the_plugin_api():
    offenders = []
    for path in _plugin_sources():
        for imported, _function, _names, line in _imports(path, path.parent.name):
            if imported.split(".")[0] == "opendelta" and imported != "opendelta.plugin_api":
                offenders.append(f"{path.relative_to(PLUGINS)}:{line}: imports {imported}")
    assert _plugin_sources() and not offenders, "\n".join(offenders)


def test_the_plugin_api_declares_each_name_once_for_checkers_and_once_for_the_lazy_lookup():
    import opendelta.plugin_api as api

    declared = {}
    tree = ast.parse(Path(api.__file__).read_text())
    for node in tree.body:
        if _is_type_checking(node):
            for imp in node.body:
                if isinstance(imp, ast.ImportFrom):
                    for alias in imp.names:
                        declared[alias.asname or alias.name] = "opendelta" if imp.module == "opendelta" else imp.module
    assert declared == api._SOURCES
    assert sorted(api.__all__) == sorted([*api._SOURCES, "PLUGIN_API_VERSION"])
    for name in api.__all__:
        assert getattr(api, name) is not None
