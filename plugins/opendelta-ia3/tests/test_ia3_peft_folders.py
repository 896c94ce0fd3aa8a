"""PEFT IA3 folders (``save_pretrained``) load through ``from_finetuned`` with PEFT's outputs, or are refused."""

import json

import pytest
import torch
from ia3_helpers import PEFT_TARGETS, fresh, peft_ia3, run

from opendelta import AutoDeltaModel, CheckpointError
from opendelta.testing import Pristine
from opendelta_ia3 import IA3Model

pytest.importorskip("peft")


def saved(kind, tmp_path, seed=3):
    peft_model = peft_ia3(fresh(kind), kind, seed=seed)
    folder = tmp_path / f"peft-{kind}"
    peft_model.save_pretrained(folder)
    return folder, run(peft_model, kind)


@pytest.mark.parametrize("kind", tuple(PEFT_TARGETS))
def test_a_peft_ia3_folder_loads_with_peft_outputs(kind, tmp_path):
    folder, expected = saved(kind, tmp_path)
    model = fresh(kind)
    delta_model = AutoDeltaModel.from_finetuned(folder, backbone_model=model)
    assert type(delta_model) is IA3Model
    feedforward = {t.name for t, i in delta_model.placements() if i.kind == "before"}
    assert feedforward and feedforward == set(delta_model.config.feedforward_modules)
    assert (run(model, kind) - expected).abs().max().item() <= 1e-5
    again = IA3Model.from_finetuned(folder, backbone_model=fresh(kind))
    assert torch.equal(again.deltas[0].ia3_l, delta_model.deltas[0].ia3_l)


def _edit(folder, **fields):
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, **fields}))


@pytest.mark.parametrize(
    "fields, named",
    [
        ({"modules_to_save": ["classifier"]}, "modules_to_save"),
        ({"some_future_option": 3}, "some_future_option"),
        ({"target_modules": "all-linear"}, "all-linear"),
        ({"feedforward_modules": ["key"]}, "ia3_l has shape"),  # the vectors say [out, 1]: not feed-forward ones
        ({"target_modules": ["nothing_here"]}, "matches no module"),
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


def _perturbed(delta_model, seed=5):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for delta in delta_model.deltas:
            delta.ia3_l.copy_(1 + 0.3 * torch.randn(delta.ia3_l.shape, generator=generator))
    return delta_model


@pytest.mark.parametrize("kind", tuple(PEFT_TARGETS))
def test_our_export_reads_back_in_peft_with_our_outputs(kind, tmp_path):
    """Our defaults (GPT-2: the k/v slices of the fused c_attn) exported; PEFT's own loader gives our outputs."""
    peft = pytest.importorskip("peft")
    model = fresh(kind)
    delta_model = _perturbed(IA3Model(model))
    ours = run(model, kind)
    folder = delta_model.save_peft(tmp_path / "export")
    peft_model = peft.PeftModel.from_pretrained(fresh(kind), folder).eval()
    assert (run(peft_model, kind) - ours).abs().max().item() <= 1e-5
    again = AutoDeltaModel.from_finetuned(folder, backbone_model=fresh(kind))
    assert (run(again.backbone_model, kind) - ours).abs().max().item() <= 1e-5


def test_a_merged_model_is_not_exported(tmp_path):
    delta_model = _perturbed(IA3Model(fresh("bert")))
    delta_model.merge()
    with pytest.raises(CheckpointError, match="unmerge"):
        delta_model.save_peft(tmp_path / "export")
    assert not (tmp_path / "export").exists()
