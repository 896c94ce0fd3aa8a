"""The training-stack helpers in a single process: no process group, shared-parameter state dicts, lazy import."""

import copy
import pickle
import subprocess
import sys

import torch

from opendelta import AutoDeltaModel, get_method
from opendelta.integrations import (
    check_in_sync,
    first_names_only,
    full_delta_state_dict,
    is_main_process,
    save_finetuned_distributed,
)
from opendelta.testing import perturb, tiny_inputs, tiny_model


def _prefix_model():
    model = tiny_model("bert")
    delta = get_method("prefix").model_cls(model)
    perturb(delta)
    delta.freeze_module(exclude=["deltas", "classifier"])
    return model, delta


def test_without_a_process_group_the_helpers_are_plain_calls(tmp_path):
    model = tiny_model("bert")
    delta = get_method("lora").model_cls(model)
    perturb(delta)
    delta.freeze_module(exclude=["deltas", "classifier"])
    assert is_main_process()
    check_in_sync(delta)  # nothing to compare with
    tensors = full_delta_state_dict(delta)
    assert set(tensors) == set(delta.delta_state_dict()) | {"classifier.weight", "classifier.bias"}

    folder = save_finetuned_distributed(delta, tmp_path / "delta")
    fresh = tiny_model("bert")
    AutoDeltaModel.from_finetuned(folder, fresh)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(**tiny_inputs("bert")).logits, model(**tiny_inputs("bert")).logits)


def test_first_names_only_lists_each_shared_parameter_once_and_loads_back():
    model, _ = _prefix_model()
    every = [n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad]
    unique = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(model.state_dict()) == set(every) and len(every) > len(unique)  # prefix shares its reparameterization
    first_names_only(model)
    first_names_only(model)  # twice is harmless
    state = model.state_dict()
    assert set(state) == unique

    fresh, _ = _prefix_model()
    with torch.no_grad():
        for param in fresh.parameters():
            if param.requires_grad:
                param.zero_()
    result = fresh.load_state_dict(state, strict=False)
    assert not result.unexpected_keys
    for name, param in fresh.named_parameters(remove_duplicate=False):  # every alias got the shared value
        if param.requires_grad:
            assert torch.equal(param, dict(model.named_parameters(remove_duplicate=False))[name]), name

    first_names_only(model, enable=False)
    assert len(model.state_dict()) == len(every)


def test_first_names_only_survives_deepcopy_and_pickle():
    model, _ = _prefix_model()
    first_names_only(model)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert set(clone.state_dict()) == set(model.state_dict())


def test_importing_the_package_does_not_import_the_trainer():
    code = (
        "import sys, opendelta.integrations as i; "
        "assert 'transformers.trainer' not in sys.modules and 'transformers.trainer_callback' not in sys.modules; "
        "i.DeltaTrainerCallback; assert 'transformers.trainer_callback' in sys.modules; "
        "assert 'transformers.trainer' not in sys.modules"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
