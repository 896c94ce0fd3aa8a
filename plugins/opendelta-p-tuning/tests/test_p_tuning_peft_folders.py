"""PEFT P_TUNING folders load through ``from_finetuned`` with PEFT's outputs, ``save_peft`` folders load in PEFT."""

import json

import pytest
import torch
from p_tuning_helpers import HEADS, HIDDEN, TOKENS, fresh, peft_p_tuning, real_rows, run

from opendelta import AutoDeltaModel, CheckpointError
from opendelta.testing import Pristine
from opendelta_p_tuning import PTuningModel

peft = pytest.importorskip("peft")


def saved(arch, tmp_path, kind="MLP"):
    """A PEFT folder, and the outputs PEFT gives when it loads it back (inference mode, as from_pretrained does)."""
    folder = tmp_path / f"peft-{arch}-{kind}"
    peft_p_tuning(fresh(arch), arch, kind, seed=2).save_pretrained(folder)
    return folder, run(peft.PeftModel.from_pretrained(fresh(arch), folder).eval(), arch)


@pytest.mark.parametrize("kind", ["MLP", "LSTM"])
@pytest.mark.parametrize("arch", tuple(HEADS))
def test_a_peft_p_tuning_folder_loads_with_peft_outputs(arch, kind, tmp_path):
    folder, expected = saved(arch, tmp_path, kind)
    model = fresh(arch)
    delta_model = AutoDeltaModel.from_finetuned(folder, backbone_model=model)
    assert type(delta_model) is PTuningModel and delta_model.config.inference_mode
    assert (real_rows(expected, arch) - real_rows(run(model, arch), arch)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("arch", tuple(HEADS))
def test_save_peft_gives_a_folder_peft_loads_with_our_outputs(arch, tmp_path):
    model = fresh(arch)
    delta_model = PTuningModel(model, TOKENS, "LSTM", HIDDEN)
    ours = run(model, arch)
    folder = delta_model.save_peft(tmp_path / "exported")
    assert json.loads((folder / "adapter_config.json").read_text())["task_type"] == HEADS[arch][1]
    theirs = run(peft.PeftModel.from_pretrained(fresh(arch), folder).eval(), arch)
    assert (real_rows(theirs, arch) - real_rows(ours, arch)).abs().max().item() <= 1e-5
    again = fresh(arch)
    AutoDeltaModel.from_finetuned(folder, backbone_model=again)  # and back into ours
    assert (real_rows(run(again, arch), arch) - real_rows(ours, arch)).abs().max().item() <= 1e-5


def test_the_alias_and_the_class_read_the_folder_and_another_method_refuses_it(tmp_path):
    folder, _ = saved("gpt2", tmp_path)
    first = PTuningModel.from_finetuned(folder, backbone_model=fresh("gpt2"))
    second = AutoDeltaModel.from_finetuned(folder, backbone_model=fresh("gpt2"))
    assert torch.equal(first.deltas[0].embedding.weight, second.deltas[0].embedding.weight)
    lora = pytest.importorskip("opendelta_lora")
    with pytest.raises(CheckpointError):
        lora.LoraModel.from_finetuned(folder, backbone_model=fresh("gpt2"))


def _edit(folder, **fields):
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


@pytest.mark.parametrize(
    "fields, named",
    [
        ({"modules_to_save": ["nothing"]}, "modules_to_save"),  # the classifier's tensors are no head's then
        ({"some_future_option": 3}, "some_future_option"),
        ({"encoder_reparameterization_type": "GRU"}, "encoder_reparameterization_type"),
        ({"num_virtual_tokens": 0}, "num_virtual_tokens"),
        ({"task_type": "MASKED_LM"}, "task_type"),
        ({"num_virtual_tokens": 5}, "shape mismatch"),  # the tensor holds 3 rows
    ],
)
def test_folders_it_cannot_load_faithfully_are_refused_by_name_and_change_nothing(fields, named, tmp_path):
    folder, _ = saved("bert", tmp_path)
    _edit(folder, **fields)
    model = fresh("bert")
    before = Pristine.of(model)
    with pytest.raises(CheckpointError, match=named):
        AutoDeltaModel.from_finetuned(folder, backbone_model=model)
    before.assert_unchanged(model)


def test_save_peft_refuses_a_prompt_peft_cannot_place(tmp_path):
    model = fresh("gpt2")
    delta_model = PTuningModel(model, TOKENS, modified_modules=["transformer"])
    with pytest.raises(CheckpointError, match="token embeddings"):
        delta_model.save_peft(tmp_path / "x")
    with pytest.raises(CheckpointError, match="task_type"):
        PTuningModel(fresh("gpt2"), TOKENS).save_peft(tmp_path / "y", task_type="MASKED_LM")
