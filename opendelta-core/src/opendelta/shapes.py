"""The feature sizes of modules a delta is built for: read from the module itself, else measured.

Measuring is a pseudo forward pass (manual section 1.14.3), run only for modules whose type does not tell their
sizes, on inputs the caller passes (the delta model's ``dummy_inputs`` argument), the backbone's own or, inside a
user's wrapper, each transformers model's own; it leaves every module's train/eval mode as it found it.

GPT-2 and friends use transformers' ``Conv1D``, a linear layer whose weight is stored ``[in, out]``, transposed
relative to ``nn.Linear``'s ``[out, in]``; this module is the one place that knows it. Quantized linear layers
(bitsandbytes, torchao, quanto, HQQ) are linear layers too: their sizes, compute dtype and float weight come from
their quantization backend (:mod:`opendelta.quantization`), never from their packed storage.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from opendelta.errors import DeltaConfigError, DeltaStateError, ShapeInferenceError
from opendelta.fused_split import FusedSplit, equal_split
from opendelta.module_io import main_input, main_output
from opendelta.pseudo_inputs import config_pseudo_inputs
from opendelta.quantization import backend_of, quantized_layer_types

__all__ = [
    "DUMMY_INPUTS_EXAMPLE",
    "PseudoCall",
    "factory_kwargs",
    "fused_output_index",
    "is_linear",
    "is_norm",
    "known_features",
    "linear_features",
    "linear_types",
    "module_features",
    "probe_features",
    "pseudo_call",
    "stored_update",
    "weight_of",
]


_LINEAR_TYPES: tuple[type[nn.Module], ...] | None = None


def linear_types() -> tuple[type[nn.Module], ...]:
    """Module types that compute ``x @ W.T + b`` (``nn.Linear``) or ``x @ W + b`` (transformers' ``Conv1D``).

    Also the quantized linear layers that are not ``nn.Linear`` subclasses (HQQ's), of the quantization libraries
    imported so far. Read on first use, so importing this module does not import transformers (about a second).
    """
    global _LINEAR_TYPES
    if _LINEAR_TYPES is None:
        try:
            from transformers.pytorch_utils import Conv1D
        except ImportError:  # pragma: no cover - transformers is a dependency, but plain-torch use must not break
            _LINEAR_TYPES = (nn.Linear,)
        else:
            _LINEAR_TYPES = (nn.Linear, Conv1D)
    return _LINEAR_TYPES + quantized_layer_types()


def __getattr__(name: str) -> Any:
    """``LINEAR_TYPES``, the constant earlier releases had, computed on first access (see :func:`linear_types`)."""
    if name == "LINEAR_TYPES":
        return linear_types()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def is_linear(module: nn.Module) -> bool:
    """Whether ``module`` computes ``x @ W.T + b`` (``nn.Linear``) or ``x @ W + b`` (transformers' ``Conv1D``)."""
    return isinstance(module, linear_types())


def factory_kwargs(module: nn.Module) -> dict[str, Any]:
    """``{"device": ..., "dtype": ...}`` of ``module``'s first floating-point parameter or buffer.

    For building a delta that lives beside ``module``; empty when it has none (torch's defaults then apply). For a
    quantized linear layer, its device and compute dtype (never the int8 or packed storage dtype).
    """
    backend = backend_of(module)
    if backend is not None:
        return {"device": backend.device(module), "dtype": backend.compute_dtype(module)}
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.is_floating_point():
            return {"device": tensor.device, "dtype": tensor.dtype}
    return {}


def linear_features(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a linear-like module (a quantized one's, not its storage's)."""
    backend = backend_of(module)
    if backend is not None:
        return backend.features(module)
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, linear_types()):
        in_features, out_features = module.weight.shape  # Conv1D: [in, out]
        return int(in_features), int(out_features)
    raise TypeError(f"{type(module).__name__} is not a linear layer (nn.Linear or transformers' Conv1D)")


def weight_of(module: nn.Module) -> torch.Tensor:
    """The module's weight as ``[out, in]`` whatever its storage layout (a view, not a copy).

    A quantized layer's weight is dequantized: a new float tensor then (see :mod:`opendelta.quantization`).
    """
    backend = backend_of(module)
    if backend is not None:
        return backend.dequantize(module)
    weight: torch.Tensor = module.weight
    return weight if isinstance(module, nn.Linear) else weight.t()


def stored_update(module: nn.Module, update: torch.Tensor) -> torch.Tensor:
    """An ``[out, in]`` weight update in the layout ``module`` stores its weight in (what merging adds).

    Transposed for ``Conv1D`` (``[in, out]``), whatever the sizes (a square ``c_proj`` too); as given for
    ``nn.Linear`` and for quantized layers, whose update core folds in through their backend as ``[out, in]``.
    """
    if backend_of(module) is None and not isinstance(module, nn.Linear) and isinstance(module, linear_types()):
        return update.t()
    return update


def fused_output_index(
    out_features: int,
    parts: tuple[int, ...] | None,
    num_parts: int | None,
    device: torch.device | str | None = None,
    split: FusedSplit | None = None,
    where: str = "",
) -> torch.Tensor | None:
    """Indices of the output features of the selected parts of a fused module (``None``: all of them).

    Example: GPT-2's ``c_attn`` computes ``[q | k | v]``; parts ``(0, 2)`` of 3 select the q and v features.
    ``split`` is where the parts lie when not in equal contiguous slices (a target's ``split``: Phi-3's
    ``qkv_proj`` under grouped-query attention, GPT-NeoX's per-head interleaving; see :mod:`opendelta.fused_split`);
    pass it, or call :meth:`opendelta.targets.Target.output_index`, which does. ``where`` names the module in errors.

    Raises:
        ValueError: without ``split``, ``out_features`` does not divide into ``num_parts`` equal slices.
        UnsupportedTargetError: the ``split`` refuses slicing this module, or ``out_features`` does not fit it.
    """
    if parts is None or num_parts is None:
        return None
    if split is None:
        if out_features % num_parts:
            raise ValueError(f"{out_features} output features do not split into {num_parts} equal parts")
        split = equal_split(num_parts)
    return split.index(out_features, parts, device=device, where=where)


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
    if isinstance(module, linear_types()):
        return linear_features(module)
    if isinstance(module, nn.Embedding):
        return 0, module.embedding_dim
    if is_norm(module):
        size = int(module.weight.shape[-1])
        return size, size
    return None


PseudoCall = tuple[tuple[Any, ...], dict[str, Any]]
"""The positional and keyword arguments of one pseudo forward call."""

DUMMY_INPUTS_EXAMPLE = "{'input_ids': torch.tensor([[1, 2, 3]])}"
"""The advice our errors give: a constructor argument (transformers' ``dummy_inputs`` is a read-only property)."""


def pseudo_call(inputs: Any, source: str = "dummy_inputs") -> PseudoCall | None:
    """``inputs`` as the ``(args, kwargs)`` of a call; ``None`` (or an empty dict) means none given.

    A dict is keyword arguments, a tensor the one positional argument, a tuple or list the positional arguments.

    Raises:
        DeltaConfigError: ``inputs`` is something else; the message names ``source``, where it came from.
    """
    if inputs is None or (isinstance(inputs, dict) and not inputs):
        return None
    if isinstance(inputs, dict):
        return (), dict(inputs)
    if isinstance(inputs, torch.Tensor):
        return (inputs,), {}
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    raise DeltaConfigError(
        f"{source} must be a dict of keyword arguments, a tensor or a tuple of positional arguments of the model's "
        f"forward, got {type(inputs).__name__}; e.g. dummy_inputs={DUMMY_INPUTS_EXAMPLE}"
    )


def _own_dummy_inputs(module: nn.Module) -> PseudoCall | None:
    """The ``dummy_inputs`` a module carries (transformers' property, or an attribute set on a plain module)."""
    try:
        return pseudo_call(getattr(module, "dummy_inputs", None))
    except Exception:  # a property that fails, or a value of another kind: this module offers no inputs
        return None


def _model_calls(module: nn.Module) -> list[PseudoCall]:
    """The calls a module offers itself: pixels or audio features its config describes, then its ``dummy_inputs``."""
    from_config = config_pseudo_inputs(module, **factory_kwargs(module))
    return [c for c in (((), from_config) if from_config else None, _own_dummy_inputs(module)) if c is not None]


def _on_device(call: PseudoCall, module: nn.Module) -> PseudoCall:
    """The call's tensors on the device of ``module``'s weights (transformers builds ``dummy_inputs`` on the CPU)."""
    device = factory_kwargs(module).get("device")
    if device is None:
        return call

    def move(value: Any) -> Any:
        return value.to(device) if isinstance(value, torch.Tensor) else value

    args, kwargs = call
    return tuple(move(a) for a in args), {k: move(v) for k, v in kwargs.items()}


def _root_calls(model: nn.Module, dummy_inputs: PseudoCall | None) -> list[PseudoCall]:
    """The calls to try on the backbone itself: the caller's inputs alone, else its own, else token ids.

    Its own are pixels or audio features its config describes, then its ``dummy_inputs``. The token ids are those
    of the original's manual (section 1.14.3), also as ``decoder_input_ids`` for a forward that takes them.
    """
    if dummy_inputs is not None:
        return [dummy_inputs]
    ids = torch.tensor([[0, 0, 0]])
    calls = [c for c in (*_model_calls(model), ((ids,), {})) if c is not None]
    try:
        takes_decoder_ids = "decoder_input_ids" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # a forward without a readable signature
        takes_decoder_ids = False
    if takes_decoder_ids:
        calls.append(((), {"input_ids": ids, "decoder_input_ids": ids}))
    return calls


class _Recorder:
    """Forward hooks that note the sizes of the wanted modules in every pass run while they are registered."""

    def __init__(self, modules: Sequence[nn.Module]) -> None:

        self.seen: dict[int, tuple[int, int]] = {}
        self.unusable: dict[int, DeltaStateError] = {}
        self._wanted = {id(m) for m in modules}
        self._handles = [m.register_forward_hook(self._record, with_kwargs=True) for m in modules]

    def _record(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:

        if id(module) in self._wanted and id(module) not in self.seen:
            try:
                hidden_in = main_input(module, args, kwargs)[1]
                self.seen[id(module)] = (
                    int(hidden_in.shape[-1]) if hidden_in.is_floating_point() else 0,  # token ids: no width
                    int(main_output(module, output).shape[-1]),
                )
            except DeltaStateError as exc:  # the pass is fine; this module's call has no hidden state to size
                self.unusable.setdefault(id(module), exc)

    def missing(self, modules: Iterable[nn.Module]) -> list[nn.Module]:
        return [m for m in modules if id(m) not in self.seen]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _try(module: nn.Module, calls: Sequence[PseudoCall], label: str, errors: list[str]) -> None:
    """Run ``module`` on the first of ``calls`` that works, noting why the others failed."""
    for args, kwargs in calls:
        args, kwargs = _on_device((args, kwargs), module)
        try:
            with torch.no_grad():
                module(*args, **kwargs)
            return
        except Exception as exc:
            errors.append(f"{label}: {type(exc).__name__}: {exc}")


def probe_features(
    model: nn.Module,
    modules: Sequence[nn.Module],
    dummy_inputs: PseudoCall | None = None,
    method: str = "DeltaModel",
) -> dict[int, tuple[int, int]]:
    """``(in_features, out_features)`` of ``modules`` measured by pseudo forward passes, in eval mode.

    Used only for modules whose type does not tell their sizes. The backbone runs on ``dummy_inputs`` (the delta
    model's constructor argument, see :func:`pseudo_call`) when given, else on its own ``dummy_inputs`` (most
    transformers models have it; on a plain module the attribute can be set), else on token ids ``[[0, 0, 0]]``.
    Modules this pass does not reach (a user's wrapper whose forward needs other arguments, or has none) are sized
    by running each sub-model of the backbone that holds some of them and has ``dummy_inputs`` of its own (a
    transformers model inside the wrapper) on those, outermost first, as OpenDelta 0.3.2 did.

    Every module's ``training`` flag is as it was afterwards, whatever mix of train and eval the tree was in.

    Returns:
        ``{id(module): (last dim of its hidden-state input, last dim of its hidden-state output)}``; the input
        width is 0 when the module reads integer ids (an embeddings block), as for ``nn.Embedding``.

    Raises:
        ShapeInferenceError: the passes failed, or did not reach some module; the message says why and names the
            ``dummy_inputs`` argument of ``method``, the delta model class being built.
        DeltaStateError: a module was reached but takes or returns no hidden-state tensor.
    """
    recorder = _Recorder(modules)
    errors: list[str] = []
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        _try(model, _root_calls(model, dummy_inputs), type(model).__name__, errors)
        for name, sub in model.named_modules():
            pending = recorder.missing(modules)
            if not pending:
                break
            calls = _model_calls(sub) if sub is not model else []
            if calls and not {id(p) for p in pending}.isdisjoint(map(id, sub.modules())):
                _try(sub, calls, f"{name} ({type(sub).__name__})", errors)
    finally:
        recorder.remove()
        for module, training in modes:
            module.training = training
    unusable = [exc for key, exc in recorder.unusable.items() if key not in recorder.seen]
    if unusable:
        raise unusable[0]
    missing = recorder.missing(modules)
    if missing:
        why = "; ".join(errors) or "the pass did not reach them"
        raise ShapeInferenceError(
            f"cannot tell the sizes of {', '.join(sorted({type(m).__name__ for m in missing}))}: their type does not "
            f"say, and a pseudo forward pass of {type(model).__name__} failed ({why[:500]}). Pass inputs on which the "
            f"backbone's forward runs: {method}(backbone_model, ..., dummy_inputs={DUMMY_INPUTS_EXAMPLE}) (a dict of "
            f"keyword arguments, or a tensor or a tuple of positional ones; also accepted by from_config and "
            f"from_finetuned). They are used for this pass only, never saved"
        )
    return recorder.seen


def module_features(
    model: nn.Module,
    modules: Sequence[nn.Module],
    dummy_inputs: PseudoCall | None = None,
    method: str = "DeltaModel",
) -> list[tuple[int, int]]:
    """``(in_features, out_features)`` of each module: from its type when possible, else a pseudo forward pass.

    ``dummy_inputs``: the arguments of that pass, as :func:`pseudo_call` returns them; ``method``: the delta model
    class being built, named in the error's advice (see :func:`probe_features`).
    """
    unknown = [m for m in modules if known_features(m) is None]
    probed = probe_features(model, unknown, dummy_inputs, method) if unknown else {}
    return [known_features(m) or probed[id(m)] for m in modules]
