"""``DeltaModel.load_weights``: another checkpoint copied into an existing delta in place, checked first."""

import pytest
import torch
from toy_method import Scale, ToyModel

from opendelta.errors import BackboneMismatchError, CheckpointError, DeltaStateError
from opendelta.hot_loading import LoadResult
from opendelta.plugin_api import LoadPlan
from opendelta.testing import model_output_tensor, perturb, tiny_inputs, tiny_model


def _run(model):
    with torch.no_grad():
        return model_output_tensor(model(**tiny_inputs("bert")))


def _trained(toy, tmp_path, seed=1, name="ckpt", backbone_seed=0, **config):
    """A toy delta trained on its own copy of tiny BERT (with a changed task head), saved; and its outputs."""
    model = tiny_model("bert", seed=backbone_seed)
    delta_model = toy(model, **config)
    perturb(delta_model, seed=seed)
    with torch.no_grad():
        model.classifier.bias.add_(0.5 * seed)
    delta_model.freeze_module(exclude=["deltas", "classifier"])
    return delta_model.save_finetuned(tmp_path / name), _run(model)


def _snapshot(delta_model):
    return {n: (t.data_ptr(), t.clone()) for n, t in delta_model.delta_state_dict().items()}


def _unchanged(delta_model, snapshot):
    now = delta_model.delta_state_dict()
    return set(now) == set(snapshot) and all(
        now[n].data_ptr() == ptr and torch.equal(now[n], value) for n, (ptr, value) in snapshot.items()
    )


def test_a_saved_folder_loads_in_place_with_its_task_head(toy, tmp_path):
    folder, expected = _trained(toy, tmp_path)
    model = tiny_model("bert")
    delta_model = toy(model)
    head = model.classifier.bias
    pointers = {n: t.data_ptr() for n, t in delta_model.delta_state_dict().items()}
    assert not torch.allclose(_run(model), expected)
    assert delta_model.load_weights(folder) == LoadResult([], [])
    assert torch.allclose(_run(model), expected, atol=1e-6)
    assert {n: t.data_ptr() for n, t in delta_model.delta_state_dict().items()} == pointers
    assert model.classifier.bias is head, "the head's parameter is the same object, its values the checkpoint's"


def test_tenants_switch_back_and_forth_and_the_last_one_is_what_runs(toy, tmp_path):
    first, first_out = _trained(toy, tmp_path, seed=1, name="a")
    second, second_out = _trained(toy, tmp_path, seed=2, name="b")
    model = tiny_model("bert")
    delta_model = toy(model)
    for folder, expected in [(first, first_out), (second, second_out), (first, first_out)]:
        delta_model.load_weights(folder)
        assert torch.allclose(_run(model), expected, atol=1e-6)


def test_a_state_dict_loads_and_a_detached_model_loads_too(toy):
    source = toy(tiny_model("bert"))
    perturb(source, seed=3)
    expected = _run(source.backbone_model)
    model = tiny_model("bert")
    delta_model = toy(model)
    delta_model.detach()
    delta_model.load_weights(source.delta_state_dict())
    assert torch.allclose(_run(model), _run(tiny_model("bert"))), "detached: still the bare model"
    delta_model.attach()
    assert torch.allclose(_run(model), expected, atol=1e-6)


def test_other_hyper_parameters_are_refused_by_name_and_nothing_changes(toy, tmp_path):
    folder, _ = _trained(toy, tmp_path, width=3)
    delta_model = toy(tiny_model("bert"))
    perturb(delta_model, seed=9)
    snapshot = _snapshot(delta_model)
    with pytest.raises(CheckpointError, match=r"width: checkpoint 3 vs this model 0.*build the delta model"):
        delta_model.load_weights(folder)
    assert _unchanged(delta_model, snapshot)


def test_another_backbone_is_refused_unless_check_hash_is_off(toy, tmp_path):
    folder, _ = _trained(toy, tmp_path, backbone_seed=1)
    model = tiny_model("bert")
    delta_model = toy(model)
    snapshot = _snapshot(delta_model)
    with pytest.raises(BackboneMismatchError):
        delta_model.load_weights(folder)
    assert _unchanged(delta_model, snapshot)
    with pytest.warns(UserWarning, match="trained on another backbone"):
        delta_model.load_weights(folder, check_hash=False)
    assert not _unchanged(delta_model, snapshot)


def test_other_tensor_names_are_refused_unless_not_strict(toy, tmp_path):
    folder, _ = _trained(toy, tmp_path, modified_modules=["attention.output.dense"])
    delta_model = toy(tiny_model("bert"))
    snapshot = _snapshot(delta_model)
    with pytest.raises(CheckpointError, match=r"missing \['bert\.encoder\.layer\.0\.output\.dense.*strict=False"):
        delta_model.load_weights(folder)
    assert _unchanged(delta_model, snapshot)
    result = delta_model.load_weights(folder, strict=False)
    assert result.missing_keys and not any("attention" in n for n in result.missing_keys)
    assert not result.unexpected_keys
    loaded = delta_model.delta_state_dict()
    assert all(torch.equal(loaded[n], snapshot[n][1]) for n in result.missing_keys), "missing ones keep their values"


def test_one_bad_tensor_refuses_the_whole_load(toy):
    delta_model = toy(tiny_model("bert"))
    snapshot = _snapshot(delta_model)
    state = {n: t + 1 for n, t in delta_model.delta_state_dict().items()}
    last = sorted(state)[-1]
    for bad, match in [(torch.zeros(3), r"shape \(3,\)"), (torch.full_like(state[last], float("nan")), "NaN")]:
        with pytest.raises(CheckpointError, match=match):
            delta_model.load_weights({**state, last: bad})
        assert _unchanged(delta_model, snapshot)


def test_a_path_that_is_no_folder_is_refused_with_the_fix(toy, tmp_path):
    delta_model = toy(tiny_model("bert"))
    with pytest.raises(CheckpointError, match=r"local folder.*snapshot_download"):
        delta_model.load_weights(tmp_path / "nowhere")


def test_the_loaded_checkpoint_is_tracked_against_double_loading(toy, tmp_path):
    first, _ = _trained(toy, tmp_path, seed=1, name="a")
    second, _ = _trained(toy, tmp_path, seed=2, name="b")
    model = tiny_model("bert")
    delta_model = ToyModel.from_finetuned(first, model)
    delta_model.load_weights(first)  # its own checkpoint again: replaced, not stacked
    delta_model.load_weights(second)
    with pytest.raises(DeltaStateError, match="already loaded"):
        ToyModel.from_finetuned(second, model)
    ToyModel.from_finetuned(first, model).detach()  # no longer held: loading it beside is the user's choice


class PaddedScale(Scale):
    """A toy delta whose vector may come smaller (zero-padded) and whose ``gain`` buffer its config sets."""

    def __init__(self, features, gain):
        super().__init__(features)
        self.register_buffer("gain", torch.tensor(gain), persistent=False)

    def forward(self, hidden):
        return hidden * (1 + self.s * self.gain)

    def load_plan(self, config):
        return LoadPlan(padded={"s": (0,)}, values={"gain": torch.tensor(float(config.width + 1))}, taken=("width",))


class PaddedToy(ToyModel):
    def _build_delta(self, target):
        return PaddedScale(self.features(target.module)[1], float(self.config.width + 1))


def test_a_load_plan_zero_pads_sets_buffers_and_takes_fields(toy):
    delta_model = PaddedToy(tiny_model("bert"))
    perturb(delta_model, seed=4)
    state = delta_model.delta_state_dict()
    small = {n: torch.ones(5) for n in state}
    delta_model.load_weights(small)
    for name, tensor in delta_model.delta_state_dict().items():
        assert torch.equal(tensor[:5], torch.ones(5)) and not tensor[5:].any(), name
    too_big = {n: torch.ones(t.numel() + 1) for n, t in state.items()}
    with pytest.raises(CheckpointError, match=r"may be smaller along dims \[0\]"):
        delta_model.load_weights(too_big)


def test_a_load_plan_takes_its_fields_from_a_folder(toy, tmp_path):
    source = PaddedToy(tiny_model("bert"), width=2)
    perturb(source, seed=5)
    source.freeze_module(exclude=["deltas"])
    folder = source.save_finetuned(tmp_path / "padded")
    model = tiny_model("bert")
    delta_model = PaddedToy(model)
    delta_model.load_weights(folder)
    assert delta_model.config.width == 2
    assert all(float(d.gain) == 3.0 for d in delta_model.deltas)
    assert torch.allclose(_run(model), _run(source.backbone_model), atol=1e-6)


def test_hot_loading_under_compile_makes_no_new_graph(toy, tmp_path):
    from torch._dynamo.testing import CompileCounter

    first, _ = _trained(toy, tmp_path, seed=1, name="a")
    second, second_out = _trained(toy, tmp_path, seed=2, name="b")
    torch._dynamo.reset()
    model = tiny_model("bert")
    delta_model = ToyModel.from_finetuned(first, model)
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    inputs = tiny_inputs("bert")
    with torch.no_grad():
        compiled(**inputs)
        graphs = counter.frame_count
        delta_model.load_weights(second)
        out = model_output_tensor(compiled(**inputs))
    assert graphs >= 1 and counter.frame_count == graphs
    assert torch.allclose(out, second_out, atol=1e-6)
