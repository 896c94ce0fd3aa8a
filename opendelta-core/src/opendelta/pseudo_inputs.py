"""Pseudo inputs for a model that reads images or audio, built from what its config says one call needs.

transformers' ``dummy_inputs`` are token ids for every model, ViT's and Whisper's included, so a pseudo forward pass
(sizing the modules whose type does not tell their widths) on such a model fails. Here the main inputs come from the
forward's parameters and the config instead:

* ``pixel_values``: one image of ``num_channels`` x ``image_size`` pixels (from the config, or its ``vision_config``:
  CLIP's);
* ``input_features``: one log-mel input of ``num_mel_bins`` channels and the one length a Whisper-style encoder
  accepts, ``max_source_positions`` times the total stride of its 1-d convolutions (its front end);
* with either, ``input_ids`` and ``decoder_input_ids`` where the forward takes them too (CLIP reads text and
  images in one call, Whisper decodes tokens).

Foundation layer: it reads configs and module trees only.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from torch import nn

__all__ = ["config_pseudo_inputs"]

_TOKENS = torch.tensor([[0, 0, 0]])
"""The token ids of the original's manual (section 1.14.3), as for a model that reads tokens only."""


def config_pseudo_inputs(
    model: nn.Module, device: torch.device | None = None, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor] | None:
    """Keyword arguments of one call of ``model`` that reads pixels or audio features; ``None`` for anything else.

    Args:
        model: a module with a transformers ``config`` (any other gives ``None``).
        device: where the inputs are made (the model's device).
        dtype: the floating-point type of the image or features (the model's).
    """
    config = getattr(model, "config", None)
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return None
    if config is None:
        return None
    call: dict[str, torch.Tensor] = {}
    if "pixel_values" in parameters and (shape := _image_shape(config)) is not None:
        call["pixel_values"] = torch.zeros(shape, device=device, dtype=dtype)
    if "input_features" in parameters and (shape := _features_shape(model, config)) is not None:
        call["input_features"] = torch.zeros(shape, device=device, dtype=dtype)
    if not call:
        return None
    for name in ("input_ids", "decoder_input_ids"):
        if name in parameters:
            call[name] = _TOKENS.to(device)
    return call


def _image_shape(config: Any) -> tuple[int, ...] | None:
    for source in (config, getattr(config, "vision_config", None)):
        size = getattr(source, "image_size", None)
        if isinstance(size, int):
            return 1, int(getattr(source, "num_channels", 3)), size, size
        if isinstance(size, (tuple, list)) and len(size) == 2:
            return 1, int(getattr(source, "num_channels", 3)), int(size[0]), int(size[1])
    return None


def _features_shape(model: nn.Module, config: Any) -> tuple[int, ...] | None:
    bins, positions = getattr(config, "num_mel_bins", None), getattr(config, "max_source_positions", None)
    if not (isinstance(bins, int) and isinstance(positions, int)):
        return None
    stride = math.prod(int(m.stride[0]) for m in model.modules() if isinstance(m, nn.Conv1d))
    return 1, bins, positions * stride
