"""PEFT LN tuning folders load through ``from_finetuned`` with PEFT's outputs; ours export and read back in PEFT."""

import json
import warnings

import pytest
import torch
from ln_tuning_helpers import PEFT_TARGETS, fresh, peft_ln_tuning, run

from opendelta import AutoDeltaModel, CheckpointError
from opendelta.testing import Pristine, tiny_model
from opendelta_ln_tuning import LNTuningModel

peft = pytest.importorskip("peft")
ARCHS = tuple(PEFT_TARGETS)


def saved(kind, tmp_path):
    peft_model = peft_ln_tuning(fresh(kind), kind)
    folder = tmp_path / f"peft-{kind}"
    peft_model.save_pretrained(folder)
    return folder, run(peft_model, kind)


@pytest.mark.parametrize("kind", ARCHS)
def test_a_peft_ln_tuning_folder_loads_with_peft_outputs_and_detaches_exactly(kind, tmp_path):
    folder, expected = saved(kind, tmp_path)
    model = fresh(kind)
    before = Pristine.of(model)
    delta_model = AutoDeltaModel.from_finetuned(folder, backbone_model=model)
    assert type(delta_model) is LNTuningModel
    assert (run(model, kind) - expected).abs().max().item() <= 1e-5
    delta_model.detach()
    before.assert_unchanged(model)


@pytest.mark.parametrize("kind", ARCHS)
def test_our_export_reads_back_in_peft_with_our_outputs(kind, tmp_path):
    model = fresh(kind)
    delta_model = LNTuningModel(model)
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for delta in delta_model.deltas:
            delta.offset.add_(0.3 * torch.randn(delta.offset.shape, generator=generator))
    ours = run(model, kind)
    folder = delta_model.save_peft(tmp_path / "export")
    with warnings.catch_warnings():  # PEFT's generic tuner warns that a norm is no linear layer: LN tuning's own case
        warnings.filterwarnings("ignore", "Unsupported layer type", UserWarning)
        peft_model = peft.PeftModel.from_pretrained(fresh(kind), folder).eval()
    assert (run(peft_model, kind) - ours).abs().max().item() <= 1e-5
    again = AutoDeltaModel.from_finetuned(folder, backbone_model=fresh(kind))
    assert (run(again.backbone_model, kind) - ours).abs().max().item() <= 1e-5


def _edit(folder, **fields):
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


@pytest.mark.parametrize(
    "fields, named",
    [
        ({"modules_to_save": ["classifier"]}, "modules_to_save"),
        ({"some_future_option": 3}, "some_future_option"),
        ({"target_modules": ["attention"]}, "tunes layer norms only"),
        ({"target_modules": ["nothing_here"]}, "matches no module"),
        ({"target_modules": ["attention.output.LayerNorm"]}, "which its target_modules do not name"),
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


def test_a_norm_without_parameters_is_not_exported(tmp_path):
    model = tiny_model("olmo")
    delta_model = LNTuningModel(model)
    assert any(t.parameter is None for t in delta_model.targets)
    with pytest.raises(CheckpointError, match="without parameters"):
        delta_model.save_peft(tmp_path / "export")
    assert not (tmp_path / "export").exists()


def test_a_merged_model_is_not_exported(tmp_path):
    delta_model = LNTuningModel(fresh("bert"))
    delta_model.merge()
    with pytest.raises(CheckpointError, match="unmerge"):
        delta_model.save_peft(tmp_path / "export")
