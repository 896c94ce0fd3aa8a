"""``load_weights`` for every installed method: a checkpoint of the same shapes loads in place, exactly."""

import pytest
import torch

from opendelta import CheckpointError, get_method, list_methods
from opendelta.testing import model_output_tensor, perturb, tiny_inputs, tiny_model


def run(model):
    with torch.no_grad():
        return model_output_tensor(model(**tiny_inputs("bert")))


def saved(name, folder, seed=1):
    """The method with its defaults on tiny BERT, trained (perturbed) and saved; its outputs."""
    model = tiny_model("bert")
    delta_model = get_method(name).model_cls(model)
    perturb(delta_model, seed=seed)
    delta_model.freeze_module(exclude=["deltas"])
    return delta_model.save_finetuned(folder), run(model)


@pytest.mark.parametrize("name", [spec.name for spec in list_methods()])
def test_every_method_hot_loads_a_checkpoint_in_place(name, tmp_path):
    folder, expected = saved(name, tmp_path / "ckpt")
    model = tiny_model("bert")
    delta_model = get_method(name).model_cls(model)
    own = delta_model.delta_state_dict()
    assert own, f"{name} has no tensors to load"
    pointers = {n: t.data_ptr() for n, t in own.items()}
    assert not torch.allclose(run(model), expected), "the checkpoint must change something to be seen loading"
    delta_model.load_weights(folder)
    assert torch.allclose(run(model), expected, atol=1e-5)
    assert {n: t.data_ptr() for n, t in delta_model.delta_state_dict().items()} == pointers


def test_another_methods_checkpoint_is_refused_by_name(tmp_path):
    names = {spec.name for spec in list_methods()}
    if not {"lora", "adapter"} <= names:
        pytest.skip("needs opendelta-lora and opendelta-adapter")
    folder, _ = saved("adapter", tmp_path / "adapter")
    delta_model = get_method("lora").model_cls(tiny_model("bert"))
    with pytest.raises(CheckpointError, match="'adapter' delta, not one for LoraModel"):
        delta_model.load_weights(folder)
