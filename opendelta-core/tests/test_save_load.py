import json

import pytest
import torch

from opendelta import (
    AutoDeltaConfig,
    AutoDeltaModel,
    BackboneMismatchError,
    CheckpointError,
    DeltaConfigError,
    OpenDeltaConfigWarning,
    UnknownDeltaMethodError,
)
from opendelta.testing import perturb, tiny_inputs, tiny_model


def outputs(model):
    with torch.no_grad():
        return model(**tiny_inputs("bert")).logits


@pytest.fixture
def saved(toy, tmp_path):
    model = tiny_model("bert")
    delta_model = toy(model)
    perturb(delta_model)
    delta_model.freeze_module(exclude=["deltas", "classifier"])
    delta_model.save_finetuned(tmp_path / "ckpt")
    return tmp_path / "ckpt", outputs(model)


def test_round_trip_and_config_contents(saved):
    path, expected = saved
    files = sorted(p.name for p in path.iterdir())
    assert files[:2] == ["README.md", "config.json"] and len(files) == 3 and files[2].endswith(".safetensors")
    config = json.loads((path / "config.json").read_text())
    for key in (
        "delta_type",
        "modified_modules",
        "backbone_class",
        "backbone_hash",
        "opendelta_version",
        "transformers_version",
        "backbone_checkpoint_name",
    ):
        assert key in config
    assert config["delta_type"] == "toy" and config["backbone_class"] == "BertForSequenceClassification"
    fresh = tiny_model("bert")
    AutoDeltaModel.from_finetuned(path, backbone_model=fresh)
    assert torch.equal(outputs(fresh), expected)


def test_another_backbone_is_refused_and_left_untouched(saved):
    path, _ = saved
    other = tiny_model("bert", seed=1)
    keys, before = list(other.state_dict()), outputs(other)
    with pytest.raises(BackboneMismatchError, match="check_hash=False"):
        AutoDeltaModel.from_finetuned(path, backbone_model=other)
    assert list(other.state_dict()) == keys and torch.equal(outputs(other), before)
    assert not any(hasattr(m, "toy") for m in other.modules())


def test_check_hash_false_loads_with_a_warning(saved):
    path, _ = saved
    with pytest.warns(UserWarning, match="another backbone"):
        AutoDeltaModel.from_finetuned(path, backbone_model=tiny_model("bert", seed=1), check_hash=False)


def test_wrong_shapes_are_refused_before_anything_changes(saved, toy):
    path, _ = saved
    model = tiny_model("bert")
    from safetensors.torch import load_file, save_file

    config = json.loads((path / "config.json").read_text())
    weights = path / config["weights_file"]
    tensors = load_file(str(weights))
    name = next(k for k in tensors if k.endswith(".s"))
    tensors[name] = torch.zeros(5)
    save_file(tensors, str(weights))
    config.pop("weights_sha256")
    (path / "config.json").write_text(json.dumps(config))
    keys = list(model.state_dict())
    with pytest.raises(CheckpointError, match="shape mismatch"):
        AutoDeltaModel.from_finetuned(path, backbone_model=model)
    assert list(model.state_dict()) == keys


def test_tampered_weights_are_refused(saved):
    path, _ = saved
    weights = next(path.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="damaged"):
        AutoDeltaModel.from_finetuned(path, backbone_model=tiny_model("bert"))


def test_saving_twice_keeps_one_weights_file(toy, tmp_path):
    model = tiny_model("bert")
    delta_model = toy(model)
    delta_model.freeze_module()
    delta_model.save_finetuned(tmp_path)
    perturb(delta_model)
    delta_model.save_finetuned(tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
    assert not list(tmp_path.glob(".tmp-*"))


def test_auto_config_from_dict_and_errors(toy):
    config = AutoDeltaConfig.from_dict({"delta_type": "toy", "width": 3})
    assert type(config).__name__ == "ToyConfig" and config.width == 3
    with pytest.raises(UnknownDeltaMethodError, match="toy") as info:
        AutoDeltaConfig.from_dict({"delta_type": "tyo"})
    assert "Did you mean 'toy'" in str(info.value)
    with pytest.warns(OpenDeltaConfigWarning, match=r"dropped the key\(s\) \['colour'\]"):  # a dict made in code
        assert AutoDeltaConfig.from_dict({"delta_type": "toy", "colour": 1}) == type(config)()
    with pytest.raises(DeltaConfigError, match="colour"):  # a keyword argument stays strict
        AutoDeltaConfig.from_dict({"delta_type": "toy"}, colour=1)
    with pytest.raises(DeltaConfigError, match="width"):
        AutoDeltaConfig.from_dict({"delta_type": "toy", "width": "wide"})
    with pytest.raises(DeltaConfigError, match="width"):
        AutoDeltaConfig.from_dict({"delta_type": "toy", "width": -1})


def test_missing_folder_is_a_clear_error(toy, tmp_path):
    with pytest.raises(CheckpointError, match="no delta checkpoint"):
        AutoDeltaModel.from_finetuned(str(tmp_path / "nope" / "deeper"), backbone_model=tiny_model("bert"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"config\.json"):
        AutoDeltaModel.from_finetuned(tmp_path / "empty", backbone_model=tiny_model("bert"))


def test_saving_an_unfrozen_backbone_warns_how_to_save_only_the_delta(toy, tmp_path):
    model = tiny_model("bert")
    delta_model = toy(model)
    with pytest.warns(UserWarning, match=r"freeze_module\(exclude=\['deltas'"):
        delta_model.save_finetuned(tmp_path)
    delta_model.freeze_module(exclude=["deltas", "classifier"])
    delta_model.save_finetuned(tmp_path / "frozen")  # a trainable head is no reason to warn


def test_from_config_with_a_dict_takes_the_constructor_options_apart_from_the_fields(toy):
    delta_model = toy.from_config({"delta_type": "toy", "width": 2}, tiny_model("bert"), backend="hf")
    assert delta_model.config.width == 2
    with pytest.raises(DeltaConfigError, match="backend='bmt'"):
        toy.from_config({"delta_type": "toy"}, tiny_model("bert"), backend="bmt")
