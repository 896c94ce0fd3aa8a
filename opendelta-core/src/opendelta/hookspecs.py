"""The plugin contract: every hook a plugin may implement.

A plugin is a module (or object) with functions decorated by :data:`hookimpl`, exposed through an entry point in
the ``opendelta`` group. Hooks may gain arguments in later versions but never lose or rename one, and pluggy lets
an implementation accept only the arguments it needs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from pluggy import HookimplMarker, HookspecMarker

if TYPE_CHECKING:
    from pathlib import Path

    from torch import nn

    from opendelta.base import DeltaConfig, DeltaModel
    from opendelta.checkpoint_record import CheckpointRecord

PROJECT_NAME = "opendelta"
hookspec = HookspecMarker(PROJECT_NAME)
hookimpl = HookimplMarker(PROJECT_NAME)


class RegisterDeltaMethod(Protocol):
    """The ``register`` callback handed to :func:`register_delta_methods`.

    ``register(ModelClass)`` (the name and the config class read from it; since 0.2), or the explicit form
    ``register(name, config_cls, model_cls)``.
    """

    def __call__(
        self,
        name: str | type[DeltaModel],
        config_cls: type[DeltaConfig] | None = None,
        model_cls: type[DeltaModel] | None = None,
        *,
        aliases: tuple[str, ...] = (),
    ) -> None: ...


class RegisterQuantizationBackend(Protocol):
    """The ``register`` callback handed to :func:`register_quantization_backends`."""

    def __call__(self, backend: Any) -> None: ...


class RegisterCommonStructure(Protocol):
    """The ``register`` callback handed to :func:`register_common_structures`."""

    def __call__(self, document: dict[str, Any], *, source: str | None = None) -> None: ...


@hookspec
def register_delta_methods(register: RegisterDeltaMethod) -> None:
    """Register delta-tuning methods.

    Call ``register(ModelClass, aliases=())`` once per method: its name is the ``delta_type`` its config class
    declares (written once, there), and its config is its ``config_class``. The explicit form
    ``register(name, config_cls, model_cls, aliases=())`` is the same with the three spelled out. ``name`` is the
    ``delta_type`` written into saved configs (``^[a-z][a-z0-9_]*$``) and must equal both classes' ``delta_type``;
    it is unique across all installed plugins: a clash is reported naming both plugins, and the distribution named
    after the method (``opendelta-lora`` for ``lora``) keeps it. Return values are ignored; an exception is reported
    as a warning naming the distribution, and the methods registered before it are kept.

    Args:
        register: the callback, bound to the calling plugin so that errors name it.

    .. versionadded:: 0.1
    """


@hookspec
def register_common_structures(register: RegisterCommonStructure) -> None:
    """Register common-structure mappings (JSON documents, see ``opendelta.structures.get_schema()``).

    Call ``register(document, source=...)`` once per architecture. Each document is validated against the schema
    shipped in core; an invalid one is refused with a warning naming ``source`` and the failing fields, and the
    other mappings still load. Return values are ignored.

    Args:
        register: the callback, bound to the calling plugin so that errors name it.

    .. versionadded:: 0.1
    """


@hookspec
def register_quantization_backends(register: RegisterQuantizationBackend) -> None:
    """Register the quantized linear layers of a quantization library (bitsandbytes, torchao, quanto, HQQ...).

    Call ``register(backend)`` with an instance of a :class:`~opendelta.quantization.QuantizationBackend` subclass:
    how to read such a layer's sizes and compute dtype, dequantize its weight, and whether and how to quantize a
    merged weight again. Every method that targets linear layers then works on those layers (deltas in the compute
    dtype, merging through the backend, the backbone hash on the quantized storage) with no change of its own.
    Core registers its backends through this hook too (:mod:`opendelta.quantization_backends`); backends are asked
    in registration order, core's first. Return values are ignored; an exception is reported as a warning naming
    the distribution.

    Args:
        register: the callback.

    .. versionadded:: 1.3
    """


@hookspec(firstresult=True)
def resolve_common_structure(model: nn.Module, model_type: str | None) -> dict[str, Any] | None:
    """Provide a mapping for a model that no registered mapping covers.

    Called only when no mapping is registered for ``model_type``. The first implementation that returns a
    document wins; return ``None`` to let the next plugin try. The document is validated like a registered one.
    An implementation that raises or returns an invalid document is reported once, naming its distribution, and
    skipped until ``opendelta.registry.reload()``; the next implementation is tried. One that looked at the model and
    must refuse it raises :class:`~opendelta.errors.StructureNotFoundError`: no warning, the next one is tried, and
    the reason joins the error the user gets if none maps it. Core's own inference
    (:mod:`opendelta.structure_inference`) runs last.

    Args:
        model: the backbone (or the part of it that carries the ``config``).
        model_type: ``model.config.model_type`` when the model has a config, else ``None``.

    Returns:
        A common-structure document, or ``None`` when this plugin does not know the model.

    .. versionadded:: 0.1
    """


@hookspec(firstresult=True)
def read_checkpoint(folder: Path, backbone: nn.Module, delta_cls: type[DeltaModel]) -> CheckpointRecord | None:
    """Read a checkpoint folder in another library's format (one without OpenDelta's ``config.json``).

    Called by ``from_finetuned`` for a local folder that holds no ``config.json``. Return ``None`` when the folder is
    not in your format; otherwise read and check its files and return a
    :class:`~opendelta.checkpoint_record.CheckpointRecord` (the method, its config, the tensors under
    ``delta_state_dict``'s names and backbone names): core builds the delta, checks every tensor against it and
    copies them, taking the delta out again on any error. Raise an :class:`~opendelta.errors.OpenDeltaError`
    (``CheckpointError``) to refuse a folder in your format that cannot be loaded faithfully, or that ``delta_cls``
    (the class ``from_finetuned`` was called on; ``DeltaModel`` for ``AutoDeltaModel``) cannot hold; any other
    exception is reported as a warning naming your distribution, and the next implementation is tried.
    ``opendelta-lora`` implements it for PEFT's LoRA adapter folders.

    Args:
        folder: the local folder.
        backbone: the model the delta goes onto (not changed by the reader).
        delta_cls: the class ``from_finetuned`` was called on.

    Returns:
        The record, or ``None``.

    .. versionadded:: 0.2
    """
