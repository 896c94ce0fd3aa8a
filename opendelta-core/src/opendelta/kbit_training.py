"""Preparing a quantized backbone for training deltas on it (QLoRA's recipe), as PEFT's helper of that name does.

``prepare_for_kbit_training(model)`` (also importable as ``prepare_model_for_kbit_training``, PEFT's name) does
what training on a 4-bit or 8-bit backbone needs before the delta model is built:

* freezes every backbone parameter (the quantized weights cannot train; the deltas added afterwards do);
* casts the float parameters kept in float16/bfloat16 (norms, embeddings, the head) to float32, which keeps the
  loss and the norm statistics stable at little memory cost (they are a small share of an LLM's parameters);
* with ``use_gradient_checkpointing=True`` (the default), turns on transformers' gradient checkpointing and makes
  the input embeddings' output require gradients, without which checkpointed blocks whose only trainable
  parameters are deltas would pass no gradient back (``enable_input_require_grads``);
* puts every quantized layer in a layout gradients flow through, for good (bitsandbytes repacks 4-bit weights for
  its CPU inference kernel, through which no gradient flows: see
  :meth:`opendelta.quantization.QuantizationBackend.training_layout`; building a delta model does this too).

It returns the same model. Nothing here is specific to one method: every delta method trains on the result.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from opendelta.quantization import quantized_modules

__all__ = ["prepare_for_kbit_training", "prepare_model_for_kbit_training"]


def prepare_for_kbit_training(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """Make a quantized transformers model (or any module) ready for training deltas on it; returns ``model``.

    Args:
        model: the backbone, typically loaded with ``quantization_config=BitsAndBytesConfig(load_in_4bit=True)``.
        use_gradient_checkpointing: recompute block activations in the backward pass (less memory, about a third
            more compute), as QLoRA does; needs a transformers model (``gradient_checkpointing_enable``).
        gradient_checkpointing_kwargs: passed to ``gradient_checkpointing_enable``; default
            ``{"use_reentrant": False}``, which passes gradients to deltas inside checkpointed blocks by itself.
    """
    for param in model.parameters():
        param.requires_grad_(False)
        if param.dtype in (torch.float16, torch.bfloat16) and type(param) is nn.Parameter:
            param.data = param.data.to(torch.float32)
    for _name, module, backend in quantized_modules(model):
        backend.training_layout(module)
    if use_gradient_checkpointing:
        enable = getattr(model, "gradient_checkpointing_enable", None)
        if enable is None:
            raise TypeError(
                f"{type(model).__name__} has no gradient_checkpointing_enable (not a transformers model): call "
                f"prepare_for_kbit_training(model, use_gradient_checkpointing=False)"
            )
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
        enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs or {"use_reentrant": False})
    return model


prepare_model_for_kbit_training = prepare_for_kbit_training
"""PEFT's name for :func:`prepare_for_kbit_training`, for code ported from PEFT."""
