"""Checkpoints written by the REAL original OpenDelta 0.3.2 load here with the outputs the original computed.

The fixtures in ``tests/data/legacy_opendelta/`` were made by ``make_fixtures.py`` there, with the original library
(transformers 4.45): each case folder holds the original's ``config.json`` and ``pytorch_model.bin``, the inputs, the
bare backbone's output and the output with the original's trained delta attached.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from opendelta import AutoDeltaModel, CheckpointError, get_method
from opendelta.insertion import delta_parameter_names
from opendelta.testing import model_output_tensor, tiny_inputs, tiny_model

DATA = Path(__file__).parent / "data" / "legacy_opendelta"
CASES = sorted(p.name for p in DATA.iterdir() if (p / "case.json").is_file())
LOADABLE = [c for c in CASES if not json.loads((DATA / c / "case.json").read_text())["refused"]]
REFUSED = [c for c in CASES if c not in LOADABLE]
ATOL = 2e-5
"""The original ran under transformers 4.45 with its own arithmetic (``(x A^T B^T) * s`` where we fuse an ``addmm``):
outputs agree to float32 rounding, not bit for bit."""


def case_info(case: str) -> dict:
    return json.loads((DATA / case / "case.json").read_text())


def backbone(case: str) -> torch.nn.Module:
    """The exact backbone the original trained on, rebuilt from the stored config values and weights."""
    info = case_info(case)
    values = json.loads((DATA / f"{info['backbone']}.json").read_text())
    config = transformers.AutoConfig.for_model(values.pop("model_type"), **values)
    model = getattr(transformers, info["model_class"])(config)
    weights = load_file(str(DATA / f"{info['backbone']}.safetensors"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(weights[name])
    return model.eval()


def run(model: torch.nn.Module, case: str) -> torch.Tensor:
    expected = load_file(str(DATA / case / "expected.safetensors"))
    inputs = {k.removeprefix("input."): v for k, v in expected.items() if k.startswith("input.")}
    with torch.no_grad():
        return model_output_tensor(model(**inputs))


def run_tiny(model: torch.nn.Module, arch: str) -> torch.Tensor:
    with torch.no_grad():
        return model_output_tensor(model(**tiny_inputs(arch)))


def expected(case: str, key: str) -> torch.Tensor:
    return load_file(str(DATA / case / "expected.safetensors"))[key]


def test_every_method_the_original_saved_is_covered():
    methods = {json.loads((DATA / c / "config.json").read_text())["delta_type"] for c in CASES}
    assert methods == {
        "lora",
        "adapter",
        "bitfit",
        "low_rank_adapter",
        "compacter",
        "parallel_adapter",
        "soft_prompt",
        "prefix",
    }


@pytest.mark.parametrize("case", LOADABLE)
def test_loads_with_the_originals_outputs(case, caplog):
    model = backbone(case)
    bare = run(model, case)
    torch.testing.assert_close(bare, expected(case, "bare_output"), atol=ATOL, rtol=0)  # same backbone, same inputs
    want = expected(case, "output")
    assert (want - bare).abs().max() > 100 * ATOL  # the trained delta changes the output well beyond the tolerance
    with caplog.at_level(logging.WARNING, logger="opendelta.legacy"):
        delta_model = AutoDeltaModel.from_finetuned(DATA / case, backbone_model=model)
    assert "cannot be reproduced" in caplog.text  # the original's md5 backbone hash is reported, not checked
    torch.testing.assert_close(run(model, case), want, atol=ATOL, rtol=0)
    delta_model.detach()
    if not case_info(case)["trained_backbone_modules"]:  # (a task head trained with the delta stays loaded)
        torch.testing.assert_close(run(model, case), bare, atol=0, rtol=0)  # the backbone is exactly the bare one
    delta_model.attach()
    torch.testing.assert_close(run(model, case), want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", REFUSED)
def test_prefixes_the_original_computed_otherwise_are_refused(case):
    # the original's T5 and BART prefixes went through attention internals that gave other outputs than prefix
    # tuning computes (T5: no relative position bias after the first block); loading them would change the outputs
    model = backbone(case)
    before = run(model, case)
    with pytest.raises(CheckpointError, match=r"prefix checkpoints load on \['gpt2'\] only.*train the prefix again"):
        AutoDeltaModel.from_finetuned(DATA / case, backbone_model=model)
    assert not delta_parameter_names(model) and torch.equal(run(model, case), before)


def test_the_task_head_trained_with_the_delta_is_loaded():
    case = "lora_bert_with_head"
    model = backbone(case)
    saved = torch.load(DATA / case / "pytorch_model.bin", weights_only=True)
    assert not torch.equal(model.classifier.weight, saved["classifier.weight"])
    get_method("lora").model_cls.from_finetuned(DATA / case, model)
    assert torch.equal(model.classifier.weight, saved["classifier.weight"])


def test_config_is_translated_to_common_names_and_defaults():
    model = backbone("adapter_t5")
    config = AutoDeltaModel.from_finetuned(DATA / "adapter_t5", backbone_model=model).config
    # the original wrote its defaults out as ['attn@.proj@', 'ff@.w2@']; they are the defaults here too
    assert config.modified_modules is None and config.bottleneck_dim == 6 and config.backbone_hash is None
    model = backbone("lora_bart_real_names")
    config = AutoDeltaModel.from_finetuned(DATA / "lora_bart_real_names", backbone_model=model).config
    assert config.modified_modules == ["q_proj", "v_proj"] and not config.common_structure
    assert (config.lora_r, config.lora_alpha) == (2, 6)


def test_the_originals_method_name_and_class_call_both_work():
    # the original called it "low_rank_adapter", and so does the method ("lowrankadapter" is an alias of it)
    model = backbone("low_rank_adapter_gpt2")
    delta_model = get_method("lowrankadapter").model_cls.from_finetuned(DATA / "low_rank_adapter_gpt2", model)
    assert delta_model.config.delta_type == "low_rank_adapter"
    torch.testing.assert_close(run(model, "low_rank_adapter_gpt2"), expected("low_rank_adapter_gpt2", "output"))


def test_a_delta_config_of_the_callers_own_replaces_the_saved_one():
    case = "low_rank_adapter_gpt2"
    model = backbone(case)
    config = get_method("low_rank_adapter").config_cls(reduction_factor=8)  # as saved
    AutoDeltaModel.from_finetuned(DATA / case, backbone_model=model, delta_config=config)
    torch.testing.assert_close(run(model, case), expected(case, "output"), atol=ATOL, rtol=0)


def test_the_wrong_method_class_is_refused():
    with pytest.raises(CheckpointError, match="holds a 'adapter' delta, not one for LoraModel"):
        get_method("lora").model_cls.from_finetuned(DATA / "adapter_t5", backbone("adapter_t5"))


@pytest.mark.parametrize("case", ["bitfit_bert", "parallel_adapter_bert", "soft_prompt_t5"])
def test_saved_again_in_the_new_format_it_loads_without_translation(case, tmp_path):
    model = backbone(case)
    delta_model = AutoDeltaModel.from_finetuned(DATA / case, backbone_model=model)
    delta_model.freeze_module()  # a loaded model is trainable, as in the original; save the delta only
    delta_model.save_finetuned(tmp_path / "new")
    assert not (tmp_path / "new" / "pytorch_model.bin").exists()
    fresh = backbone(case)
    AutoDeltaModel.from_finetuned(tmp_path / "new", backbone_model=fresh)
    torch.testing.assert_close(run(fresh, case), expected(case, "output"), atol=ATOL, rtol=0)


def test_a_checkpoint_for_another_backbone_is_refused_and_the_backbone_left_alone():
    other = backbone("lora_roberta_unfrozen")  # a RoBERTa: the BERT checkpoint's names are not there
    before = run(other, "lora_roberta_unfrozen")
    with pytest.raises(CheckpointError, match=r"missing \['roberta\.encoder.*unexpected \['bert\.encoder"):
        AutoDeltaModel.from_finetuned(DATA / "lora_bert_with_head", backbone_model=other)
    assert not delta_parameter_names(other)
    assert torch.equal(run(other, "lora_roberta_unfrozen"), before)


def _with_tensors(tmp_path: Path, case: str, extra: dict[str, torch.Tensor]) -> Path:
    """A copy of ``case`` whose pytorch_model.bin also holds ``extra``."""
    folder = tmp_path / case
    shutil.copytree(DATA / case, folder)
    saved = torch.load(DATA / case / "pytorch_model.bin", weights_only=True)
    torch.save({**saved, **extra}, folder / "pytorch_model.bin")
    return folder


def test_buffers_of_an_unfrozen_backbone_are_accepted_when_equal(tmp_path):
    # transformers < 4.31 saved position_ids in the state dict, so an unfrozen OpenDelta 0.3.x checkpoint holds them
    case = "lora_roberta_unfrozen"
    position_ids = dict(backbone(case).named_buffers())["roberta.embeddings.position_ids"]
    model = backbone(case)
    AutoDeltaModel.from_finetuned(
        _with_tensors(tmp_path, case, {"roberta.embeddings.position_ids": position_ids}), model
    )
    torch.testing.assert_close(run(model, case), expected(case, "output"), atol=ATOL, rtol=0)
    folder = _with_tensors(tmp_path / "other", case, {"roberta.embeddings.position_ids": position_ids + 1})
    model = backbone(case)
    with pytest.raises(CheckpointError, match=r"buffer 'roberta\.embeddings\.position_ids' with other values"):
        AutoDeltaModel.from_finetuned(folder, backbone_model=model)
    assert not delta_parameter_names(model)


def test_keys_transformers_ignores_in_old_checkpoints_are_ignored(tmp_path):
    # GPT-2's causal mask: a buffer equal to this one under transformers 4.57, a key transformers 5 ignores
    case = "low_rank_adapter_gpt2"
    mask = torch.tril(torch.ones(128, 128, dtype=torch.bool)).view(1, 1, 128, 128)
    model = backbone(case)
    AutoDeltaModel.from_finetuned(_with_tensors(tmp_path, case, {"transformer.h.0.attn.bias": mask}), model)
    torch.testing.assert_close(run(model, case), expected(case, "output"), atol=ATOL, rtol=0)
    folder = _with_tensors(tmp_path / "other", case, {"transformer.h.0.attn.unknown": mask})
    with pytest.raises(CheckpointError, match=r"unexpected \['transformer.h.0.attn.unknown'\]"):
        AutoDeltaModel.from_finetuned(folder, backbone_model=backbone(case))


def _legacy_folder(tmp_path: Path, config: dict, weights: object, *, raw_pickle: bool = False) -> Path:
    folder = tmp_path / "legacy"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    if raw_pickle:
        (folder / "pytorch_model.bin").write_bytes(pickle.dumps(weights))
    else:
        torch.save(weights, folder / "pytorch_model.bin")
    return folder


class RunsCode:
    """Unpickling this calls ``os.mkdir(marker)``: what a malicious checkpoint would do, made visible."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


@pytest.mark.parametrize("raw_pickle", [False, True], ids=["torch-save-zip", "plain-pickle"])
def test_a_pickle_that_would_run_code_is_refused_without_running_it(tmp_path, raw_pickle):
    marker = tmp_path / "the-code-ran"
    config = json.loads((DATA / "lora_bert_with_head" / "config.json").read_text())
    saved = torch.load(DATA / "lora_bert_with_head" / "pytorch_model.bin", weights_only=True)
    folder = _legacy_folder(tmp_path, config, {**saved, "classifier.bias": RunsCode(marker)}, raw_pickle=raw_pickle)
    model = backbone("lora_bert_with_head")
    before = run(model, "lora_bert_with_head")
    with pytest.raises(CheckpointError, match="other than tensors, so it was refused without running them"):
        AutoDeltaModel.from_finetuned(folder, backbone_model=model)
    assert not marker.exists()
    assert not delta_parameter_names(model) and torch.equal(run(model, "lora_bert_with_head"), before)
    with open(folder / "pytorch_model.bin", "rb") as handle:  # proof the file is malicious: unsafe loading...
        torch.load(handle, weights_only=False) if not raw_pickle else pickle.load(handle)
    assert marker.is_dir()  # ...runs its code


def test_a_pickle_of_other_plain_values_is_refused(tmp_path):
    config = json.loads((DATA / "lora_bert_with_head" / "config.json").read_text())
    folder = _legacy_folder(tmp_path, config, {"epoch": 3, "state_dict": {}})
    with pytest.raises(CheckpointError, match="names to tensors only, but holds 'epoch': int"):
        AutoDeltaModel.from_finetuned(folder, backbone_model=backbone("lora_bert_with_head"))


def test_mixed_common_and_real_names_are_refused_unless_overridden(tmp_path):
    config = json.loads((DATA / "lora_bert_with_head" / "config.json").read_text())
    config["modified_modules"] = ["attn@.q@", "value"]
    saved = torch.load(DATA / "lora_bert_with_head" / "pytorch_model.bin", weights_only=True)
    folder = _legacy_folder(tmp_path, config, saved)
    model = backbone("lora_bert_with_head")
    with pytest.raises(CheckpointError, match=r"mixes common names \(\['attn@.q@'\]\) with real module names"):
        AutoDeltaModel.from_finetuned(folder, backbone_model=model)
    AutoDeltaModel.from_finetuned(folder, backbone_model=model, modified_modules=["query", "value"])
    torch.testing.assert_close(run(model, "lora_bert_with_head"), expected("lora_bert_with_head", "output"))


def test_parallel_adapter_flat_pairs_must_pair(tmp_path):
    config = json.loads((DATA / "parallel_adapter_bert" / "config.json").read_text())
    config["modified_modules"] = ["attn@", "attn@", "ff@.w1@"]
    saved = torch.load(DATA / "parallel_adapter_bert" / "pytorch_model.bin", weights_only=True)
    with pytest.raises(CheckpointError, match="must pair its patterns two by two"):
        AutoDeltaModel.from_finetuned(_legacy_folder(tmp_path, config, saved), backbone("parallel_adapter_bert"))


def test_bitfit_on_some_slices_of_a_fused_layer(tmp_path):
    # the original saved the whole trained bias of GPT-2's fused c_attn; a BitFit on its q slice takes that slice
    model = tiny_model("gpt2")
    config = {"delta_type": "bitfit", "modified_modules": ["attn@.q@"], "common_structure": True}
    trained = {}
    for i in range(2):
        bias = dict(model.named_parameters())[f"transformer.h.{i}.attn.c_attn.bias"].detach().clone()
        bias[:32] += torch.linspace(-1, 1, 32)  # q is the first third of [q | k | v]
        trained[f"transformer.h.{i}.attn.c_attn.bias"] = bias
    reference = tiny_model("gpt2")
    with torch.no_grad():
        for name, bias in trained.items():
            dict(reference.named_parameters())[name].copy_(bias)
    delta_model = AutoDeltaModel.from_finetuned(_legacy_folder(tmp_path, config, trained), backbone_model=model)
    assert [t.parts for t in delta_model.targets] == [(0,), (0,)]
    torch.testing.assert_close(run_tiny(model, "gpt2"), run_tiny(reference, "gpt2"), atol=ATOL, rtol=0)
    trained["transformer.h.1.attn.c_attn.bias"][40] += 1.0  # a k feature: outside what this BitFit covers
    with pytest.raises(CheckpointError, match=r"changes transformer\.h\.1\.attn\.c_attn\.bias outside the slices"):
        AutoDeltaModel.from_finetuned(
            _legacy_folder(tmp_path / "k", config, trained), backbone_model=tiny_model("gpt2")
        )


@pytest.mark.parametrize("case", LOADABLE)
def test_hot_loading_the_originals_checkpoint_into_a_delta_in_place(case):
    from opendelta.testing import perturb

    model = backbone(case)
    delta_model = AutoDeltaModel.from_finetuned(DATA / case, backbone_model=model)
    perturb(delta_model, seed=7)  # another tenant's values, in the same parameters
    pointers = {n: t.data_ptr() for n, t in delta_model.delta_state_dict().items()}
    assert not torch.allclose(run(model, case), expected(case, "output"), atol=ATOL)
    delta_model.load_weights(DATA / case)  # names and shapes checked: the original's md5 hash is not reproducible
    torch.testing.assert_close(run(model, case), expected(case, "output"), atol=ATOL, rtol=0)
    assert {n: t.data_ptr() for n, t in delta_model.delta_state_dict().items()} == pointers
