"""AdaLoRA in transformers' Trainer: the callback allocates while the gradients are there; the regulariser is added."""

import pytest
import torch
from adalora_helpers import fresh, labelled

from opendelta_adalora import AdaLoraCallback, AdaLoraModel, AdaLoraTrainer

transformers = pytest.importorskip("transformers")


class _Rows(torch.utils.data.Dataset):
    def __init__(self, count):
        self.rows = []
        for seed in range(count):
            batch = labelled("bert", seed=seed)
            self.rows += [{k: v[i] for k, v in batch.items()} for i in range(2)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return self.rows[index]


def _args(tmp_path, steps):
    return transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=steps,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )


class _Spy(transformers.TrainerCallback):
    """Records, at each optimizer step, whether the delta's gradients are still there (the allocator needs them)."""

    def __init__(self, delta_model):
        self.delta_model, self.had_grads = delta_model, []

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.had_grads.append(all(p.grad is not None for p in self.delta_model.parameters()))


def test_a_trainer_with_the_callback_reduces_the_ranks_and_adds_the_regulariser(tmp_path):
    model = fresh("bert")
    delta_model = AdaLoraModel(model, init_r=4, target_r=1, tinit=1, tfinal=2, total_step=8)
    delta_model.freeze_module(exclude=["deltas", "classifier"], set_state_dict=False)
    spy = _Spy(delta_model)
    trainer = AdaLoraTrainer(
        model=model, delta_model=delta_model, args=_args(tmp_path, 8), train_dataset=_Rows(8), callbacks=[spy]
    )
    assert any(isinstance(c, AdaLoraCallback) for c in trainer.callback_handler.callbacks)
    model.train()
    inputs = {k: v for k, v in labelled("bert").items()}
    with torch.no_grad():
        plain = model(**inputs).loss
        assert trainer.compute_loss(model, inputs) == pytest.approx(
            (plain + delta_model.orthogonal_regularization()).item(), abs=1e-6
        )
    trainer.train()
    assert spy.had_grads == [True] * 8
    pattern = delta_model.config.rank_pattern
    layers = delta_model.adalora_layers()
    assert pattern is not None and set(pattern) == set(layers)
    assert sum(sum(flags) for flags in pattern.values()) == len(layers)  # from 4 per layer to 1 on average
    for name, layer in layers.items():
        assert (layer.lora_E.view(-1) != 0).tolist() == pattern[name]


def test_the_callback_takes_total_step_from_max_steps_when_unset(tmp_path):
    model = fresh("bert")
    delta_model = AdaLoraModel(model, init_r=3, target_r=1)
    delta_model.freeze_module(exclude=["deltas", "classifier"], set_state_dict=False)
    trainer = transformers.Trainer(
        model=model, args=_args(tmp_path, 4), train_dataset=_Rows(4), callbacks=[AdaLoraCallback(delta_model)]
    )
    trainer.train()
    assert delta_model.config.total_step == 4
    assert sum(sum(flags) for flags in delta_model.config.rank_pattern.values()) == 4
