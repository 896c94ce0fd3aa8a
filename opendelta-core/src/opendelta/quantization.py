"""Quantized linear layers: one protocol that every quantization library implements once, for every delta method.

A quantized backbone (bitsandbytes 8-bit or 4-bit, torchao, optimum-quanto, HQQ...) keeps its linear weights in a
storage dtype (int8, packed uint8, a tensor subclass) that no delta can be built in, added to or hashed like a float
tensor. PEFT keeps one wrapper module per library; our deltas never replace the quantized module (they sit beside it
or after it), so what core needs of a quantized layer is small and the same for every method:

* its sizes (``in_features``, ``out_features``) and its *compute dtype*, the float dtype its output has and every
  delta beside it is built in (:func:`opendelta.shapes.factory_kwargs`, :func:`opendelta.shapes.linear_features`);
* its weight as a float ``[out, in]`` matrix, computed for one layer at a time (merging, shape probing);
* whether its weight can be written again (requantized) after a merge, and if not, why not, so that merging is
  refused by name before anything changes;
* what a requantization replaces, so that unmerging puts the very same storage back (bit-identical, not a lossy
  second round trip).

A :class:`QuantizationBackend` answers these for the layers of one library. Backends are registered through the
plugin hook ``register_quantization_backends`` (:mod:`opendelta.hookspecs`): core's own, for the libraries above,
are registered that way too (:mod:`opendelta.quantization_backends`), so a third-party library adds its layers from
its own package exactly as core does. A backend never imports its library: it looks at ``sys.modules``, since a
model holding that library's layers means the library is already imported.
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any, ClassVar

import torch
from torch import nn

from opendelta.errors import DeltaStateError

__all__ = [
    "QuantizationBackend",
    "backend_of",
    "compute_dtype_hint",
    "is_quantized",
    "quantization_backends",
    "quantized_layer_types",
    "quantized_modules",
    "reload_backends",
]


class QuantizationBackend:
    """What core asks of the quantized linear layers of one library; subclass it once per library (or layer kind).

    Override :meth:`handles`, :meth:`dequantize` and, where the library can quantize a float weight again,
    :meth:`requantize`. The defaults read ``in_features``/``out_features`` attributes, the dtype of the layer's
    float bias (else float32) as compute dtype, and treat the ``weight`` parameter as the whole quantized state.
    """

    name: ClassVar[str] = ""
    """Shown in messages and in the table of ``opendelta plugins`` (``"bitsandbytes nf4"``)."""
    package: ClassVar[str] = ""
    """The import name of the library (``"bitsandbytes"``): the backend is consulted only once it is imported."""

    # ------------------------------------------------------------------------------------------ recognising
    def available(self) -> bool:
        """Whether the library is imported (a model cannot hold its layers otherwise): the cheap first check."""
        import sys

        return not self.package or self.package in sys.modules

    def layer_types(self) -> tuple[type[nn.Module], ...]:
        """Module classes of this library's quantized linear layers that are not ``nn.Linear`` subclasses (HQQ's).

        Core adds them to :func:`opendelta.shapes.linear_types`, so methods that target linear layers by type accept
        them. Called only when :meth:`available`.
        """
        return ()

    def handles(self, module: nn.Module) -> bool:
        """Whether ``module`` is a quantized linear layer of this library (its weight in quantized form now)."""
        raise NotImplementedError(f"{type(self).__name__} must implement handles(module)")

    # ------------------------------------------------------------------------------------------ reading
    def features(self, module: nn.Module) -> tuple[int, int]:
        """``(in_features, out_features)`` of the layer as a linear map (not its packed storage's shape)."""
        return int(module.in_features), int(module.out_features)

    def compute_dtype(self, module: nn.Module) -> torch.dtype:
        """The float dtype the layer computes in, and that deltas beside it are created in.

        Default: its float bias's dtype; a layer without one computes in the dtype of its model's float parameters
        (:func:`compute_dtype_hint`, set while a delta model builds), else float32.
        """
        bias = getattr(module, "bias", None)
        if isinstance(bias, torch.Tensor) and bias.is_floating_point():
            return bias.dtype
        return _model_dtype.get() or torch.float32

    def device(self, module: nn.Module) -> torch.device:
        """Where the layer's tensors live."""
        for tensor in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
            return tensor.device
        return torch.device("cpu")

    def dequantize(self, module: nn.Module) -> torch.Tensor:
        """The weight as a new float ``[out, in]`` tensor in the compute dtype (one layer's worth of memory)."""
        raise NotImplementedError(f"{type(self).__name__} must implement dequantize(module)")

    def hash_tensors(self, module: nn.Module, name: str) -> list[torch.Tensor]:
        """What the backbone hash reads of the layer's parameter ``name``: its storage in a canonical layout.

        Default: the parameter itself. A library that re-lays its storage out on the fly (bitsandbytes repacks 4-bit
        weights for its CPU kernel at the first inference call) returns the canonical layout, so that the hash of a
        backbone does not depend on whether it has run yet.
        """
        return [module._parameters[name]]

    def training_layout(self, module: nn.Module) -> None:
        """Put the storage into a layout gradients flow through, and keep it there (default: nothing to do).

        bitsandbytes repacks a 4-bit weight for its CPU inference kernel at the first eval-mode call without
        gradients, and that kernel passes no gradient to its input: deltas before such a layer would get none.
        Called on every quantized layer of a backbone when a delta model is built on it, and by
        :func:`opendelta.kbit_training.prepare_for_kbit_training`.
        """

    # ------------------------------------------------------------------------------------------ writing
    def requantize_problem(self, module: nn.Module) -> str | None:
        """Why this layer's weight cannot be quantized again after a merge, or ``None`` when it can."""
        return f"{self.name or type(self).__name__} layers cannot be requantized by OpenDelta"

    def requantize(self, module: nn.Module, weight: torch.Tensor) -> None:
        """Quantize the float ``[out, in]`` ``weight`` into ``module``, replacing its quantized storage.

        Called only when :meth:`requantize_problem` returned ``None``. Replace the storage objects (a new
        parameter), never write into the old ones: :meth:`saved_state` holds them to undo the merge exactly.
        """
        raise DeltaStateError(self.requantize_problem(module) or "requantize() is not implemented")

    def saved_state(self, module: nn.Module) -> dict[str, Any]:
        """References to everything :meth:`requantize` replaces (default: the ``weight`` parameter object)."""
        return {"weight": module._parameters["weight"]}

    def restore(self, module: nn.Module, state: dict[str, Any]) -> None:
        """Put back what :meth:`saved_state` returned: the module is then bit for bit as it was."""
        module._parameters["weight"] = state["weight"]


_model_dtype: ContextVar[torch.dtype | None] = ContextVar("opendelta_model_dtype", default=None)


@contextlib.contextmanager
def compute_dtype_hint(model: nn.Module) -> Iterator[None]:
    """While deltas are built on ``model``: its quantized layers without a dtype of their own compute in this one.

    The most common dtype of the model's float parameters (its embeddings, norms and head stay unquantized), which is
    the dtype a bias-less int8 layer receives its inputs in and returns its outputs in. Entering also puts every
    quantized layer in its training layout (:meth:`QuantizationBackend.training_layout`): an inference call made
    before the delta model was built must not leave a layout no gradient flows through.
    """
    for _name, module, backend in quantized_modules(model):  # deltas are built to be trained: a layout that trains
        backend.training_layout(module)
    counts = Counter(p.dtype for p in model.parameters() if p.is_floating_point() and type(p) is nn.Parameter)
    token = _model_dtype.set(counts.most_common(1)[0][0] if counts else None)
    try:
        yield
    finally:
        _model_dtype.reset(token)


_lock = threading.Lock()
_backends: list[QuantizationBackend] | None = None
_generation: tuple[int, int] = (-1, -1)


def reload_backends() -> None:
    """Read the registered backends again on next use (after plugins were reset or installed)."""
    global _backends
    with _lock:
        _backends = None


def quantization_backends() -> list[QuantizationBackend]:
    """Every registered backend, core's own first; read from the ``register_quantization_backends`` hook once."""
    global _backends, _generation
    from opendelta import plugins

    plugins.load_plugins()
    key = (plugins.generation(), len(plugins.pm.get_plugins()))  # a plugin registered in code counts too
    with _lock:
        if _backends is not None and _generation == key:
            return _backends
        found: list[QuantizationBackend] = []

        def make_register(plugin_name: str) -> Any:
            def register(backend: QuantizationBackend) -> None:
                if not isinstance(backend, QuantizationBackend):
                    raise TypeError(f"register() takes a QuantizationBackend instance, got {type(backend).__name__}")
                found.append(backend)

            return register

        plugins.call_each("register_quantization_backends", make_register)
        _backends, _generation = found, key
        return found


def _live_backends() -> Iterator[QuantizationBackend]:
    return (b for b in quantization_backends() if b.available())


def backend_of(module: nn.Module) -> QuantizationBackend | None:
    """The backend that handles ``module``, or ``None`` for a plain (unquantized) module."""
    for backend in _live_backends():
        if backend.handles(module):
            return backend
    return None


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` is a quantized linear layer some registered backend handles."""
    return backend_of(module) is not None


def quantized_layer_types() -> tuple[type[nn.Module], ...]:
    """The layer classes registered backends add to the linear types (those that are not ``nn.Linear``)."""
    return tuple(t for b in _live_backends() for t in b.layer_types())


def quantized_modules(model: nn.Module) -> list[tuple[str, nn.Module, QuantizationBackend]]:
    """``(name, module, backend)`` of every quantized linear layer in ``model`` (empty at once when none is)."""
    backends = list(_live_backends())
    if not backends:
        return []
    found = []
    for name, module in model.named_modules():
        backend = next((b for b in backends if b.handles(module)), None)
        if backend is not None:
            found.append((name, module, backend))
    return found
