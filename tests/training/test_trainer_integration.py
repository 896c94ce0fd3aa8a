"""A delta model trains with the transformers ``Trainer`` unchanged; checkpoints hold only the delta; resume is exact.

Real ``Trainer`` runs (CPU, a few steps) on a tiny BERT classifier. Checked under transformers 4.57 and 5.x alike.
"""

import dataclasses

import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer, TrainingArguments

from opendelta import AutoDeltaModel, DeltaStateError, get_method
from opendelta.integrations import DeltaTrainerCallback
from opendelta.testing import tiny_inputs, tiny_model

ROWS = 16
CHECKPOINTING = (
    "activation_checkpointing"  # transformers 5 renamed gradient_checkpointing (the old name warns)
    if "activation_checkpointing" in {f.name for f in dataclasses.fields(TrainingArguments)}
    else "gradient_checkpointing"
)


class _Rows(torch.utils.data.Dataset):
    def __len__(self):
        return ROWS

    def __getitem__(self, i):
        gen = torch.Generator().manual_seed(i)
        ids = torch.randint(4, 99, (8,), generator=gen)
        return {"input_ids": ids, "labels": torch.randint(0, 3, (), generator=gen)}


def _args(out, **overrides):
    settings = {
        "output_dir": str(out),
        "use_cpu": True,
        "report_to": [],
        "max_steps": 4,
        "save_steps": 2,
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-2,
        "disable_tqdm": True,
        "logging_strategy": "no",
        "seed": 3,
    }
    return TrainingArguments(**{**settings, **overrides})


def _build(method="lora", seed=0):
    model = tiny_model("bert")
    torch.manual_seed(seed)
    delta = get_method(method).model_cls(model)
    delta.freeze_module(exclude=["deltas", "classifier"])
    return model, delta


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", ["lora", "prefix", "compacter"])
def test_checkpoints_hold_only_the_delta_and_load_as_a_delta(tmp_path, method):
    model, delta = _build(method)
    callback = DeltaTrainerCallback(delta)
    Trainer(model=model, args=_args(tmp_path, max_steps=2), train_dataset=_Rows(), callbacks=[callback]).train()
    checkpoint = tmp_path / "checkpoint-2"

    saved = set(load_file(str(checkpoint / "model.safetensors")))
    assert saved == _trainable(model)  # the delta and the classifier, no frozen backbone tensor
    assert any(name.startswith("classifier.") for name in saved) and len(saved) > 2

    fresh = tiny_model("bert")  # the OpenDelta copy loads on a fresh backbone, its hash checked
    AutoDeltaModel.from_finetuned(checkpoint / "delta", fresh)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(**tiny_inputs("bert")).logits, model(**tiny_inputs("bert")).logits)


@pytest.mark.parametrize(
    "method, callback",
    [("lora", False), ("prefix", True)],
    ids=["lora-plain-trainer", "prefix-with-callback"],
)
def test_resume_restores_delta_head_and_optimizer_exactly(tmp_path, method, callback):
    """Plain Trainer (LoRA): freeze_module(set_state_dict=True) alone makes checkpoints delta-only and resume exact.

    Prefix tuning shares its reparameterization network between layers, which the Trainer can only save through
    the callback (see test_shared_delta_parameters_need_the_callback).
    """

    def callbacks(delta):
        return [DeltaTrainerCallback(delta)] if callback else []

    model, delta = _build(method, seed=0)
    Trainer(model=model, args=_args(tmp_path / "a"), train_dataset=_Rows(), callbacks=callbacks(delta)).train()
    final = {k: v.clone() for k, v in model.state_dict().items()}
    checkpoint = tmp_path / "a" / "checkpoint-2"
    halfway = load_file(str(checkpoint / "model.safetensors"))
    optimizer = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert len(optimizer["state"]) == len(_trainable(model))  # moments only for the delta and the head

    resumed, resumed_delta = _build(method, seed=123)  # its delta starts elsewhere: only the checkpoint can fix it
    untouched = resumed.bert.encoder.layer[0].attention.self.query.weight.clone()
    args = _args(tmp_path / "b")
    trainer = Trainer(model=resumed, args=args, train_dataset=_Rows(), callbacks=callbacks(resumed_delta))
    trainer.train(resume_from_checkpoint=str(checkpoint))

    got = resumed.state_dict()
    assert set(got) == set(final) == set(halfway) == _trainable(model)
    for name in final:
        assert torch.equal(got[name], final[name]), name
    assert any(not torch.equal(final[n], halfway[n]) for n in final), "steps 3-4 must have changed the weights"
    assert torch.equal(resumed.bert.encoder.layer[0].attention.self.query.weight, untouched)


def test_shared_delta_parameters_need_the_callback(tmp_path):
    """Why the callback drops aliases: transformers refuses to save a parameter listed under two names."""
    model, _ = _build("prefix")
    shared = {n for n, _ in model.named_parameters(remove_duplicate=False)} - set(dict(model.named_parameters()))
    assert shared, "prefix tuning shares its reparameterization between layers"
    with pytest.raises(RuntimeError, match="shared tensors"):
        Trainer(model=model, args=_args(tmp_path, max_steps=2), train_dataset=_Rows()).train()


def test_gradient_checkpointing_trains_the_delta_like_without(tmp_path):
    """Reentrant checkpointing (4.57's default) with the callback: same weights as without checkpointing."""
    runs = {}
    for name, extra in {"plain": {}, "checkpointed": {CHECKPOINTING: True}}.items():
        if extra:
            extra[f"{CHECKPOINTING}_kwargs"] = {"use_reentrant": True}
        model, delta = _build(seed=1)
        start = {k: v.clone() for k, v in delta.delta_state_dict().items()}
        args = _args(tmp_path / name, max_steps=3, save_strategy="no", **extra)
        Trainer(model=model, args=args, train_dataset=_Rows(), callbacks=[DeltaTrainerCallback(delta)]).train()
        runs[name] = (start, delta.delta_state_dict())
    (start, plain), (_, checkpointed) = runs["plain"], runs["checkpointed"]
    for name in plain:
        assert not torch.equal(plain[name], start[name]), f"{name} did not train"
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)


def test_callback_refuses_a_model_with_nothing_frozen(tmp_path):
    model = tiny_model("bert")
    delta = get_method("lora").model_cls(model)  # freeze_module forgotten
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=_Rows(), callbacks=[DeltaTrainerCallback(delta)])
    with pytest.raises(DeltaStateError, match=r"freeze_module\(exclude=\['deltas'"):
        trainer.train()


def test_callback_refuses_a_delta_model_of_another_model(tmp_path):
    model, _ = _build()
    _, other = _build()
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=_Rows(), callbacks=[DeltaTrainerCallback(other)])
    with pytest.raises(DeltaStateError, match="does not contain it"):
        trainer.train()


def test_callback_arguments_are_checked():
    model, delta = _build()
    with pytest.raises(TypeError, match="needs the delta model"):
        DeltaTrainerCallback(model)
    with pytest.raises(ValueError, match="plain folder name"):
        DeltaTrainerCallback(delta, subfolder="a/b")
