"""Issue 14, point 2: configs from argparse / HF dataclasses, as OpenDelta 0.3.2's pipelines build them.

Written from the 0.3.2 manual's API: ``AutoDeltaConfig.from_dict(dict)`` then
``AutoDeltaModel.from_config(config, backbone_model=model)``, where the dict is a whole argument namespace
(``asdict(delta_args)``, ``vars(args)``) holding other methods' fields and pipeline options. Such keys are dropped
with one ``OpenDeltaConfigWarning``; keyword arguments typed in code and checkpoints read from disk stay strict.
And ``delta_type: "low_rank_adapter"`` (what 0.3.2 wrote) works on every path and is what we write.
"""

import argparse
import json
import warnings
from dataclasses import asdict, dataclass, field, fields

import pytest
import torch
from transformers import HfArgumentParser

from opendelta import (
    AutoDeltaConfig,
    AutoDeltaModel,
    DeltaConfigError,
    LoraConfig,
    LoraModel,
    LowRankAdapterConfig,
    LowRankAdapterModel,
    OpenDeltaConfigWarning,
    OpenDeltaVersionWarning,
)
from opendelta.cli.inspect_cmd import describe
from opendelta.testing import Pristine, model_output_tensor, perturb, tiny_inputs, tiny_model

PIPELINE_ONLY = [
    "backbone_model",
    "delay_push",
    "delta_cache_dir",
    "finetuned_delta_path",
    "force_download",
    "local_files_only",
    "model_path_public",
]
"""Options of the pipeline's DeltaArguments that are no config field of any method."""


@dataclass
class DeltaArguments:
    """Like the 0.3.2 ``examples_prompt`` pipeline's: shared options, pipeline options, several methods' fields."""

    delta_type: str = field(default="", metadata={"help": "the type of delta"})
    backbone_model: str | None = field(default="", metadata={"help": "the backbone model"})
    model_path_public: str | None = field(default="", metadata={"help": "where the backbone is published"})
    modified_modules: list[str] | None = field(default=None, metadata={"help": "the modules to modify"})
    unfrozen_modules: list[str] | None = field(default_factory=lambda: ["deltas"], metadata={"help": "left trainable"})
    finetuned_delta_path: str | None = field(default=None, metadata={"help": "a finetuned delta to load"})
    force_download: bool | None = field(default=False, metadata={"help": "download again"})
    local_files_only: bool | None = field(default=False, metadata={"help": "never download"})
    delta_cache_dir: str | None = field(default=None, metadata={"help": "cache folder"})
    delay_push: bool | None = field(default=True, metadata={"help": "push later"})
    lora_r: int | None = field(default=8, metadata={"help": "LoRA's rank"})
    bottleneck_dim: int | None = field(default=24, metadata={"help": "the adapter's bottleneck"})
    reduction_factor: int | None = field(default=None, metadata={"help": "the low-rank adapter's reduction"})


def parse(*argv: str) -> DeltaArguments:
    (delta_args,) = HfArgumentParser(DeltaArguments).parse_args_into_dataclasses(args=list(argv))
    return delta_args


def config_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, OpenDeltaConfigWarning)]


def run(model) -> torch.Tensor:
    return model_output_tensor(model(**tiny_inputs("bert")))


def has(model, delta_name: str) -> bool:
    return any(hasattr(m, delta_name) for m in model.modules())


def default_of(config_cls, name: str):
    return next(f.default for f in fields(config_cls) if f.name == name)


# ------------------------------------------------------------------------------------ the 0.3.2 pipeline's dicts
def test_the_pipelines_hf_dataclass_through_asdict_builds_the_delta_with_one_warning_naming_the_dropped_keys():
    delta_args = parse("--delta_type", "lora", "--lora_r", "4", "--modified_modules", "query", "value")
    model = tiny_model("bert")
    with pytest.warns(OpenDeltaConfigWarning) as record:
        delta_config = AutoDeltaConfig.from_dict(asdict(delta_args))
    (message,) = config_warnings(record)  # exactly one warning for the whole namespace
    for key in [*PIPELINE_ONLY, "bottleneck_dim"]:  # pipeline options and another method's field
        assert repr(key) in message
    assert "'lora_r'" not in message.split("Its fields are")[0]  # a field of LoRA: kept
    assert "reduction_factor" in message  # None for a field LoRA does not have: dropped like the others
    assert type(delta_config) is LoraConfig and delta_config.lora_r == 4
    assert delta_config.modified_modules == ["query", "value"] and delta_config.unfrozen_modules == ["deltas"]

    delta_model = AutoDeltaModel.from_config(delta_config, backbone_model=model)  # no second warning
    assert isinstance(delta_model, LoraModel)
    query = model.bert.encoder.layer[0].attention.self.query
    assert hasattr(query, "lora") and not hasattr(model.bert.encoder.layer[0].attention.self.key, "lora")
    delta_model.freeze_module(set_state_dict=True)
    model(**tiny_inputs("bert"))


def test_a_from_config_with_the_namespace_dict_directly_drops_the_same_keys():
    delta_args = parse("--delta_type", "adapter", "--bottleneck_dim", "6")
    model = tiny_model("bert")
    with pytest.warns(OpenDeltaConfigWarning, match=r"dropped the key\(s\) \[.*'lora_r'") as record:
        delta_model = AutoDeltaModel.from_config(asdict(delta_args), backbone_model=model)
    assert len(config_warnings(record)) == 1
    assert type(delta_model).__name__ == "AdapterModel" and delta_model.config.bottleneck_dim == 6
    assert has(model, "adapter")


def test_an_argparse_namespace_through_vars_with_none_for_options_not_given():
    parser = argparse.ArgumentParser()
    parser.add_argument("--delta_type", default="lora")
    parser.add_argument("--lora_r", type=int, default=None)
    parser.add_argument("--lora_alpha", type=int, default=None)  # not given: None, which LoRA's alpha cannot be
    parser.add_argument("--modified_modules", nargs="*", default=None)  # None is a value here: the defaults
    parser.add_argument("--learning_rate", type=float, default=3e-4)
    parser.add_argument("--output_dir", default="out")
    args = parser.parse_args(["--lora_r", "2"])
    model = tiny_model("bert")
    with pytest.warns(OpenDeltaConfigWarning) as record:
        delta_model = LoraModel.from_config(vars(args), model)
    (message,) = config_warnings(record)
    assert "['learning_rate', 'output_dir']" in message
    assert "took the default of ['lora_alpha'], given as None" in message
    config = delta_model.config
    assert (config.lora_r, config.lora_alpha) == (2, default_of(LoraConfig, "lora_alpha"))
    assert config.modified_modules is None and has(model, "lora")  # an optional field keeps its None


def test_a_dict_of_fields_only_builds_without_any_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = AutoDeltaConfig.from_dict({"delta_type": "lora", "lora_r": 2, "modified_modules": None})
    assert config.lora_r == 2


# ---------------------------------------------------------------------------------- typed in code: still strict
def test_a_typo_in_a_constructor_keyword_is_refused_naming_the_known_fields():
    model = tiny_model("bert")
    pristine = Pristine.of(model)
    with pytest.raises(DeltaConfigError, match=r"unknown field\(s\) \['lora_rr'\].*known fields: .*'lora_r'"):
        LoraModel(model, lora_rr=4)
    with pytest.raises(DeltaConfigError, match=r"LoraConfig\.lora_r must be"):
        LoraModel(model, lora_r=None)  # a keyword's None is the caller's value, not "not given"
    pristine.assert_unchanged(model)


def test_keyword_arguments_of_from_dict_and_from_config_stay_strict_while_their_dict_keys_are_tolerated():
    model = tiny_model("bert")
    pristine = Pristine.of(model)
    with pytest.raises(DeltaConfigError, match=r"unknown field\(s\) \['lora_rr'\]"):
        AutoDeltaConfig.from_dict({"delta_type": "lora", "output_dir": "out"}, lora_rr=4)
    with pytest.raises(DeltaConfigError, match=r"unknown field\(s\) \['lora_rr'\]"):
        AutoDeltaModel.from_config({"delta_type": "lora"}, backbone_model=model, lora_rr=4)
    with pytest.raises(DeltaConfigError, match=r"unknown field\(s\) \['lora_rr'\]"):
        LoraModel.from_config(LoraConfig(), model, lora_rr=4)
    pristine.assert_unchanged(model)
    with pytest.warns(OpenDeltaConfigWarning, match="output_dir"):
        config = AutoDeltaConfig.from_dict({"delta_type": "lora", "output_dir": "out"}, lora_r=3)
    assert config.lora_r == 3


def test_a_dict_of_another_method_is_still_refused():
    with pytest.raises(DeltaConfigError, match="LoraConfig is for delta_type 'lora', got 'adapter'"):
        LoraConfig.from_dict({"delta_type": "adapter", "bottleneck_dim": 4})


# ------------------------------------------------------------------------------------- checkpoints: still strict
def saved_lora(folder):
    model = tiny_model("bert")
    delta_model = LoraModel(model, lora_r=2)
    perturb(delta_model)
    delta_model.freeze_module(exclude=["deltas"])
    delta_model.save_finetuned(folder)
    return run(model)


def edit_config(folder, **changes):
    path = folder / "config.json"
    document = json.loads(path.read_text())
    document.update(changes)
    path.write_text(json.dumps(document))
    return document


def test_a_saved_config_with_an_unknown_field_is_refused_on_every_reading_path(tmp_path):
    folder = tmp_path / "ckpt"
    saved_lora(folder)
    edit_config(folder, lora_rank=3)
    model = tiny_model("bert")
    pristine = Pristine.of(model)
    match = r"unknown field\(s\) \['lora_rank'\] for LoraConfig"
    for read in (
        lambda: AutoDeltaModel.from_finetuned(folder, backbone_model=model),
        lambda: LoraModel.from_finetuned(folder, model),
        lambda: AutoDeltaConfig.from_finetuned(folder),
        lambda: LoraConfig.from_finetuned(folder),
        lambda: LoraConfig.from_finetuned(folder / "config.json"),
    ):
        with pytest.raises(DeltaConfigError, match=match):
            read()
    pristine.assert_unchanged(model)


def test_a_saved_config_from_a_newer_writer_still_loads_with_the_version_warning_only(tmp_path):
    folder = tmp_path / "ckpt"
    trained = saved_lora(folder)
    document = edit_config(folder, lora_rank=3)
    edit_config(folder, written_by={**document["written_by"], "opendelta-lora": "99.0.0"})
    model = tiny_model("bert")
    with pytest.warns(OpenDeltaVersionWarning, match=r"opendelta-lora 99\.0\.0.*'lora_rank'") as record:
        AutoDeltaModel.from_finetuned(folder, backbone_model=model)
    assert not config_warnings(record)  # a file is never read as a namespace
    torch.testing.assert_close(run(model), trained)


# ---------------------------------------------------------------------------------------------- low_rank_adapter
@pytest.mark.parametrize("name", ["low_rank_adapter", "lowrankadapter"])
def test_low_rank_adapter_by_either_name_through_from_dict_and_from_config(name):
    config = AutoDeltaConfig.from_dict({"delta_type": name, "reduction_factor": 16})
    assert type(config) is LowRankAdapterConfig and config.reduction_factor == 16
    assert config.delta_type == "low_rank_adapter"
    assert LowRankAdapterConfig.from_dict({"delta_type": name}).delta_type == "low_rank_adapter"
    model = tiny_model("bert")
    delta_model = AutoDeltaModel.from_config({"delta_type": name, "reduction_factor": 16}, backbone_model=model)
    assert isinstance(delta_model, LowRankAdapterModel) and has(model, "low_rank_adapter")
    other = tiny_model("bert")
    assert isinstance(LowRankAdapterModel.from_config({"delta_type": name}, other), LowRankAdapterModel)


def test_low_rank_adapter_from_the_pipelines_namespace():
    delta_args = parse("--delta_type", "low_rank_adapter", "--reduction_factor", "8")
    model = tiny_model("bert")
    with pytest.warns(OpenDeltaConfigWarning, match="bottleneck_dim"):
        delta_config = AutoDeltaConfig.from_dict(asdict(delta_args))
    assert type(delta_config) is LowRankAdapterConfig and delta_config.reduction_factor == 8
    assert isinstance(AutoDeltaModel.from_config(delta_config, backbone_model=model), LowRankAdapterModel)


def test_low_rank_adapter_is_written_as_0_3_2_wrote_it(tmp_path):
    model = tiny_model("bert")
    delta_model = LowRankAdapterModel(model, reduction_factor=16)
    delta_model.freeze_module(exclude=["deltas"])
    delta_model.save_finetuned(tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["delta_type"] == "low_rank_adapter"
    LowRankAdapterConfig(reduction_factor=4).save_finetuned(tmp_path / "config_only")
    assert json.loads((tmp_path / "config_only" / "config.json").read_text())["delta_type"] == "low_rank_adapter"
    assert AutoDeltaConfig.from_finetuned(tmp_path / "config_only").reduction_factor == 4


def test_a_checkpoint_that_says_lowrankadapter_still_loads_on_every_path(tmp_path):
    folder = tmp_path / "ckpt"
    model = tiny_model("bert")
    delta_model = LowRankAdapterModel(model, reduction_factor=16)
    perturb(delta_model)
    delta_model.freeze_module(exclude=["deltas"])
    delta_model.save_finetuned(folder)
    trained = run(model)
    edit_config(folder, delta_type="lowrankadapter")  # what earlier builds of the plugin wrote

    for load in (
        lambda fresh: AutoDeltaModel.from_finetuned(folder, backbone_model=fresh),
        lambda fresh: LowRankAdapterModel.from_finetuned(folder, fresh),
    ):
        fresh = tiny_model("bert")
        loaded = load(fresh)
        assert isinstance(loaded, LowRankAdapterModel) and loaded.config.delta_type == "low_rank_adapter"
        torch.testing.assert_close(run(fresh), trained)
    assert AutoDeltaConfig.from_finetuned(folder).reduction_factor == 16
    assert LowRankAdapterConfig.from_finetuned(folder).reduction_factor == 16
    report = describe(str(folder))  # the CLI's `opendelta inspect`
    assert report["method"]["class"] == "LowRankAdapterModel" and report["hyper_parameters"]["reduction_factor"] == 16
