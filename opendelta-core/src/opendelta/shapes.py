"""Reading a module's feature sizes from the module itself, so no pseudo forward pass is needed.

GPT-2 and friends use transformers' ``Conv1D``, a linear layer whose weight is stored ``[in, out]``, transposed
relative to ``nn.Linear``'s ``[out, in]``; this module is the one place that knows it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    "LINEAR_TYPES",
    "factory_kwargs",
    "fused_output_index",
    "is_norm",
    "known_features",
    "linear_features",
    "module_features",
    "probe_features",
    "weight_of",
]


def _linear_types() -> tuple[type[nn.Module], ...]:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency, but plain-torch use must not break
        return (nn.Linear,)
    return (nn.Linear, Conv1D)


LINEAR_TYPES: tuple[type[nn.Module], ...] = _linear_types()
"""Module types that compute ``x @ W.T + b`` (``nn.Linear``) or ``x @ W + b`` (``Conv1D``)."""


def factory_kwargs(module: nn.Module) -> dict[str, Any]:
    """``{"device": ..., "dtype": ...}`` of ``module``'s first floating-point parameter or buffer.

    For building a delta that lives beside ``module``; empty when it has none (torch's defaults then apply).
    """
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.is_floating_point():
            return {"device": tensor.device, "dtype": tensor.dtype}
    return {}


def linear_features(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a linear-like module."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, LINEAR_TYPES):
        in_features, out_features = module.weight.shape  # Conv1D: [in, out]
        return int(in_features), int(out_features)
    raise TypeError(f"{type(module).__name__} is not a linear layer (nn.Linear or transformers' Conv1D)")


def weight_of(module: nn.Module) -> torch.Tensor:
    """The module's weight as ``[out, in]`` whatever its storage layout (a view, not a copy)."""
    weight: torch.Tensor = module.weight
    return weight if isinstance(module, nn.Linear) else weight.t()


def fused_output_index(
    out_features: int,
    parts: tuple[int, ...] | None,
    num_parts: int | None,
    device: torch.device | str | None = None,
) -> torch.Tensor | None:
    """Indices of the output features of the selected equal slices of a fused module (``None``: all of them).

    Example: GPT-2's ``c_attn`` computes ``[q | k | v]``; parts ``(0, 2)`` of 3 select the q and v features.
    """
    if parts is None or num_parts is None:
        return None
    if out_features % num_parts:
        raise ValueError(f"{out_features} output features do not split into {num_parts} equal parts")
    size = out_features // num_parts
    return torch.cat([torch.arange(p * size, (p + 1) * size, device=device) for p in parts])


def _norm_types() -> tuple[type[nn.Module], ...]:
    """LayerNorm-like modules: torch's, and transformers' RMS norms (T5LayerNorm...), recognised by their weight."""
    return (nn.LayerNorm, nn.RMSNorm) if hasattr(nn, "RMSNorm") else (nn.LayerNorm,)


def is_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a layer norm: torch's LayerNorm/RMSNorm or a transformers ``*LayerNorm``/``*RMSNorm``."""
    if isinstance(module, _norm_types()):
        return True
    name = type(module).__name__
    weight = getattr(module, "weight", None)
    return (name.endswith(("LayerNorm", "RMSNorm"))) and isinstance(weight, torch.Tensor) and weight.dim() == 1


def known_features(module: nn.Module) -> tuple[int, int] | None:
    """``(in_features, out_features)`` when the module's type tells them, else ``None``.

    Linear layers, ``Conv1D``, layer norms (in = out = normalised size) and embeddings (out = embedding size; the
    input is integer ids, reported as 0).
    """
    if isinstance(module, LINEAR_TYPES):
        return linear_features(module)
    if isinstance(module, nn.Embedding):
        return 0, module.embedding_dim
    if is_norm(module):
        size = int(module.weight.shape[-1])
        return size, size
    return None


def _dummy_inputs(model: nn.Module) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    dummy = getattr(model, "dummy_inputs", None)
    if isinstance(dummy, dict) and dummy:
        return (), dict(dummy)
    if isinstance(dummy, torch.Tensor):
        return (dummy,), {}
    return None


def probe_features(model: nn.Module, modules: Sequence[nn.Module]) -> dict[int, tuple[int, int]]:
    """``(in_features, out_features)`` of ``modules`` measured by one pseudo forward pass of ``model``.

    Used only for modules whose type does not tell their sizes. The pass uses ``model.dummy_inputs`` (most
    transformers models have it), else an integer tensor ``[[0, 0, 0]]`` like ``input_ids``.

    Returns:
        ``{id(module): (last dim of its hidden-state input, last dim of its hidden-state output)}``; the input
        width is 0 when the module reads integer ids (an embeddings block), as for ``nn.Embedding``.

    Raises:
        ShapeInferenceError: the pass failed, or did not reach some module; the message says how to set
            ``model.dummy_inputs`` (the original manual's FAQ 3).
        DeltaStateError: a module was reached but takes or returns no hidden-state tensor.
    """
    from opendelta.errors import DeltaStateError, ShapeInferenceError
    from opendelta.insertion import main_input, main_output

    seen: dict[int, tuple[int, int]] = {}
    wanted = {id(m) for m in modules}

    unusable: dict[int, DeltaStateError] = {}

    def record(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        if id(module) in wanted and id(module) not in seen:
            try:
                hidden_in = main_input(module, args, kwargs)[1]
                seen[id(module)] = (
                    int(hidden_in.shape[-1]) if hidden_in.is_floating_point() else 0,  # token ids: no width
                    int(main_output(module, output).shape[-1]),
                )
            except DeltaStateError as exc:  # the pass is fine; this module's call has no hidden state to size
                unusable.setdefault(id(module), exc)

    handles = [m.register_forward_hook(record, with_kwargs=True) for m in modules]
    attempts = [a for a in (_dummy_inputs(model), ((torch.tensor([[0, 0, 0]]),), {})) if a is not None]
    errors = []
    was_training = model.training
    model.eval()
    try:
        for args, kwargs in attempts:
            try:
                with torch.no_grad():
                    model(*args, **kwargs)
                break
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if unusable:
        raise next(iter(unusable.values()))
    missing = [m for m in modules if id(m) not in seen]
    if missing:
        why = "; ".join(errors) or "the pass did not reach them"
        raise ShapeInferenceError(
            f"cannot tell the sizes of {', '.join(sorted({type(m).__name__ for m in missing}))}: their type does not "
            f"say, and a pseudo forward pass of {type(model).__name__} failed ({why[:500]}). Set inputs that make "
            f"model(**dummy_inputs) run before creating the delta model: "
            f"setattr(model, 'dummy_inputs', {{'input_ids': torch.tensor([[1, 2, 3]])}})"
        )
    return seen


def module_features(model: nn.Module, modules: Sequence[nn.Module]) -> list[tuple[int, int]]:
    """``(in_features, out_features)`` of each module: from its type when possible, else one pseudo forward pass."""
    unknown = [m for m in modules if known_features(m) is None]
    probed = probe_features(model, unknown) if unknown else {}
    return [known_features(m) or probed[id(m)] for m in modules]
