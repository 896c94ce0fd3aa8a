"""AdaLoRA in a transformers ``Trainer``: a callback that allocates ranks, a Trainer that adds the regulariser.

Imported on first use (``from opendelta_adalora import AdaLoraCallback``), so the plugin needs no transformers.

Where the allocation runs: PEFT's ``update_and_allocate`` reads the gradients, so it must run after the optimizer
step and before ``zero_grad()``. transformers' Trainer calls ``on_optimizer_step`` exactly there (``on_step_end``
comes after ``model.zero_grad()``, when the gradients are gone), with ``state.global_step`` still the index of the
step being taken, counted from 0, as PEFT's training loops count it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from transformers import Trainer, TrainerCallback

if TYPE_CHECKING:
    import torch
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from opendelta_adalora.model import AdaLoraModel

__all__ = ["AdaLoraCallback", "AdaLoraTrainer"]


class AdaLoraCallback(TrainerCallback):  # type: ignore[misc]
    """Calls ``delta_model.update_and_allocate(state.global_step)`` after each optimizer step, gradients still there.

    Args:
        delta_model: the AdaLoRA delta model being trained. When its ``config.total_step`` is not set, the
            Trainer's ``max_steps`` is taken at the start of training.
    """

    def __init__(self, delta_model: AdaLoraModel) -> None:
        self.delta_model = delta_model

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.delta_model.config.total_step is None and state.max_steps > 0:
            self.delta_model.config.total_step = state.max_steps
            self.delta_model.config.validate()

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.delta_model.update_and_allocate(state.global_step)


class AdaLoraTrainer(Trainer):  # type: ignore[misc]
    """A ``Trainer`` with AdaLoRA: the orthogonality regulariser added to the training loss, and the allocation.

    ``AdaLoraTrainer(model=backbone, delta_model=delta_model, args=..., train_dataset=...)``: the loss is the
    model's plus ``delta_model.orthogonal_regularization()`` in training (PEFT's forward adds the same term to
    ``outputs.loss``), and an :class:`AdaLoraCallback` is added to the callbacks.
    """

    def __init__(self, *args: Any, delta_model: AdaLoraModel, **kwargs: Any) -> None:
        callbacks = list(kwargs.pop("callbacks", None) or [])
        if not any(isinstance(c, AdaLoraCallback) for c in callbacks):
            callbacks.append(AdaLoraCallback(delta_model))
        super().__init__(*args, callbacks=callbacks, **kwargs)
        self.delta_model = delta_model

    def compute_loss(self, model: Any, inputs: Any, return_outputs: bool = False, **kwargs: Any) -> Any:
        result = super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
        if not model.training:
            return result
        loss: torch.Tensor = result[0] if return_outputs else result
        loss = loss + self.delta_model.orthogonal_regularization().to(loss.device)
        return (loss, result[1]) if return_outputs else loss
