"""What decides whether a checkpoint may be applied to a backbone (opendelta.backbone_check), on real files.

A config without a hash is refused unless the caller passes check_hash=False; a weights file may overwrite only
the backbone parameters its config declares; the same checkpoint is not loaded twice onto one backbone; the same
weights in float16/bfloat16 hash as the same backbone, other weights do not.
"""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from opendelta import AutoDeltaModel, BackboneMismatchError, BackboneUnverifiedError, CheckpointError, DeltaStateError
from opendelta.hashing import backbone_hash, reduced_precision_hashes
from opendelta.testing import perturb, tiny_inputs, tiny_model


def outputs(model):
    with torch.no_grad():
        return model(**tiny_inputs("bert")).logits


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_untouched(model, before):
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert not any(hasattr(m, "toy") for m in model.modules())


@pytest.fixture
def saved(toy, tmp_path):
    model = tiny_model("bert")
    delta_model = toy(model)
    perturb(delta_model)
    with torch.no_grad():
        model.classifier.weight.add_(0.5)  # a trained head, saved with the delta
    delta_model.freeze_module(exclude=["deltas", "classifier"])
    delta_model.save_finetuned(tmp_path / "ckpt")
    return tmp_path / "ckpt", outputs(model)


def edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is KeyError:
            config.pop(key, None)
        else:
            config[key] = value
    (path / "config.json").write_text(json.dumps(config))


def edit_weights(path, change):
    config = json.loads((path / "config.json").read_text())
    weights = path / config["weights_file"]
    tensors = load_file(str(weights))
    change(tensors)
    save_file(tensors, str(weights))
    edit_config(path, weights_sha256=KeyError)  # the file was rewritten: only the checks under test remain


def test_the_config_records_the_rounded_hashes_and_declares_the_head(saved):
    path, _ = saved
    config = json.loads((path / "config.json").read_text())
    assert config["backbone_tensors"] == ["classifier.bias", "classifier.weight"]
    assert sorted(config["backbone_hashes"]) == ["bfloat16", "float16"]
    assert config["backbone_hash"] not in config["backbone_hashes"].values()


@pytest.mark.parametrize("hash_field", [None, "", KeyError], ids=["null", "empty", "missing"])
def test_a_config_without_hash_is_refused_unless_the_caller_opts_out(saved, hash_field):
    path, expected = saved
    edit_config(path, backbone_hash=hash_field)
    model = tiny_model("bert")
    before = state(model)
    with pytest.raises(BackboneUnverifiedError, match=r"records no backbone_hash.*check_hash=False"):
        AutoDeltaModel.from_finetuned(path, backbone_model=model)
    assert_untouched(model, before)
    AutoDeltaModel.from_finetuned(path, backbone_model=model, check_hash=False)  # no warning: the caller chose it
    assert torch.equal(outputs(model), expected)


def test_a_backbone_tensor_smuggled_into_the_file_is_refused_by_name(saved):
    path, _ = saved
    model = tiny_model("bert")
    shape = tuple(model.bert.embeddings.word_embeddings.weight.shape)
    edit_weights(path, lambda t: t.__setitem__("bert.embeddings.word_embeddings.weight", torch.zeros(shape)))
    before = state(model)
    with pytest.raises(CheckpointError, match=r"bert\.embeddings\.word_embeddings\.weight.*does not declare"):
        AutoDeltaModel.from_finetuned(path, backbone_model=model)
    assert_untouched(model, before)
    with pytest.raises(CheckpointError, match="does not declare"):  # check_hash=False does not switch it off
        AutoDeltaModel.from_finetuned(path, backbone_model=model, check_hash=False)
    assert_untouched(model, before)


def test_a_declared_tensor_the_file_lacks_is_refused(saved):
    path, _ = saved
    edit_weights(path, lambda tensors: tensors.pop("classifier.bias"))
    model = tiny_model("bert")
    before = state(model)
    with pytest.raises(CheckpointError, match=r"declares backbone_tensors \['classifier.bias'\]"):
        AutoDeltaModel.from_finetuned(path, backbone_model=model)
    assert_untouched(model, before)


def test_removing_the_declaration_does_not_let_the_head_in(saved):
    path, _ = saved
    edit_config(path, backbone_tensors=KeyError)
    with pytest.raises(CheckpointError, match=r"\['classifier.bias', 'classifier.weight'\].*does not declare"):
        AutoDeltaModel.from_finetuned(path, backbone_model=tiny_model("bert"))


BAD_FIELDS = [
    ("backbone_tensors", "classifier.weight"),
    ("backbone_tensors", [1, 2]),
    ("backbone_tensors", {"classifier.weight": True}),
    ("backbone_tensors", None),
    ("backbone_hashes", "sha256:00"),
    ("backbone_hashes", {"float8": "sha256:00"}),
    ("backbone_hashes", {"float16": 5}),
    ("backbone_hashes", ["float16"]),
]


@pytest.mark.parametrize(("field", "value"), BAD_FIELDS, ids=[f"{f}={v!r}" for f, v in BAD_FIELDS])
@pytest.mark.parametrize("check_hash", [True, False])
def test_damaged_backbone_fields_are_refused_by_name(saved, field, value, check_hash):
    path, _ = saved
    edit_config(path, **{field: value})
    model = tiny_model("bert")
    before = state(model)
    with pytest.raises(CheckpointError, match=f"{field} must be"):
        AutoDeltaModel.from_finetuned(path, backbone_model=model, check_hash=check_hash)
    assert_untouched(model, before)


def test_the_same_checkpoint_twice_onto_one_backbone_is_refused(saved, tmp_path):
    path, expected = saved
    model = tiny_model("bert")
    first = AutoDeltaModel.from_finetuned(path, backbone_model=model)
    copy = shutil.copytree(path, tmp_path / "copy")  # the same weights under another path
    for source in (path, copy):
        with pytest.raises(DeltaStateError, match=r"already loaded onto this .*double its effect.*detach\(\)"):
            AutoDeltaModel.from_finetuned(source, backbone_model=model)
    assert torch.equal(outputs(model), expected)  # one delta, not two
    first.detach()
    AutoDeltaModel.from_finetuned(path, backbone_model=model)  # detached: loading again is legitimate
    assert torch.equal(outputs(model), expected)
    other = tiny_model("bert")
    AutoDeltaModel.from_finetuned(path, backbone_model=other)  # another backbone is unaffected
    assert torch.equal(outputs(other), expected)


def test_another_backbone_is_refused_in_every_precision(saved):
    path, _ = saved
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        other = tiny_model("bert", seed=1).to(dtype)
        before = state(other)
        with pytest.raises(BackboneMismatchError, match=r"trained on another backbone.*check_hash=False"):
            AutoDeltaModel.from_finetuned(path, backbone_model=other)
        assert_untouched(other, before)


def test_rounded_hashes_match_the_same_weights_in_half_precision_only():
    model = tiny_model("bert")
    recorded = reduced_precision_hashes(model)
    for name, dtype in (("float16", torch.float16), ("bfloat16", torch.bfloat16)):
        half = tiny_model("bert").to(dtype)
        assert backbone_hash(half) != backbone_hash(model)  # the exact hash tells the dtypes apart
        assert backbone_hash(half, precision=dtype) == recorded[name]
        mixed = tiny_model("bert").to(dtype)
        mixed.classifier.float()  # part kept in float32, as transformers does for some modules
        assert backbone_hash(mixed, precision=dtype) == recorded[name]
    other = tiny_model("bert", seed=1)
    assert reduced_precision_hashes(other) != recorded
    nudged = tiny_model("bert")
    with torch.no_grad():
        nudged.classifier.weight.add_(1e-2)  # above half precision's rounding: another backbone
    assert all(a != b for a, b in zip(reduced_precision_hashes(nudged).values(), recorded.values(), strict=True))
