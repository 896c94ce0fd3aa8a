"""PEFT VeRA folders (``save_pretrained``) load through ``from_finetuned`` with PEFT's outputs, or are refused; and
``save_peft`` writes folders PEFT loads with ours."""

import json

import pytest
import torch
from vera_helpers import PEFT_TARGETS, R, fresh, max_error, peft_vera, run

from opendelta import AutoDeltaModel, CheckpointError
from opendelta.testing import Pristine, perturb
from opendelta_vera import VeraModel

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore:Specified to not (save|load) vera_A:UserWarning")  # PEFT's, on the seed

TOLERANCE = 1e-5


def saved(kind, tmp_path, *, save_projection=True, seed=3, key=0):
    peft_model = peft_vera(fresh(kind), kind, seed=seed, save_projection=save_projection, projection_prng_key=key)
    if save_projection:  # matrices no draw gives: loading them proves they were read, not drawn again
        with torch.no_grad():
            peft_model.base_model.vera_A["default"].mul_(-1.5)
    folder = tmp_path / f"peft-{kind}-{save_projection}"
    peft_model.save_pretrained(folder)
    return folder, run(peft_model, kind)


@pytest.mark.parametrize("save_projection", [True, False])
@pytest.mark.parametrize("kind", tuple(PEFT_TARGETS))
def test_a_peft_vera_folder_loads_with_peft_outputs(kind, save_projection, tmp_path):
    folder, expected = saved(kind, tmp_path, save_projection=save_projection, key=11)
    model = fresh(kind)
    delta_model = AutoDeltaModel.from_finetuned(folder, backbone_model=model)
    assert type(delta_model) is VeraModel
    config = delta_model.config
    assert (config.r, config.save_projection, config.projection_prng_key) == (R, save_projection, 11)
    assert max_error(run(model, kind), expected) <= TOLERANCE
    stored = [n for n in delta_model.delta_state_dict() if n.endswith(("vera_A", "vera_B"))]
    assert len(stored) == (2 if save_projection else 0)


def _edit(folder, **fields):
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, **fields}))


@pytest.mark.parametrize(
    "fields, named",
    [
        ({"modules_to_save": ["classifier"]}, "modules_to_save"),
        ({"bias": "all"}, "bias"),
        ({"layers_to_transform": [0]}, "layers_to_transform"),
        ({"some_future_option": 3}, "some_future_option"),
        ({"target_modules": "all-linear"}, "all-linear"),
        ({"target_modules": ["nothing_here"]}, "matches no module"),
        ({"target_modules": ["query", "value", "intermediate.dense", "output.dense", "key"]}, "missing"),
        ({"r": 4}, "shape mismatch"),
        ({"r": 0}, "r must be a positive"),
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


def test_a_folder_that_says_it_saved_the_matrices_but_has_none_is_refused(tmp_path):
    folder, _ = saved("bert", tmp_path, save_projection=False)
    _edit(folder, save_projection=True)
    with pytest.raises(CheckpointError, match="save_projection=True but holds no"):
        AutoDeltaModel.from_finetuned(folder, backbone_model=fresh("bert"))


@pytest.mark.parametrize("save_projection", [True, False])
@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_save_peft_writes_a_folder_peft_loads_with_our_outputs(kind, save_projection, tmp_path):
    model = fresh(kind)
    delta_model = VeraModel(model, r=R, save_projection=save_projection, projection_prng_key=5)  # gpt2: c_attn slices
    perturb(delta_model, scale=1.0)
    expected = run(model, kind)
    folder = delta_model.save_peft(tmp_path / "export")
    peft_model = peft.PeftModel.from_pretrained(fresh(kind), folder).eval()
    assert max_error(run(peft_model, kind), expected) <= TOLERANCE
    # and the folder reads back into ours, exactly
    again = fresh(kind)
    AutoDeltaModel.from_finetuned(folder, backbone_model=again)
    assert torch.equal(run(again, kind), expected)
