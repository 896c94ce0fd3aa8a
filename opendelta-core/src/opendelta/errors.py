"""The exceptions and warnings OpenDelta raises.

Every error subclasses :class:`OpenDeltaError` *and* the builtin it refines (``KeyError``, ``LookupError``,
``ValueError``...), so ``except`` clauses written for the builtins keep working. Messages say what failed, where,
and what to try next.
"""

from __future__ import annotations

from pluggy import PluginValidationError

__all__ = [
    "AddressingError",
    "BackboneMismatchError",
    "BackboneUnverifiedError",
    "CheckpointError",
    "DeltaClassError",
    "DeltaConfigError",
    "DeltaMethodNotInstalledError",
    "DeltaStateError",
    "HubError",
    "ModuleNotFoundInStructureError",
    "OpenDeltaAddressingWarning",
    "OpenDeltaCompatibilityWarning",
    "OpenDeltaConfigWarning",
    "OpenDeltaError",
    "OpenDeltaPluginWarning",
    "OpenDeltaQuantizationWarning",
    "OpenDeltaVersionWarning",
    "PluginValidationError",
    "ResourceLimitError",
    "ShapeInferenceError",
    "StructureNotFoundError",
    "StructureValidationError",
    "UnknownArgumentError",
    "UnknownDeltaMethodError",
    "UnsupportedTargetError",
]


class OpenDeltaError(Exception):
    """Base class of every error raised by OpenDelta."""

    def __str__(self) -> str:  # KeyError would otherwise print the message with quotes around it
        return str(self.args[0]) if self.args else ""


class UnknownDeltaMethodError(OpenDeltaError, KeyError):
    """A ``delta_type`` that no installed plugin registers."""


class DeltaMethodNotInstalledError(OpenDeltaError, ImportError):
    """``from opendelta import XxxModel`` for a method whose plugin distribution is not installed."""


class AddressingError(OpenDeltaError, LookupError):
    """A list of module patterns that is invalid (bad regex, empty) or cannot be applied."""


class ModuleNotFoundInStructureError(AddressingError):
    """A list of module patterns that matches no module of the backbone."""


class UnsupportedTargetError(AddressingError, TypeError):
    """Patterns matched modules that the delta method cannot modify (wrong layer type, fused module...)."""


class ShapeInferenceError(OpenDeltaError, RuntimeError):
    """The sizes a delta needs could not be read from the module's type nor measured by a pseudo forward pass."""


class StructureValidationError(OpenDeltaError, ValueError):
    """A common-structure mapping that does not conform to the schema."""


class StructureNotFoundError(OpenDeltaError, LookupError):
    """No common-structure mapping is registered for a backbone that needs one."""


class DeltaConfigError(OpenDeltaError, ValueError):
    """A delta configuration with a wrong, missing or unknown field."""


class DeltaClassError(DeltaConfigError, TypeError):
    """A delta method class that declares something invalid (an unknown ``insertion`` kind...).

    Raised when the class is defined, so a plugin's mistake shows at import, naming the class and the attribute,
    never at a user's call.
    """


class DeltaStateError(OpenDeltaError, RuntimeError):
    """An operation that does not fit the delta model's current state (attach twice, detach twice...)."""


class CheckpointError(OpenDeltaError, ValueError):
    """A delta checkpoint that is missing, incomplete, or does not fit the backbone."""


class BackboneMismatchError(CheckpointError):
    """A delta checkpoint saved for a different backbone than the one it is loaded into."""


class BackboneUnverifiedError(CheckpointError):
    """A delta checkpoint that records no backbone hash: refused unless the caller passes ``check_hash=False``."""


class UnknownArgumentError(DeltaConfigError, TypeError):
    """A call got a keyword argument it does not know (a typo); nothing was done.

    It is a ``TypeError`` too, as Python's own unexpected-keyword error is.
    """


class ResourceLimitError(DeltaConfigError, MemoryError):
    """A config that asks for more memory than the machine has (a rank of 10**9): refused before allocating."""


class HubError(OpenDeltaError, OSError):
    """Talking to the Hugging Face Hub failed (offline, no permission...); local files are intact."""


class OpenDeltaPluginWarning(UserWarning):
    """A plugin failed to load or register; core and the other plugins keep working."""


class OpenDeltaConfigWarning(UserWarning):
    """A config dict made in code held keys that are no field of the method; they were dropped.

    Such a dict is an argparse or dataclass namespace of a 0.3.2 pipeline (see ``DeltaConfig.from_dict``).
    """


class OpenDeltaVersionWarning(UserWarning):
    """A checkpoint written by a newer opendelta or plugin: its optional fields unknown here were ignored."""


class OpenDeltaServingWarning(UserWarning):
    """An exported adapter that PEFT loads but an inference server (vLLM, TGI) will refuse; the message says why."""


class OpenDeltaQuantizationWarning(UserWarning):
    """A merge into quantized weights requantized them (lossy); the message gives the relative error it introduced."""


class OpenDeltaAddressingWarning(UserWarning):
    """Some ``modified_modules`` entries matched no module while others did; the message names the unmatched ones."""


class OpenDeltaCompatibilityWarning(UserWarning):
    """An OpenDelta 0.3.2 argument that cannot do what it did was accepted; the message says what to use instead.

    DeltaCenter's options of ``save_finetuned``, ``save_config=False``, ``save_function=torch.save``.
    """
