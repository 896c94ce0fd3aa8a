r"""Issue 14, point 1: 0.3.2's module layout imports, and every name is an alias of ours, not a copy.

Written from the 0.3.2 manual: its module index (``opendelta.utils.model_md5``, ``.name_based_addressing``,
``.signature``, ``opendelta.auto_delta``, ``opendelta.utils.structure_mapping.CommonStructureMap``), section 1.15.3
(end-matching at a ``.`` boundary, ``[r]`` expressions), 1.16 (common names), 1.23 (utils) and the 0.3.2 release
notes (``opendelta.utils.inspect`` reports what the optimizer trains).
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import logging as std_logging
import subprocess
import sys
from pathlib import Path

import bigmodelvis
import pytest
import torch
from torch import nn

import opendelta
from opendelta import DeltaMethodNotInstalledError, LoraModel, list_plugins
from opendelta.addressing import compile_patterns, find_matches
from opendelta.errors import StructureNotFoundError
from opendelta.hashing import backbone_hash
from opendelta.method_classes import CORE_CLASSES, METHOD_CLASS
from opendelta.registry import list_methods, reload, structure_for_model
from opendelta.testing.tiny_models import tiny_model
from opendelta.visualization import count_parameters

CORE_SRC = Path(opendelta.__file__).parent

UTILS_MODULES = [
    "opendelta.utils.inspect",
    "opendelta.utils.visualization",
    "opendelta.utils.logging",
    "opendelta.utils.structure_mapping",
    "opendelta.utils.name_based_addressing",
    "opendelta.utils.signature",
    "opendelta.utils.model_md5",
]

DELTA_MODEL_MODULES = {  # 0.3.2's module -> the stem of its classes
    "lora": "Lora",
    "bitfit": "BitFit",
    "adapter": "Adapter",
    "compacter": "Compacter",
    "prefix": "Prefix",
    "soft_prompt": "SoftPrompt",
    "low_rank_adapter": "LowRankAdapter",
    "parallel_adapter": "ParallelAdapter",
}


@pytest.fixture
def od_logging():
    """0.3.2's logging module, with the ``opendelta`` logger put back as ``import opendelta`` leaves it."""
    from opendelta.utils import logging as od_logging

    od_logging._reset()
    try:
        yield od_logging
    finally:
        od_logging._reset()


class _Records(std_logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: std_logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def records(od_logging):
    handler = _Records()
    od_logging.add_handler(handler)
    od_logging.disable_default_handler()  # keep the test's stderr clean
    try:
        yield handler
    finally:
        od_logging.remove_handler(handler)


@pytest.fixture
def without_plugin(monkeypatch):
    """``without_plugin("opendelta-lora")``: that distribution's plugin is skipped until the test ends."""

    def disable(distribution: str) -> None:
        name = next(p.name for p in list_plugins() if p.distribution == distribution)
        monkeypatch.setenv("OPENDELTA_DISABLE_PLUGINS", name)
        reload()

    yield disable
    monkeypatch.delenv("OPENDELTA_DISABLE_PLUGINS", raising=False)
    reload()


# --- the module paths -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [*UTILS_MODULES, "opendelta.utils", "opendelta.auto_delta", "opendelta.delta_models"]
    + [f"opendelta.delta_models.{m}" for m in DELTA_MODEL_MODULES],
)
def test_every_032_module_path_imports(path):
    assert importlib.import_module(path).__name__ == path


def test_the_manuals_imports_work_as_written():
    from opendelta.auto_delta import AutoDeltaConfig, AutoDeltaModel
    from opendelta.delta_models.adapter import AdapterConfig
    from opendelta.delta_models.lora import LoraConfig, LoraModel
    from opendelta.utils.inspect import inspect_module_statistics, inspect_optimizer_statistics
    from opendelta.utils.model_md5 import gen_model_hash
    from opendelta.utils.name_based_addressing import endswith_in_normal, endswith_in_regex, is_child_key
    from opendelta.utils.signature import get_arg_names, get_arg_names_inside_func, signature
    from opendelta.utils.structure_mapping import CommonStructureMap
    from opendelta.utils.visualization import Visualization

    assert AutoDeltaConfig is opendelta.AutoDeltaConfig and AutoDeltaModel is opendelta.AutoDeltaModel
    assert LoraModel is opendelta.LoraModel and LoraConfig is opendelta.LoraConfig
    assert AdapterConfig is opendelta.AdapterConfig
    assert Visualization is bigmodelvis.Visualization is opendelta.Visualization
    assert CommonStructureMap is opendelta.CommonStructureMap
    assert all(callable(f) for f in (inspect_module_statistics, inspect_optimizer_statistics, gen_model_hash))
    assert all(callable(f) for f in (endswith_in_normal, endswith_in_regex, is_child_key, signature))
    assert callable(get_arg_names) and callable(get_arg_names_inside_func)


def test_top_level_logging_is_the_032_module():
    from opendelta.utils import logging as od_logging

    assert opendelta.logging is od_logging
    assert callable(opendelta.logging.get_logger) and callable(opendelta.logging.set_verbosity_info)
    namespace: dict = {}
    exec("import logging\nfrom opendelta import *", namespace)  # a star import must not shadow stdlib's logging
    assert namespace["logging"] is std_logging and namespace["Visualization"] is bigmodelvis.Visualization


@pytest.mark.parametrize("module, stem", DELTA_MODEL_MODULES.items())
def test_each_delta_models_module_serves_the_registered_classes(module, stem):
    mod = importlib.import_module(f"opendelta.delta_models.{module}")
    spec = next(s for s in list_methods() if s.model_cls.__name__ == f"{stem}Model")
    assert getattr(mod, f"{stem}Model") is spec.model_cls is getattr(opendelta, f"{stem}Model")
    assert getattr(mod, f"{stem}Config") is spec.config_cls is getattr(opendelta.delta_models, f"{stem}Config")
    assert {f"{stem}Model", f"{stem}Config"} <= set(dir(mod)) and sorted(mod.__all__) == sorted(
        [f"{stem}Model", f"{stem}Config"]
    )


def test_star_import_of_a_delta_models_module_gives_its_classes():
    namespace: dict = {}
    exec("from opendelta.delta_models.low_rank_adapter import *", namespace)
    assert namespace["LowRankAdapterModel"] is opendelta.LowRankAdapterModel
    assert namespace["LowRankAdapterConfig"] is opendelta.LowRankAdapterConfig


def test_a_delta_models_module_serves_only_its_own_method():
    with pytest.raises(ImportError) as caught:
        from opendelta.delta_models.lora import AdapterModel  # noqa: F401
    assert not isinstance(caught.value, DeltaMethodNotInstalledError)


@pytest.mark.parametrize(
    "module, name, distribution",
    [
        ("lora", "LoraModel", "opendelta-lora"),
        ("adapter", "AdapterConfig", "opendelta-adapter"),
        ("low_rank_adapter", "LowRankAdapterModel", "opendelta-low-rank-adapter"),
        ("soft_prompt", "SoftPromptConfig", "opendelta-soft-prompt"),
    ],
)
def test_a_missing_plugin_names_its_distribution(without_plugin, module, name, distribution):
    without_plugin(distribution)
    mod = importlib.import_module(f"opendelta.delta_models.{module}")
    with pytest.raises(DeltaMethodNotInstalledError, match=f"pip install {distribution}") as caught:
        getattr(mod, name)
    assert f"opendelta.delta_models.{module}" in str(caught.value) and name not in dir(mod)
    with pytest.raises(DeltaMethodNotInstalledError, match=f"pip install {distribution}"):
        getattr(opendelta.delta_models, name)


def test_from_import_of_a_missing_plugin_names_its_distribution(without_plugin):
    without_plugin("opendelta-lora")
    with pytest.raises(DeltaMethodNotInstalledError, match="pip install opendelta-lora"):
        from opendelta.delta_models.lora import LoraModel  # noqa: F401


# --- core's names never ask to install a plugin ----------------------------------------------------------------------


def _core_names() -> set[str]:
    names = set(CORE_CLASSES) | {"DeltaBase", "SaveLoadMixin", "GlobalSetting", "global_setting", "utils"}
    for path in UTILS_MODULES:
        names |= set(importlib.import_module(path).__all__)
    return names


def test_no_core_name_gets_the_install_a_plugin_error():
    for name in sorted(_core_names()):
        try:
            getattr(opendelta, name, None)  # present, or a plain AttributeError (which getattr turns into None)
            getattr(opendelta.delta_models, name, None)
        except DeltaMethodNotInstalledError as exc:  # pragma: no cover - the failure being tested
            pytest.fail(f"opendelta.{name} is core's but asked for a plugin: {exc}")


def test_core_classes_names_every_method_shaped_class_core_defines():
    defined = set()
    for path in CORE_SRC.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        defined |= {n.name for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and METHOD_CLASS.match(n.name)}
    assert defined and defined <= CORE_CLASSES, f"add {sorted(defined - CORE_CLASSES)} to CORE_CLASSES"


def test_a_name_a_plugin_could_provide_still_names_the_distribution():
    with pytest.raises(DeltaMethodNotInstalledError, match="pip install opendelta-no-such-thing"):
        opendelta.delta_models.NoSuchThingModel
    with pytest.raises(AttributeError):
        opendelta.no_such_function


def test_import_opendelta_stays_lazy_and_leaves_logging_alone():
    code = (
        "import logging, sys, opendelta\n"
        "lazy = ['bigmodelvis', 'opendelta.utils.inspect', 'opendelta.utils.structure_mapping', "
        "'opendelta.delta_models']\n"
        "print([m for m in lazy if m in sys.modules])\n"
        "logger = logging.getLogger('opendelta')\n"
        "print(logger.handlers, logger.propagate, logger.level)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert result.stdout.split("\n")[:2] == ["[]", "[] True 0"], result.stdout + result.stderr


# --- opendelta.utils.inspect ------------------------------------------------------------------------------------------


def test_inspect_optimizer_statistics_reports_every_group(records):
    from opendelta.utils.inspect import inspect_optimizer_statistics

    first, second = nn.Linear(4, 3), nn.Linear(5, 2)
    second.bias.requires_grad_(False)
    optimizer = torch.optim.AdamW(
        [{"params": first.parameters(), "lr": 1e-3}, {"params": second.parameters(), "lr": 1e-4}], weight_decay=0.1
    )
    stats = inspect_optimizer_statistics(optimizer)
    assert list(stats) == ["param_group_0", "param_group_1"]  # 0.3.2 returned the last group's figures alone
    assert stats["param_group_0"]["total_parameters"] == 15 and stats["param_group_0"]["trainable_ratio"] == (
        "100.000000%"
    )
    group = stats["param_group_1"]
    assert (group["total_parameters"], group["trainable_parameters"], group["lr"]) == (12, 10, 1e-4)
    assert group["trainable_ratio"] == f"{10 / 12 * 100:.6f}%" and group["weight_decay"] == 0.1
    assert "params" not in group
    assert len(records.messages) == 1 and "param_group_1" in records.messages[0]
    inspect_optimizer_statistics(optimizer, verbose=False)
    assert len(records.messages) == 1


def test_inspect_module_statistics_counts_as_log_does(records):
    from opendelta.utils.inspect import (
        inspect_module_statistics,
        num_delta_parameters,
        num_total_parameters,
        num_trainable_parameters,
    )

    model = tiny_model("bert")
    delta_model = LoraModel(model)
    delta_model.freeze_module(exclude=["deltas"])
    counts = count_parameters(model)
    stat = inspect_module_statistics(model)
    assert stat["total_parameters"] == counts.total == num_total_parameters(model)
    assert stat["trainable_parameters"] == counts.trainable == num_trainable_parameters(model)
    assert stat["delta_parameters"] == counts.delta == num_delta_parameters(model) > 0
    assert stat["trainable_ratio"] == counts.trainable_ratio and stat["delta_ratio"] == counts.delta_ratio
    if not torch.cuda.is_available():
        assert stat["cudamem"] == 0 and stat["maxcudamem"] == 0
    assert records.messages == [str(stat)]


# --- opendelta.utils.logging ------------------------------------------------------------------------------------------


def test_logging_verbosity_governs_every_opendelta_logger(od_logging, records):
    od_logging.set_verbosity_error()
    assert od_logging.get_verbosity() == od_logging.ERROR
    mine = od_logging.get_logger("opendelta.my_method")
    mine.info("hidden")
    std_logging.getLogger("opendelta.base").error("core's message")
    od_logging.set_verbosity_info()
    mine.info("shown")
    assert records.messages == ["core's message", "shown"]
    od_logging.set_verbosity_warning()
    assert od_logging.get_verbosity() == std_logging.WARNING
    od_logging.set_verbosity_debug()
    assert od_logging.get_logger().getEffectiveLevel() == std_logging.DEBUG
    od_logging.set_verbosity(od_logging.CRITICAL)
    assert od_logging.get_verbosity() == 50 and od_logging.get_log_levels_dict()["critical"] == 50


def test_get_logger_verbosity_and_defaults(od_logging, monkeypatch):
    logger = od_logging.get_logger("opendelta.some_module", verbosity="debug")
    assert logger.level == std_logging.DEBUG and logger.name == "opendelta.some_module"
    assert od_logging.get_logger().name == "opendelta" and od_logging.get_verbosity() == std_logging.INFO
    assert od_logging.get_logger().propagate is False  # 0.3.2's own handler, so nothing prints twice
    od_logging.enable_propagation()
    assert od_logging.get_logger().propagate is True
    with pytest.raises(ValueError, match="one of debug, info"):
        od_logging.get_logger("x", verbosity="loud")
    od_logging._reset()
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "error")
    assert od_logging.get_verbosity() == std_logging.ERROR


def test_an_unknown_verbosity_variable_is_reported_and_info_used(od_logging, monkeypatch, capsys):
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "loud")
    assert od_logging.get_verbosity() == std_logging.INFO
    assert "unknown TRANSFORMERS_VERBOSITY='loud'" in capsys.readouterr().err


# --- opendelta.utils.structure_mapping -----------------------------------------------------------------------------


def test_common_structure_map_transforms_bert_names_to_common_names():
    from opendelta.utils.structure_mapping import CommonStructureMap

    model = tiny_model("bert", "BertForSequenceClassification")
    mapping = CommonStructureMap(model)
    assert mapping.transform("bert.encoder.layer.0.attention.self.query") == "encoder.block.0.attn.q"
    assert mapping.transform("bert.encoder.layer.1.attention.output.dense") == "encoder.block.1.attn.proj"
    assert mapping.transform("bert.encoder.layer.1.intermediate.dense") == "encoder.block.1.ff.w1"
    assert mapping.transform("bert.encoder.layer.0.output.dense") == "encoder.block.0.ff.w2"
    assert mapping.transform("bert.embeddings.word_embeddings") == "embeddings"
    common = structure_for_model(model).common_names(model)
    assert {k: mapping.transform(k) for k in common} == {k: v[0].name for k, v in common.items()}


def test_common_structure_map_strictness(records):
    from opendelta.utils.structure_mapping import CommonStructureMap

    model = tiny_model("bert", "BertForSequenceClassification")
    unmapped = "bert.embeddings.position_embeddings"  # "not common" in the manual's example (section 1.16.2)
    assert CommonStructureMap(model).transform(unmapped) is None
    assert CommonStructureMap(model).transform(unmapped, strict=False) == unmapped
    assert CommonStructureMap(model, strict=False).transform(unmapped) == unmapped
    assert records.messages == []
    CommonStructureMap(model, warning=True).transform(unmapped)
    assert records.messages == [f"{unmapped!r} has no common mapping."]


def test_common_structure_map_names_a_fused_module_as_032_did():
    from opendelta.utils.structure_mapping import CommonStructureMap

    mapping = CommonStructureMap(tiny_model("gpt2"))
    assert mapping.transform("transformer.h.0.attn.c_attn") == "decoder.block.0.attn.q,k,v"


def test_common_structure_map_of_an_unmapped_model_says_so():
    from opendelta.utils.structure_mapping import CommonStructureMap

    with pytest.raises(StructureNotFoundError, match="modified_modules") as caught:
        CommonStructureMap(nn.Sequential(nn.Linear(2, 2)))
    assert isinstance(caught.value, LookupError)


# --- opendelta.utils.name_based_addressing ---------------------------------------------------------------------------


def test_end_matching_is_on_dot_boundaries():
    from opendelta.utils.name_based_addressing import endswith_in_normal

    name = "distilbert.transformer.layer.0.attention.out_lin"
    assert endswith_in_normal(name, ["0.attention.out_lin"]) and endswith_in_normal(name, ["attention.out_lin"])
    assert endswith_in_normal(name, [name]) and endswith_in_normal(name, ["nothing", "out_lin"])
    assert not endswith_in_normal(name, ["ttention.out_lin"]) and not endswith_in_normal(name, ["attention"])
    assert not endswith_in_normal("bert.encoder.layer.0.attention.self.query", ["uery"])
    assert not endswith_in_normal(name, [])


def test_regex_end_matching_follows_the_manuals_roberta_example():
    from opendelta.utils.name_based_addressing import endswith_in, endswith_in_regex

    ff_out, attn_out = "roberta.encoder.layer.0.output.dense", "roberta.encoder.layer.0.attention.output.dense"
    layer_output = r"(\d+)\.output.dense"
    assert endswith_in_regex(ff_out, [layer_output]) and not endswith_in_regex(attn_out, [layer_output])
    assert endswith_in_regex("roberta.encoder.layer.3.attention", [r"[0-5]\.attention"])
    assert not endswith_in_regex("roberta.encoder.layer.7.attention", [r"[0-5]\.attention"])
    assert not endswith_in_regex("roberta.encoder.layer.3.attention.self", [r"[0-5]\.attention"])
    assert endswith_in(attn_out, ["attention.output.dense"]) and not endswith_in(ff_out, ["attention.output.dense"])
    assert endswith_in(ff_out, ["nothing", r"[r](\d+)\.output.dense"])


def test_name_based_addressing_agrees_with_the_delta_models_own():
    from opendelta.utils.name_based_addressing import endswith_in

    names = [name for name, _ in tiny_model("bert").named_modules() if name]
    for patterns in (["query"], ["attention.output.dense", "[r][0-1]\\.output"], ["[r]layer\\.1\\..*key"]):
        chosen = set(find_matches(names, compile_patterns(patterns), require_each=False))
        assert {n for n in names if endswith_in(n, patterns)} == chosen


def test_is_child_key_and_superstring_in():
    from opendelta.utils.name_based_addressing import is_child_key, superstring_in

    assert is_child_key("bert.encoder.layer.11.output", ["bert.encoder.layer.11"])
    assert is_child_key("bert.encoder.layer.11", ["bert.encoder.layer.11"])
    assert not is_child_key("bert.encoder.layer.110", ["bert.encoder.layer.11"])
    assert not is_child_key("bert.encoder", ["bert.encoder.layer"])
    assert superstring_in("query", ["attention.self.query"]) and not superstring_in("query", ["key", "value"])


# --- opendelta.utils.signature ---------------------------------------------------------------------------------------


def test_signature_lists_args_defaults_varargs_keywords():
    from opendelta.utils.signature import get_arg_names, signature

    def f(self, a, b=2, *rest, c=3, **options):
        pass

    sig = signature(f)
    assert sig == (["self", "a", "b"], [2], "rest", "options")
    assert (sig.args, sig.defaults, sig.varargs, sig.keywords) == (["self", "a", "b"], [2], "rest", "options")
    assert signature(lambda x: x) == (["x"], None, None, None)
    assert get_arg_names(f) == ["a", "b"] and get_arg_names(lambda x, y=1: x) == ["x", "y"]


def test_get_arg_names_inside_func_in_032_style():
    from opendelta.utils.signature import get_arg_names_inside_func

    class MyDelta:
        def __init__(self, backbone_model, bottleneck_dim=24, non_linearity="gelu_new"):
            arg_names = get_arg_names_inside_func(self.__init__)
            values = locals()
            self.recorded = {name: values[name] for name in arg_names}

    assert MyDelta(None, 8).recorded == {"backbone_model": None, "bottleneck_dim": 8, "non_linearity": "gelu_new"}
    assert get_arg_names_inside_func(lambda x, y: x) == ("x", "y")


# --- opendelta.utils.model_md5 --------------------------------------------------------------------------------------


def test_gen_model_hash_is_our_backbone_hash():
    from opendelta.utils.model_md5 import gen_model_hash, gen_parameter_hash

    first, second = tiny_model("bert"), tiny_model("bert")
    with torch.no_grad():
        second.classifier.weight.add_(1.0)  # same structure, other weights
    assert gen_model_hash(first) == backbone_hash(first) != gen_model_hash(second)
    assert gen_model_hash(first, with_parameters=False) == gen_model_hash(second, with_parameters=False)
    assert gen_model_hash(first, with_parameters=False) != gen_model_hash(tiny_model("roberta"), with_parameters=False)
    digest = gen_parameter_hash(first.parameters())
    assert digest.hexdigest() == gen_parameter_hash(first.parameters()).hexdigest()
    assert digest.hexdigest() != gen_parameter_hash(second.parameters()).hexdigest()
    md5 = gen_parameter_hash(first.parameters(), md5=hashlib.md5())
    assert len(md5.hexdigest()) == 32
