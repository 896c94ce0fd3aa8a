"""PEFT adapter folders as plugins read and write them: only the folder of the type asked for, hostile files refused."""

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from opendelta import CheckpointError
from opendelta.plugin_api import PEFT_PREFIX, PeftFolder, peft_folder, write_peft_folder


def _folder(tmp_path, config, tensors=None):
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    if tensors is not None:
        save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    return tmp_path


def test_a_folder_of_another_type_or_no_adapter_is_left_to_other_readers(tmp_path):
    assert peft_folder(tmp_path, "IA3") is None
    _folder(tmp_path, {"peft_type": "LORA", "r": 8})
    assert peft_folder(tmp_path, "IA3") is None
    found = peft_folder(tmp_path, "lora")
    assert isinstance(found, PeftFolder) and found.peft_type == "LORA" and found.config["r"] == 8


def test_written_folders_read_back_with_names_and_values(tmp_path):
    vector = torch.arange(4.0)
    write_peft_folder(
        tmp_path / "out", {"peft_type": "IA3", "target_modules": ["k"]}, {f"{PEFT_PREFIX}a.k.ia3_l": vector}
    )
    found = peft_folder(tmp_path / "out", "IA3")
    assert found.config["target_modules"] == ["k"]
    assert torch.equal(found.module_tensors(nn.Linear(2, 2), ["ia3_l"])["a.k"]["ia3_l"], vector)
    assert not list((tmp_path / "out").glob(".opendelta-tmp-*"))


def test_unknown_options_are_refused_by_name_and_unset_ones_pass(tmp_path):
    found = peft_folder(_folder(tmp_path, {"peft_type": "IA3", "task_type": None, "rank_pattern": {}}), "IA3")
    found.refuse_unknown({"target_modules"}, "IA3Model")
    found = peft_folder(_folder(tmp_path, {"peft_type": "IA3", "future_option": 3}), "IA3")
    with pytest.raises(CheckpointError, match="future_option=3 is a PEFT option IA3Model does not support"):
        found.refuse_unknown({"target_modules"}, "IA3Model")
    found = peft_folder(_folder(tmp_path, {"peft_type": "IA3", "layers_to_transform": [0, 1]}), "IA3")
    with pytest.raises(CheckpointError, match=r"layers_to_transform=\[0, 1\] is a PEFT option"):
        found.refuse_unknown({"target_modules"}, "IA3Model")


def test_a_tensor_of_another_shape_is_refused_rather_than_dropped(tmp_path):
    tensors = {f"{PEFT_PREFIX}a.k.ia3_l": torch.ones(2), "something.else": torch.ones(1)}
    found = peft_folder(_folder(tmp_path, {"peft_type": "IA3"}, tensors), "IA3")
    with pytest.raises(CheckpointError, match=r"'something\.else' is not a IA3 tensor"):
        found.module_tensors(nn.Linear(2, 2), ["ia3_l"])


def test_missing_weights_and_links_out_of_the_folder_are_refused(tmp_path):
    (tmp_path / "a").mkdir()
    found = peft_folder(_folder(tmp_path / "a", {"peft_type": "IA3"}), "IA3")
    with pytest.raises(CheckpointError, match=r"no adapter_model\.safetensors"):
        found.tensors(nn.Linear(2, 2))
    outside = tmp_path / "elsewhere.safetensors"
    save_file({"x": torch.ones(1)}, str(outside))
    (tmp_path / "a" / "adapter_model.safetensors").symlink_to(outside)
    with pytest.raises(CheckpointError):
        found.tensors(nn.Linear(2, 2))


def test_an_oversized_or_non_object_config_is_refused(tmp_path):
    (tmp_path / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError):
        peft_folder(tmp_path, "IA3")
    (tmp_path / "adapter_config.json").write_text(" " * 5_000_000 + "{}")
    with pytest.raises(CheckpointError):
        peft_folder(tmp_path, "IA3")


def test_a_pickled_weights_file_is_read_without_running_code(tmp_path):
    _folder(tmp_path, {"peft_type": "IA3"})
    torch.save({f"{PEFT_PREFIX}a.ia3_l": torch.ones(3)}, tmp_path / "adapter_model.bin")
    assert list(peft_folder(tmp_path, "IA3").tensors(nn.Linear(2, 2))) == [f"{PEFT_PREFIX}a.ia3_l"]

    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('ran')",))

    torch.save({"x": Boom()}, tmp_path / "adapter_model.bin")
    with pytest.raises(CheckpointError):
        peft_folder(tmp_path, "IA3").tensors(nn.Linear(2, 2))


def test_the_reader_refuses_a_from_finetuned_of_another_class(tmp_path):
    found = peft_folder(_folder(tmp_path, {"peft_type": "IA3"}), "IA3")

    class Ours:
        delta_type = "ia3"

    class Other:
        delta_type = "lora"

    class Generic:
        delta_type = ""

    found.refuse_other_class(Ours, Ours)
    found.refuse_other_class(Generic, Ours)
    with pytest.raises(CheckpointError, match=r"Other cannot read it; load it with Ours\.from_finetuned"):
        found.refuse_other_class(Other, Ours)


def test_a_config_without_targets_or_with_all_linear_is_refused(tmp_path):
    peft_folder(_folder(tmp_path, {"peft_type": "LOHA", "target_modules": ["q"]}), "LOHA").require_targets("LoHaModel")
    for targets, named in (
        (None, "has no target_modules"),
        ([], "has no target_modules"),
        ("ALL-LINEAR", "all-linear"),
    ):
        found = peft_folder(_folder(tmp_path, {"peft_type": "LOHA", "target_modules": targets}), "LOHA")
        with pytest.raises(CheckpointError, match=named):
            found.require_targets("LoHaModel")


def test_only_an_untrained_bias_passes(tmp_path):
    for bias in (None, "none"):
        peft_folder(_folder(tmp_path, {"peft_type": "VERA", "bias": bias}), "VERA").refuse_trained_bias("VeraModel")
    found = peft_folder(_folder(tmp_path, {"peft_type": "VERA", "bias": "lora_only"}), "VERA")
    with pytest.raises(CheckpointError, match="bias='lora_only' saves trained backbone biases, which VeraModel"):
        found.refuse_trained_bias("VeraModel")


def test_a_reader_may_accept_safetensors_only(tmp_path):
    _folder(tmp_path, {"peft_type": "IA3"})
    torch.save({f"{PEFT_PREFIX}a.ia3_l": torch.ones(3)}, tmp_path / "adapter_model.bin")
    found = peft_folder(tmp_path, "IA3")
    assert found.weights_file().name == "adapter_model.bin"
    with pytest.raises(CheckpointError, match=r"no adapter_model\.safetensors"):
        found.tensors(nn.Linear(2, 2), pickled=False)
