"""A broken plugin costs one warning naming it, never core nor the other plugins (issue 7, point 4).

Plugins here are real, if tiny, installed distributions: a ``<name>-<version>.dist-info`` folder (METADATA and
entry_points.txt) next to the plugin's module, in a folder put on ``sys.path``, so ``importlib.metadata`` finds
them exactly as it finds pip-installed ones. Beside each broken one sits a working plugin (``opendelta-goodscale``:
a method and a structure resolver), and every case checks that (a) exactly one ``OpenDeltaPluginWarning`` names the
broken distribution, its version and the ``OPENDELTA_DISABLE_PLUGINS=<name>`` switch, (b) the good method still
builds and runs on a tiny BERT, (c) core's mappings still resolve, (d) the switch silences the warning. The
registry is reloaded around each test so that no other test sees these plugins.

The tests hold with or without the first-party plugins installed: they only name their own plugins and core's
``common_structures``.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
import textwrap
import warnings
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import torch
import transformers
from torch import nn

import opendelta
from opendelta import OpenDeltaPluginWarning, StructureNotFoundError, list_plugins
from opendelta.registry import get_method, list_methods, list_structures, reload, structure_for_model

MODULE_PREFIX = "odbp_"  # every module these tests write, so that teardown can forget them

GOOD_PLUGIN = '''
"""A working plugin: the ``goodscale`` method and a resolver for the made-up model type ``goodarch``."""
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from opendelta import DeltaConfig, DeltaModel, hookimpl


class Scale(nn.Module):
    def __init__(self, features):
        super().__init__()
        self.s = nn.Parameter(torch.zeros(features))

    def forward(self, hidden):
        return hidden * (1 + self.s)


@dataclass(kw_only=True)
class GoodScaleConfig(DeltaConfig):
    delta_type: ClassVar[str] = "goodscale"


class GoodScaleModel(DeltaModel):
    config_class = GoodScaleConfig
    delta_type = "goodscale"
    delta_name = "goodscale"
    default_modified_modules = ("attn.proj", "ff.w2")
    insertion = "after"

    def _build_delta(self, target):
        return Scale(self.features(target.module)[1])


GOODARCH = {
    "schema_version": 1,
    "model_type": "goodarch",
    "architectures": ["Wrapper"],
    "tree": {"children": {"body": {"name": "encoder"}}},
}


@hookimpl
def register_delta_methods(register):
    register("goodscale", GoodScaleConfig, GoodScaleModel)


@hookimpl(trylast=True)
def resolve_common_structure(model_type):
    return dict(GOODARCH) if model_type == "goodarch" else None
'''

HOOKIMPL = "from opendelta import hookimpl\n"
GOOD_CLASSES = "from odbp_goodscale import GoodScaleConfig, GoodScaleModel\n"
OTHER_METHOD = """
from dataclasses import dataclass
from typing import ClassVar

from opendelta import DeltaConfig, DeltaModel


@dataclass(kw_only=True)
class OtherConfig(DeltaConfig):
    delta_type: ClassVar[str] = "other"


class OtherModel(DeltaModel):
    config_class = OtherConfig
    delta_type = "other"
    delta_name = "{delta_name}"
"""


@dataclass(frozen=True)
class Dist:
    """One throwaway distribution: its entry points and the modules they load."""

    name: str
    version: str
    entry_points: dict[str, str]
    modules: dict[str, str] = field(default_factory=dict)
    folder: str = "site"  # folders are put on sys.path in the order they are first used


GOOD = Dist("opendelta-goodscale", "1.0", {"goodscale": "odbp_goodscale"}, {"odbp_goodscale": GOOD_PLUGIN})


class Site:
    """Writes distributions under ``tmp_path`` and puts their folders on ``sys.path``."""

    def __init__(self, root, monkeypatch):
        self.root, self.monkeypatch, self.folders = root, monkeypatch, []

    def install(self, *dists: Dist) -> None:
        for dist in dists:
            folder = self.root / dist.folder
            if dist.folder not in self.folders:
                self.folders.append(dist.folder)
                folder.mkdir()
            info = folder / f"{dist.name.replace('-', '_')}-{dist.version}.dist-info"
            info.mkdir()
            (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist.name}\nVersion: {dist.version}\n")
            lines = "".join(f"{name} = {value}\n" for name, value in dist.entry_points.items())
            (info / "entry_points.txt").write_text(f"[opendelta]\n{lines}")
            for module, source in dist.modules.items():
                (folder / f"{module}.py").write_text(textwrap.dedent(source))

    def activate(self) -> None:
        """Put the folders on ``sys.path``, the first used first, and forget what the registry had loaded."""
        for folder in reversed(self.folders):
            self.monkeypatch.syspath_prepend(str(self.root / folder))
        importlib.invalidate_caches()
        reload()


def _forget_our_modules() -> None:
    for module in [m for m in sys.modules if m.startswith(MODULE_PREFIX)]:
        del sys.modules[module]


@pytest.fixture
def site(tmp_path, monkeypatch):
    """Throwaway distributions on ``sys.path`` for one test; afterwards the registry loads only the real ones."""
    monkeypatch.delenv("OPENDELTA_DISABLE_PLUGINS", raising=False)
    monkeypatch.delenv("OPENDELTA_LOAD_PLUGINS", raising=False)
    monkeypatch.delenv("OPENDELTA_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    _forget_our_modules()
    try:
        yield Site(tmp_path, monkeypatch)
    finally:
        monkeypatch.undo()
        _forget_our_modules()
        importlib.invalidate_caches()
        reload()


# ---------------------------------------------------------------------------------------------- the models
class Wrapper(nn.Module):
    """A model with a config but no registered mapping: only a ``resolve_common_structure`` plugin can map it."""

    def __init__(self, model_type: str) -> None:
        super().__init__()
        self.config = SimpleNamespace(model_type=model_type)
        self.body = nn.Linear(4, 4)


def tiny_bert() -> transformers.BertModel:
    config = transformers.BertConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=16,
    )
    torch.manual_seed(0)
    return transformers.BertModel(config).eval()


def use_the_registry() -> None:
    """Everything a program may look up: each plugin hook runs (the resolvers too) and every list is built."""
    list_methods()
    list_structures()
    list_plugins()
    assert structure_for_model(Wrapper("goodarch")).model_type == "goodarch"


def assert_the_good_plugin_works(bert: transformers.BertModel) -> None:
    """``goodscale`` comes from its distribution, builds on BERT through core's mapping, and changes the output."""
    spec = get_method("goodscale")
    assert (spec.plugin, spec.distribution) == ("goodscale", "opendelta-goodscale")
    assert opendelta.GoodScaleModel is spec.model_cls  # the lazy ``from opendelta import XxxModel`` path
    inputs = torch.tensor([[1, 5, 7, 2]])
    with torch.no_grad():
        before = bert(input_ids=inputs).last_hidden_state
        delta = spec.model_cls(bert)
        assert len(delta.deltas) == 4  # attn.proj and ff.w2 of both layers, found through the bert mapping
        for parameter in delta.parameters():
            parameter.fill_(1.0)
        after = bert(input_ids=inputs).last_hidden_state
    assert torch.isfinite(after).all() and not torch.allclose(before, after)


def assert_core_structures_resolve(bert: transformers.BertModel) -> None:
    structure = structure_for_model(bert)
    assert structure.model_type == "bert"
    assert structure.source.startswith("opendelta_common_structures/bert.json")


# ---------------------------------------------------------------------------------------------- the cases
@dataclass(frozen=True)
class Case:
    """A broken distribution (``dists[-1]``, beside any it needs) and what its one warning must say."""

    id: str
    dists: tuple[Dist, ...]
    problem: str  # a regex found in the warning and in list_plugins()'s error for the plugin

    @property
    def broken(self) -> Dist:
        return self.dists[-1]

    @property
    def plugin(self) -> str:
        return next(iter(self.broken.entry_points))


def broken(
    name: str, source: str, *, entry_point: str | None = None, plugin: str = "broken", folder: str = "site"
) -> Dist:
    """A distribution ``opendelta-<name>`` 0.3.1 whose plugin ``plugin`` is the module ``odbp_<name>``."""
    module = f"{MODULE_PREFIX}{name.replace('-', '_')}"
    value = entry_point or module
    return Dist(f"opendelta-{name}", "0.3.1", {plugin: value}, {module: source}, folder)


def hook(body: str, name: str = "register_delta_methods", args: str = "register", imports: str = "") -> str:
    return f"{HOOKIMPL}{imports}\n\n@hookimpl\ndef {name}({args}):\n" + textwrap.indent(textwrap.dedent(body), "    ")


BERT_LIKE = (
    '{"schema_version": 1, "model_type": "bert", "architectures": ["BertModel"], '
    '"tree": {"children": {"embeddings.word_embeddings": {"name": "embeddings"}}}}'
)

CASES = [
    # 1. the module cannot be imported, or the entry point does not lead to an object
    Case("import-error", (broken("import-error", "raise ImportError('needs libfoo >= 2')\n"),), r"ImportError: needs"),
    Case("syntax-error", (broken("syntax-error", "def plugin(:\n"),), r"SyntaxError: "),
    Case("runtime-error", (broken("runtime-error", "raise RuntimeError('no GPU here')\n"),), r"RuntimeError: no GPU"),
    Case("sys-exit", (broken("sys-exit", "import sys\nsys.exit('giving up')\n"),), r"SystemExit: giving up"),
    Case(
        "missing-attribute",
        (broken("missing-attribute", "plugin = 1\n", entry_point="odbp_missing_attribute:plugn"),),
        r"AttributeError: .*'plugn'",
    ),
    Case(
        "missing-module",
        (broken("missing-module", "", entry_point="odbp_not_there"),),
        r"ModuleNotFoundError: No module named 'odbp_not_there'",
    ),
    Case(
        "none-object",
        (broken("none-object", "plugin = None\n", entry_point="odbp_none_object:plugin"),),
        r"resolved to None",
    ),
    # 2. clashing names
    Case(
        "twin-entry-point",
        (
            broken("twin-a", hook("pass"), plugin="twin", folder="first"),
            broken("twin-b", hook("raise AssertionError('never imported')"), plugin="twin", folder="second"),
        ),
        r"was not loaded because distribution opendelta-twin-a 0\.3\.1 already provides a plugin of that name",
    ),
    Case(  # listed before core's own on sys.path, and its module would not even import: core's still wins
        "impostor-entry-point",
        (broken("impostor", "raise ImportError('never imported')\n", plugin="common_structures"),),
        r"was not loaded because distribution opendelta-common-structures \S+ already provides",
    ),
    Case(  # "a_..." registers before "goodscale", yet the distribution named after the method keeps it
        "duplicate-method",
        (
            broken(
                "hijack",
                hook('register("goodscale", GoodScaleConfig, GoodScaleModel)', imports=GOOD_CLASSES),
                plugin="a_hijack",
            ),
        ),
        r"registered method 'goodscale', which is already registered by plugin 'goodscale'",
    ),
    Case(
        "duplicate-delta-attribute",
        (
            broken(
                "attr",
                OTHER_METHOD.format(delta_name="goodscale") + hook('register("other", OtherConfig, OtherModel)'),
                plugin="a_attr",
            ),
        ),
        r"delta attribute name 'goodscale' \(OtherModel\) is already used by method 'goodscale'",
    ),
    Case(
        "alias-over-a-method",
        (
            broken(
                "alias",
                OTHER_METHOD.format(delta_name="other")
                + hook('register("other", OtherConfig, OtherModel, aliases=("goodscale",))'),
                plugin="a_alias",
            ),
        ),
        r"alias 'goodscale' for method 'other', but 'goodscale' already names method 'goodscale'",
    ),
    Case(
        "register-wrong-types",
        (broken("wrong-types", hook('register("wrong", "GoodScaleConfig", 42)')),),
        r"config class for 'wrong' that does not subclass opendelta\.DeltaConfig: 'GoodScaleConfig'",
    ),
    Case(
        "register-under-another-name",
        (broken("renamed", hook('register("renamed", GoodScaleConfig, GoodScaleModel)', imports=GOOD_CLASSES)),),
        r"method 'renamed' with GoodScaleConfig, whose delta_type is 'goodscale'",
    ),
    # 3. invalid structure mappings
    Case(
        "mapping-not-a-dict",
        (broken("not-a-dict", hook('register(["bert"], source="list.json")', "register_common_structures")),),
        r"invalid mapping, which was ignored: common-structure mapping list\.json .*is not of type 'object'",
    ),
    Case(
        "mapping-missing-keys",
        (
            broken(
                "missing-keys",
                hook('register({"schema_version": 1, "model_type": "half"})', "register_common_structures"),
            ),
        ),
        r"invalid mapping.* 'architectures' is a required property",
    ),
    Case(
        "mapping-schema-violation",
        (
            broken(
                "schema",
                hook(f'd = {BERT_LIKE}\nd["model_type"] = "Not Valid"\nregister(d)', "register_common_structures"),
            ),
        ),
        r"invalid mapping.* at /model_type: 'Not Valid' does not match",
    ),
    Case(  # "a_..." registers before core's common_structures, yet core's bert mapping stays
        "mapping-duplicate-model-type",
        (broken("dup-bert", hook(f"register({BERT_LIKE})", "register_common_structures"), plugin="a_bert"),),
        r"mapping for 'bert', which is already registered \(opendelta_common_structures/bert\.json",
    ),
    # 4. hooks that raise, return garbage, or do not fit the hook specifications
    Case(
        "raise-in-register-delta-methods",
        (broken("raise-methods", hook("raise RuntimeError('boom in methods')")),),
        r"raised inside register_delta_methods \(RuntimeError: boom in methods\)",
    ),
    Case(
        "raise-in-register-common-structures",
        (broken("raise-structures", hook("raise KeyError('boom')", "register_common_structures")),),
        r"raised inside register_common_structures \(KeyError: 'boom'\)",
    ),
    Case(
        "raise-in-resolve-common-structure",
        (broken("raise-resolver", hook("raise RuntimeError('cannot tell')", "resolve_common_structure", "model")),),
        r"raised inside resolve_common_structure for goodarch \(RuntimeError: cannot tell\); its resolver is skipped",
    ),
    Case(
        "resolve-returns-a-list",
        (broken("list-resolver", hook("return ['bert']", "resolve_common_structure", "model_type")),),
        r"returned an invalid mapping from resolve_common_structure for goodarch: .*is not of type 'object'",
    ),
    Case(
        "resolve-returns-an-invalid-mapping",
        (broken("bad-resolver", hook('return {"model_type": model_type}', "resolve_common_structure", "model_type")),),
        r"returned an invalid mapping from resolve_common_structure for goodarch: .*'tree' is a required property",
    ),
    Case(
        "misspelled-hook",
        (broken("misspelled", hook("pass", "register_delta_method")),),
        r"implements an unknown hook \(unknown hook 'register_delta_method' in plugin .*\) and was unregistered",
    ),
    Case(
        "wrong-hook-arguments",
        (broken("wrong-args", hook("pass", args="registry")),),
        r"could not be registered \(PluginValidationError: .*Argument\(s\) \{'registry'\} are declared in the hookimpl",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_a_broken_plugin_costs_one_warning_and_nothing_else(site, monkeypatch, case):
    bert, other_bert = tiny_bert(), tiny_bert()  # before recording: transformers' notices are not ours to count
    site.install(GOOD, *case.dists)
    site.activate()
    with pytest.warns(OpenDeltaPluginWarning) as caught:
        use_the_registry()
    messages = [str(w.message) for w in caught if w.category is OpenDeltaPluginWarning]
    assert len(messages) == 1, messages
    message = messages[0]
    dist = case.broken
    assert f"OpenDelta plugin '{case.plugin}' from distribution {dist.name} {dist.version} " in message
    assert message.endswith(f"; core and the other plugins keep working ({_advice(case)}).")
    assert re.search(case.problem, message) and "\n" not in message
    failed = [p for p in list_plugins() if p.distribution == dist.name]
    assert len(failed) == 1 and failed[0].name == case.plugin and re.search(case.problem, failed[0].error)

    with warnings.catch_warnings():  # from here on, a warning of ours (a repeat, say) fails the test
        warnings.simplefilter("error", OpenDeltaPluginWarning)
        use_the_registry()
        assert_the_good_plugin_works(bert)
        assert_core_structures_resolve(other_bert)
        with pytest.raises(StructureNotFoundError, match="model_type='nowhere'"):
            structure_for_model(Wrapper("nowhere"))

        monkeypatch.setenv("OPENDELTA_DISABLE_PLUGINS", case.plugin)
        reload()
        list_methods()
        list_structures()
        assert structure_for_model(Wrapper("goodarch")).model_type == "goodarch"
        assert get_method("goodscale").distribution == "opendelta-goodscale"
        assert not [p for p in list_plugins() if p.distribution == dist.name]


def _advice(case: Case) -> str:
    if "entry-point" in case.id:
        return f"uninstall one of them, or set OPENDELTA_DISABLE_PLUGINS={case.plugin} to skip both"
    return f"set OPENDELTA_DISABLE_PLUGINS={case.plugin} to skip it"


def test_a_broken_resolver_warns_once_per_load_and_list_plugins_keeps_the_reason(site):
    """Lookups repeat, the warning does not; a reload is a new load, so the plugin gets one more try and warning."""
    resolver = hook("raise RuntimeError('flaky')", "resolve_common_structure", "model_type")
    site.install(GOOD, broken("flaky", resolver, plugin="flaky"))
    site.activate()
    expected = "opendelta-flaky 0.3.1 raised inside resolve_common_structure"
    with pytest.warns(OpenDeltaPluginWarning, match=expected) as caught:
        structures = [structure_for_model(Wrapper("goodarch")) for _ in range(3)]
    assert len(caught) == 1 and {s.model_type for s in structures} == {"goodarch"}
    info = next(p for p in list_plugins() if p.name == "flaky")
    assert info.distribution == "opendelta-flaky" and info.hooks == ("resolve_common_structure",)
    assert info.error.startswith("raised inside resolve_common_structure for goodarch (RuntimeError: flaky)")

    reload()  # the next load: with only a broken resolver to ask, the lookup ends in the normal error
    with pytest.warns(OpenDeltaPluginWarning, match="flaky") as caught:
        with pytest.raises(StructureNotFoundError, match="model_type='nowhere'"):
            structure_for_model(Wrapper("nowhere"))
        assert structure_for_model(Wrapper("goodarch")).model_type == "goodarch"
    assert len(caught) == 1


def test_a_program_and_the_plugins_command_run_beside_a_broken_plugin(tmp_path):
    """In a new process, as a user meets it: the warning on stderr, exit status 0, the report names the failure.

    ``OPENDELTA_LOAD_PLUGINS`` makes the process see core's mappings and these two plugins only, whatever else is
    installed.
    """
    site = Site(tmp_path, None)
    site.install(GOOD, broken("import-error", "raise ImportError('needs libfoo >= 2')\n"))
    env = {key: value for key, value in os.environ.items() if not key.startswith("OPENDELTA_")}
    env.update(
        PYTHONPATH=os.pathsep.join(filter(None, [str(tmp_path / "site"), env.get("PYTHONPATH")])),
        HF_HUB_OFFLINE="1",
        OPENDELTA_LOAD_PLUGINS="common_structures,goodscale,broken",
    )
    code = (
        "import opendelta; from opendelta.registry import list_methods; "
        "print(*[m.name for m in list_methods()]); print(opendelta.GoodScaleModel.__name__)"
    )
    run = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, "env": env}
    program = subprocess.Popen([sys.executable, "-c", code], **run)  # both at once: each spends seconds on torch
    listing = subprocess.Popen([sys.executable, "-m", "opendelta", "plugins"], **run)

    out, err = program.communicate(timeout=300)
    assert program.returncode == 0, err
    assert out.split("\n")[:2] == ["goodscale", "GoodScaleModel"]
    assert "Traceback" not in err
    warning = next(line for line in err.splitlines() if "OpenDeltaPluginWarning" in line)
    assert "OpenDelta plugin 'broken' from distribution opendelta-import-error 0.3.1 failed to import" in warning
    assert "(ImportError: needs libfoo >= 2)" in warning and "set OPENDELTA_DISABLE_PLUGINS=broken" in warning

    out, err = listing.communicate(timeout=300)
    assert listing.returncode == 0, err
    assert re.search(r"^  goodscale\s+GoodScaleModel\s+GoodScaleConfig\s+opendelta-goodscale 1\.0$", out, re.M)
    loaded = out.split("Plugins, entry-point group 'opendelta' (2 loaded):")[1].split("\n\n")[0]
    assert re.search(r"^  common_structures\s+opendelta-common-structures\s", loaded, re.M)
    assert re.search(r"^  goodscale\s+opendelta-goodscale\s+1\.0\s", loaded, re.M)
    failed = out.split("Plugins that failed to load (1):")[1].split("\n\n")[0]
    assert re.search(r"^  broken\s+opendelta-import-error\s+0\.3\.1\s+ImportError: needs libfoo >= 2$", failed, re.M)
    assert "OPENDELTA_DISABLE_PLUGINS=broken" in out.split("Problems reported while loading (1):")[1]
