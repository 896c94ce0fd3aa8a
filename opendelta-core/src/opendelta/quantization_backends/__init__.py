"""Core's quantization backends, registered through the public ``register_quantization_backends`` hook.

One small module per library: :mod:`.bitsandbytes` (LLM.int8 and nf4/fp4), :mod:`.torchao` (its int8 tensors, and
any torchao tensor for reading), :mod:`.quanto` (optimum-quanto's ``QLinear``) and :mod:`.hqq` (``HQQLinear``). None
of them imports its library: each is consulted only once the library is imported (a model holding its layers
means it is). A third-party library registers its own backend the same way, from its own package.
"""

from __future__ import annotations

from opendelta.hookspecs import RegisterQuantizationBackend, hookimpl
from opendelta.quantization_backends.bitsandbytes import Bnb4bitBackend, Bnb8bitBackend
from opendelta.quantization_backends.hqq import HqqBackend
from opendelta.quantization_backends.quanto import QuantoBackend
from opendelta.quantization_backends.torchao import TorchaoBackend

__all__ = ["Bnb4bitBackend", "Bnb8bitBackend", "HqqBackend", "QuantoBackend", "TorchaoBackend"]


@hookimpl
def register_quantization_backends(register: RegisterQuantizationBackend) -> None:
    """Core's backends, in the order they are asked."""
    for backend in (Bnb8bitBackend(), Bnb4bitBackend(), TorchaoBackend(), QuantoBackend(), HqqBackend()):
        register(backend)
