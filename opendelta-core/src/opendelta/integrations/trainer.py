"""``DeltaTrainerCallback``: the transformers ``Trainer`` trains a delta model, and its checkpoints hold only the delta.

The ``Trainer`` needs no change to train a delta model: after ``delta_model.freeze_module(exclude=["deltas",
...])`` its optimizer sees only the trainable tensors, its ``checkpoint-N/model.safetensors`` holds only what
``model.state_dict()`` returns (the delta and the listed head, thanks to ``set_state_dict=True``), and
``train(resume_from_checkpoint=...)`` loads that file non-strictly, so the frozen backbone keeps the weights it was
built with while the delta, optimizer, scheduler and RNG states are restored exactly.

This callback makes that the checked default instead of a convention:

* at the start of training it refuses a model in which nothing is frozen (the checkpoints would hold the whole
  backbone), checks that the delta model belongs to the model being trained, and makes ``state_dict()`` keep only
  trainable tensors, each under one name: a delta that shares a parameter between layers (prefix tuning, Compacter)
  otherwise fails at the first save (see :mod:`opendelta.integrations.aliases`);
* with ``gradient_checkpointing=True`` it makes the frozen input embeddings' output require grad, without which
  transformers 4.57's reentrant checkpointing silently trains no delta inside the layers (see
  :mod:`opendelta.integrations.checkpointing`);
* at every save it also writes an OpenDelta checkpoint to ``checkpoint-N/<subfolder>`` (rank 0 only), loadable
  with ``AutoDeltaModel.from_finetuned`` and checked against the backbone's hash.

Importing this module imports ``transformers``' trainer callbacks (not ``Trainer`` itself, nor accelerate).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from opendelta.errors import DeltaStateError
from opendelta.freezing import trainable_only_state_dict
from opendelta.integrations.aliases import first_names_only
from opendelta.integrations.checkpointing import checkpointing_enabled, ensure_input_grads
from opendelta.integrations.distributed import save_finetuned_distributed

if TYPE_CHECKING:
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from opendelta.base import DeltaModel

__all__ = ["DELTA_SUBFOLDER", "DeltaTrainerCallback"]

DELTA_SUBFOLDER = "delta"
"""Where, inside each ``checkpoint-N`` folder, the callback writes the OpenDelta checkpoint."""


class DeltaTrainerCallback(TrainerCallback):
    """Keeps ``Trainer`` checkpoints delta-only and adds an OpenDelta checkpoint to each one.

    Args:
        delta_model: the delta model attached to (a submodule of) the model the ``Trainer`` trains.
        save_delta: write ``delta_model.save_finetuned`` into every ``checkpoint-N/<subfolder>``.
        subfolder: the folder name inside ``checkpoint-N``.

    Example::

        delta_model.freeze_module(exclude=["deltas", "classifier"])
        trainer = Trainer(model=model, args=args, train_dataset=data,
                          callbacks=[DeltaTrainerCallback(delta_model)])
    """

    def __init__(self, delta_model: DeltaModel, save_delta: bool = True, subfolder: str = DELTA_SUBFOLDER) -> None:
        if not hasattr(delta_model, "backbone_model") or not hasattr(delta_model, "save_finetuned"):
            raise TypeError(
                f"DeltaTrainerCallback needs the delta model (e.g. LoraModel(model)), got {type(delta_model).__name__}"
            )
        if not subfolder or Path(subfolder).name != subfolder:
            raise ValueError(f"subfolder must be a plain folder name, got {subfolder!r}")
        self.delta_model = delta_model
        self.save_delta = save_delta
        self.subfolder = subfolder

    def _check_model(self, model: nn.Module) -> None:
        backbone = self.delta_model.backbone_model
        if not any(module is backbone for module in model.modules()):
            raise DeltaStateError(
                f"DeltaTrainerCallback was given a delta model attached to a {type(backbone).__name__}, but the "
                f"Trainer trains a {type(model).__name__} that does not contain it; pass the delta model built on "
                f"the model you give the Trainer"
            )
        if all(p.requires_grad for p in model.parameters()):
            raise DeltaStateError(
                f"every parameter of the {type(model).__name__} is trainable, so the Trainer would update and "
                f"checkpoint the whole backbone; call delta_model.freeze_module(exclude=['deltas', <task head>]) "
                f"before training"
            )

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        """Check the model, make its ``state_dict`` trainable-only and alias-free, fix reentrant checkpointing."""
        if model is None:
            return
        self._check_model(model)
        trainable_only_state_dict(model)
        first_names_only(model)
        if checkpointing_enabled(model) and hasattr(model, "enable_input_require_grads"):
            ensure_input_grads(model)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        """Write the OpenDelta checkpoint next to the Trainer's (every rank calls this; rank 0 writes)."""
        if self.save_delta:
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}" / self.subfolder
            save_finetuned_distributed(self.delta_model, folder)
