"""Real LoRA, merged, then saved (issue 12, item 2): refused when the merged weights would be saved, else loads once."""

import pytest
import torch

from opendelta import BackboneMismatchError, DeltaStateError
from opendelta.testing import model_output_tensor, perturb, tiny_inputs, tiny_model
from opendelta_lora import LoraModel


def run(model, arch):
    model.eval()
    with torch.no_grad():
        return model_output_tensor(model(**tiny_inputs(arch)))


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_merged_lora_with_an_unfrozen_backbone_is_refused_and_unmerge_is_the_fix(tmp_path, arch):
    model = tiny_model(arch)
    delta_model = LoraModel(backbone_model=model, lora_r=4)  # freeze_module() forgotten: W requires grad
    perturb(delta_model, scale=0.2)
    expected = run(model, arch)
    delta_model.merge()
    with pytest.raises(DeltaStateError, match=r"twice.*unmerge\(\)"):
        delta_model.save_finetuned(tmp_path / "merged")
    assert not (tmp_path / "merged").exists() or not any((tmp_path / "merged").iterdir())
    delta_model.unmerge()
    with pytest.warns(UserWarning, match="trainable backbone parameters"):
        delta_model.save_finetuned(tmp_path / "unmerged")
    fresh = tiny_model(arch)
    LoraModel.from_finetuned(tmp_path / "unmerged", fresh)
    torch.testing.assert_close(run(fresh, arch), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_merged_lora_with_a_frozen_backbone_saves_and_loads_once_on_its_own_backbone(tmp_path, arch):
    model = tiny_model(arch)
    delta_model = LoraModel(backbone_model=model, lora_r=4)
    delta_model.freeze_module()
    perturb(delta_model, scale=0.2)
    expected = run(model, arch)
    delta_model.merge()
    delta_model.save_finetuned(tmp_path / "ckpt")
    fresh = tiny_model(arch)
    LoraModel.from_finetuned(tmp_path / "ckpt", fresh)  # the pre-merge hash: its own backbone, not "another"
    torch.testing.assert_close(run(fresh, arch), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(BackboneMismatchError):  # another backbone is still refused
        LoraModel.from_finetuned(tmp_path / "ckpt", tiny_model(arch, seed=1))
    delta_model.merge_and_unload()
    with pytest.raises(DeltaStateError, match="merge_and_unload"):
        delta_model.save_finetuned(tmp_path / "ckpt")
