"""Issue 14, point 5: behaviours code written for OpenDelta 0.3.2 relies on, from the manual's documented API.

One group per behaviour: ``detach()``/``attach()`` twice are no-ops; ``detach()`` gives the backbone its whole
``state_dict`` back and ``attach()`` the trimmed one (``reset_state_dict``); a second delta model's
``freeze_module`` never re-enables what the user froze by hand on the first; ``save_finetuned`` refuses unknown
keywords and answers each of 0.3.2's own; a ``modified_modules`` list written for several architectures works with
a warning; the parallel adapter's flat pairs; a float32 delta loads onto a float16/bfloat16 copy of its backbone.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from huggingface_hub import ModelCard

from opendelta import (
    AdapterModel,
    AutoDeltaConfig,
    AutoDeltaModel,
    DeltaConfigError,
    DeltaStateError,
    LoraModel,
    ModuleNotFoundInStructureError,
    OpenDeltaAddressingWarning,
    OpenDeltaCompatibilityWarning,
    ParallelAdapterModel,
    UnknownArgumentError,
    list_methods,
)
from opendelta.testing import model_output_tensor, perturb, tiny_inputs, tiny_model


def run(model, arch="bert"):
    with torch.no_grad():
        return model_output_tensor(model(**tiny_inputs(arch)))


def trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture
def lora_on_bert():
    model = tiny_model("bert")
    delta_model = LoraModel(backbone_model=model, modified_modules=["query", "value"])
    perturb(delta_model)
    return model, delta_model


# ------------------------------------------------------------------------------ 1. detach/attach twice: no-ops
def test_detach_twice_and_attach_twice_are_no_ops(lora_on_bert):
    model, delta_model = lora_on_bert
    bare, attached = run(tiny_model("bert")), run(model)
    delta_model.detach()
    delta_model.detach()
    assert not delta_model.attached and torch.equal(run(model), bare)
    delta_model.attach()
    delta_model.attach()
    assert delta_model.attached and torch.equal(run(model), attached)
    assert sum(n.endswith(".lora") for n, _ in model.named_modules()) == 4  # one per target, not two


def test_the_real_refusals_stay(lora_on_bert):
    _model, delta_model = lora_on_bert
    with pytest.raises(DeltaStateError, match="cannot move to another module"):
        delta_model.detach(tiny_model("bert"))
    delta_model.merge()
    with pytest.raises(DeltaStateError, match="merged into the weights; call unmerge"):
        delta_model.attach()
    delta_model.merge_and_unload()
    for call in (delta_model.detach, delta_model.attach):
        with pytest.raises(DeltaStateError, match="after merge_and_unload"):
            call()


# ----------------------------------------------------------------- 2. detach gives the whole state_dict back
def test_detach_gives_the_whole_state_dict_back_and_attach_the_trimmed_one(lora_on_bert):
    model, delta_model = lora_on_bert
    bare_keys = list(tiny_model("bert").state_dict())
    delta_model.freeze_module(exclude=["deltas", "classifier"], set_state_dict=True)
    trimmed = set(model.state_dict())
    assert trimmed == trainable(model) and any(".lora." in k for k in trimmed)
    delta_model.detach()
    assert list(model.state_dict()) == bare_keys  # the bare model's whole state_dict, buffers included
    model.load_state_dict(tiny_model("bert").state_dict())  # and it loads a full checkpoint strictly
    delta_model.detach()
    assert list(model.state_dict()) == bare_keys
    delta_model.attach()
    assert set(model.state_dict()) == trimmed
    delta_model.attach()
    assert set(model.state_dict()) == trimmed


def test_reset_state_dict_false_keeps_the_state_dict_as_it_is(lora_on_bert):
    model, delta_model = lora_on_bert
    whole = set(model.state_dict())
    delta_model.freeze_module(set_state_dict=True)
    trimmed = set(model.state_dict())
    delta_model.detach(reset_state_dict=False)
    assert set(model.state_dict()) == trimmed - {k for k in trimmed if ".lora." in k}
    delta_model.attach(reset_state_dict=False)
    assert set(model.state_dict()) == trimmed
    delta_model.detach()
    delta_model.attach(reset_state_dict=False)  # what detach() gave back stays whole
    assert set(model.state_dict()) == whole


def test_without_freezing_the_state_dict_stays_whole(lora_on_bert):
    model, delta_model = lora_on_bert
    keys = list(model.state_dict())
    delta_model.detach()
    delta_model.attach()
    assert list(model.state_dict()) == keys


# ------------------------------------------------------------ 3. freeze_module of a second delta model
@pytest.fixture
def two_delta_models():
    model = tiny_model("bert")
    first = LoraModel(backbone_model=model, modified_modules=["query"])
    first.freeze_module(exclude=["deltas"])
    second = AdapterModel(backbone_model=model, modified_modules=["output"])
    hand_frozen = "bert.encoder.layer.0.attention.self.query.lora.lora_A"
    model.get_parameter(hand_frozen).requires_grad = False
    return model, first, second, hand_frozen


def test_a_second_freeze_module_leaves_what_the_user_froze_on_the_first(two_delta_models):
    model, _first, second, hand_frozen = two_delta_models
    second.freeze_module(exclude=["deltas"])
    now = trainable(model)
    assert hand_frozen not in now
    firsts = {n for n, _ in model.named_parameters() if ".lora." in n}
    seconds = {n for n, _ in model.named_parameters() if ".adapter." in n}
    assert firsts - {hand_frozen} <= now and seconds <= now  # the first's others as it left them, its own on
    assert now == (firsts - {hand_frozen}) | seconds  # the backbone frozen


def test_a_pattern_naming_the_firsts_parameters_does_not_turn_them_back_on_either(two_delta_models):
    model, _first, second, hand_frozen = two_delta_models
    second.freeze_module(exclude=["lora_A", "classifier"])
    now = trainable(model)
    assert hand_frozen not in now  # frozen by hand: stays so
    lora_a = {n for n, _ in model.named_parameters() if "lora_A" in n}
    assert {n for n in now if "lora_A" in n} == lora_a - {hand_frozen}
    assert not any("lora_B" in n or ".adapter." in n for n in now)  # not named, not "deltas": frozen


def test_a_second_freeze_module_without_deltas_freezes_the_first_as_well(two_delta_models):
    model, _first, second, _hand_frozen = two_delta_models
    second.freeze_module(exclude=["classifier"])
    assert trainable(model) == {"classifier.weight", "classifier.bias"}


def test_a_delta_models_own_freeze_module_turns_its_own_deltas_back_on(two_delta_models):
    model, first, second, hand_frozen = two_delta_models
    second.freeze_module(exclude=["deltas"])
    seconds = [n for n, _ in model.named_parameters() if ".adapter." in n]
    model.get_parameter(seconds[0]).requires_grad = False
    first.freeze_module(exclude=["deltas"])
    assert hand_frozen in trainable(model)  # "deltas" of the first: its own, on again
    assert seconds[0] not in trainable(model) and set(seconds[1:]) <= trainable(model)  # the second's, as they were


# ------------------------------------------------------------------------------------- 4. save_finetuned
def test_a_misspelt_keyword_is_refused_before_anything_is_written(frozen_lora, tmp_path, monkeypatch):
    _model, delta_model = frozen_lora
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UnknownArgumentError, match=r"finetuned_dela_path.*did you mean 'finetuned_delta_path'") as e:
        delta_model.save_finetuned(finetuned_dela_path=tmp_path / "delta")
    assert isinstance(e.value, TypeError) and "push_to_dc" in str(e.value)  # the accepted ones are listed
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def frozen_lora(lora_on_bert):
    lora_on_bert[1].freeze_module(exclude=["deltas"])
    return lora_on_bert


def saved_and_loaded(path):
    loaded = AutoDeltaModel.from_finetuned(path, backbone_model=tiny_model("bert"))
    return loaded.backbone_model


def test_the_original_arguments_each_do_what_they_say_or_say_why_not(frozen_lora, tmp_path):
    model, delta_model = frozen_lora
    path = tmp_path / "delta"
    with pytest.warns(OpenDeltaCompatibilityWarning) as caught:
        delta_model.save_finetuned(
            finetuned_delta_path=path,
            save_config=False,
            state_dict=None,
            save_function=torch.save,
            push_to_dc=True,
            center_args={"name": "lora-bert"},
            center_args_pool={"task": "sst2"},
            list_tags=["sst2", "nlu"],
            dict_tags={"dataset": "glue"},
            delay_push=True,
            test_result={"accuracy": 0.91},
            usage="Classify movie reviews.",
        )
    said = " ".join(str(w.message) for w in caught)
    for what in ("save_config=False", "save_function=torch.save", "push_to_dc=True", "center_args=", "delay_push="):
        assert what in said
    assert "push_to_hub=True" in said and "safetensors" in said
    assert (path / "config.json").is_file()  # written anyway: loading needs it
    assert torch.equal(run(saved_and_loaded(path)), run(model))
    card = ModelCard.load(path / "README.md")
    assert {"sst2", "nlu", "opendelta"} <= set(card.data.tags)
    assert "`dataset` | `'glue'`" in card.text and '"accuracy": 0.91' in card.text
    assert "Classify movie reviews." in card.text


def test_the_original_defaults_passed_explicitly_save_quietly(frozen_lora, tmp_path):
    _model, delta_model = frozen_lora
    delta_model.save_finetuned(
        tmp_path / "delta",
        True,
        None,
        push_to_dc=False,
        center_args={},
        center_args_pool={},
        list_tags=[],
        dict_tags={},
        delay_push=False,
        test_result=None,
        usage="",
    )
    assert (tmp_path / "delta" / "config.json").is_file()


def test_the_original_positional_order_is_read_as_the_original_meant_it(frozen_lora, tmp_path):
    model, delta_model = frozen_lora
    with pytest.warns(OpenDeltaCompatibilityWarning, match="save_function=torch.save"):
        delta_model.save_finetuned(tmp_path / "delta", True, None, torch.save, False)  # save_function, push_to_dc
    assert torch.equal(run(saved_and_loaded(tmp_path / "delta")), run(model))


def test_another_save_function_is_refused_and_nothing_is_written(frozen_lora, tmp_path):
    _model, delta_model = frozen_lora
    with pytest.raises(DeltaConfigError, match=r"save_function='my_save'.*not supported.*Nothing was saved"):

        def my_save(state_dict, path):
            raise AssertionError("never called")

        delta_model.save_finetuned(tmp_path / "delta", save_function=my_save)
    assert not (tmp_path / "delta").exists()


def test_tags_beside_a_readme_of_the_users_own_are_said_to_be_left_out(frozen_lora, tmp_path):
    _model, delta_model = frozen_lora
    (tmp_path / "README.md").write_text("my notes\n")
    with pytest.warns(OpenDeltaCompatibilityWarning, match="README of your own"):
        delta_model.save_finetuned(tmp_path, list_tags=["sst2"])
    assert (tmp_path / "README.md").read_text() == "my notes\n"


def test_the_hub_upload_options_are_still_accepted(frozen_lora, tmp_path):
    _model, delta_model = frozen_lora
    delta_model.save_finetuned(tmp_path / "delta", private=True, commit_message="x")
    assert json.loads((tmp_path / "delta" / "config.json").read_text())["delta_type"] == "lora"


# ------------------------------------------------------------- 5. modified_modules for several architectures
@pytest.mark.parametrize("arch, used, unused", [("bert", "query", "q_proj"), ("opt", "q_proj", "query")])
def test_a_list_for_several_architectures_works_and_names_what_matched_nothing(arch, used, unused):
    model = tiny_model(arch)
    with pytest.warns(OpenDeltaAddressingWarning, match=f"'{unused}' matched no module") as caught:
        delta_model = LoraModel(backbone_model=model, modified_modules=["query", "q_proj"])
    assert f"'{used}' matched" not in str(caught[0].message)
    assert delta_model.targets and all(t.name.endswith(used) for t in delta_model.targets)


def test_a_list_that_matches_nothing_is_still_an_error():
    with pytest.raises(ModuleNotFoundInStructureError, match="'q_proj', 'v_proj' matched no module"):
        LoraModel(backbone_model=tiny_model("bert"), modified_modules=["q_proj", "v_proj"])


def test_common_names_for_several_architectures_warn_too():
    with pytest.warns(OpenDeltaAddressingWarning, match="'attn.nowhere' matched no module"):
        delta_model = LoraModel(
            backbone_model=tiny_model("bert"), modified_modules=["attn.q", "attn.nowhere"], common_structure=True
        )
    assert all(t.name.endswith("query") for t in delta_model.targets)


def test_the_parallel_adapter_takes_lists_for_several_architectures_too():
    with pytest.warns(OpenDeltaAddressingWarning, match="'self_attn'"):
        delta_model = ParallelAdapterModel(
            backbone_model=tiny_model("bert"), modified_modules=["attention", "self_attn"]
        )
    assert all(t.name.endswith("attention") for t in delta_model.targets)


# ------------------------------------------------------------------- 6. the parallel adapter's flat pairs
def span_names(delta_model):
    return [(t.name, t.output.name if t.output is not None else None) for t in delta_model.targets]


def test_flat_pairs_mean_what_they_meant_in_the_original():
    flat_pairs = ["self_attn", "self_attn", "fc1", "fc2"]
    flat = ParallelAdapterModel(backbone_model=tiny_model("bart"), modified_modules=flat_pairs)
    nested = ParallelAdapterModel(backbone_model=tiny_model("bart"), modified_modules=["self_attn", ["fc1", "fc2"]])
    assert span_names(flat) == span_names(nested)
    assert flat.config.modified_modules == ["self_attn", ["fc1", "fc2"]]
    assert ("model.encoder.layers.0.fc1", "model.encoder.layers.0.fc2") in span_names(flat)


def test_the_manuals_flat_common_names_work_and_round_trip(tmp_path):
    model = tiny_model("bart")
    delta_model = ParallelAdapterModel(
        backbone_model=model, modified_modules=["attn", "attn", "ff.w1", "ff.w2"], common_structure=True
    )
    perturb(delta_model)
    delta_model.freeze_module()
    delta_model.save_finetuned(tmp_path / "pa")
    loaded = AutoDeltaModel.from_finetuned(tmp_path / "pa", backbone_model=tiny_model("bart"))
    assert span_names(loaded) == span_names(delta_model)
    torch.testing.assert_close(run(loaded.backbone_model, "bart"), run(model, "bart"))


def test_flat_pairs_that_do_not_pair_are_refused():
    with pytest.raises(DeltaConfigError, match="odd number"):
        ParallelAdapterModel(backbone_model=tiny_model("bart"), modified_modules=["self_attn", "self_attn", "fc1"])


# ---------------------------------------------------------- 7. a float32 delta on a half-precision backbone
METHODS = sorted(spec.name for spec in list_methods())  # lora, adapter, bitfit, prefix... every installed one
TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 5e-2}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("method", METHODS)
def test_a_float32_delta_loads_onto_a_half_precision_copy_of_its_backbone(method, dtype, tmp_path):
    assert {"lora", "adapter", "bitfit"} <= set(METHODS)
    model = tiny_model("bert")
    with torch.no_grad():
        model.classifier.weight.mul_(100)  # logits of magnitude about 1, for meaningful tolerances
    delta_model = AutoDeltaModel.from_config(AutoDeltaConfig.from_dict({"delta_type": method}), backbone_model=model)
    delta_model.detach()
    without_delta = run(copy.deepcopy(model).to(dtype))
    delta_model.attach()
    for scale in (0.5, 2.0, 4.0, 8.0, 16.0):  # a delta of small effect at 0.5 (IA3 on BERT) is perturbed more
        perturb(delta_model, scale=scale)
        expected = run(copy.deepcopy(model).to(dtype))  # the float32 delta, computed in that dtype
        if (expected.float() - without_delta.float()).abs().max() > 10 * TOLERANCE[dtype]:
            break
    assert (expected.float() - without_delta.float()).abs().max() > 10 * TOLERANCE[dtype]  # the delta matters
    delta_model.freeze_module(exclude=["deltas"])
    delta_model.save_finetuned(tmp_path / method)
    fresh = tiny_model("bert")
    with torch.no_grad():
        fresh.classifier.weight.mul_(100)
    fresh.to(dtype)
    loaded = AutoDeltaModel.from_finetuned(tmp_path / method, backbone_model=fresh)
    assert {p.dtype for p in loaded.parameters()} == {dtype}
    got = run(fresh)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), expected.float(), rtol=0, atol=TOLERANCE[dtype])
