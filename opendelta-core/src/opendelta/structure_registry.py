"""The common-structure lookup: every registered mapping by model type, and the resolvers for unmapped models.

Plugins layer, below the model layer: name-based addressing asks here what ``attn.q`` means on a backbone, without
loading the method classes (that is :mod:`opendelta.registry`). Filled by the ``register_common_structures`` hooks
of the installed plugins on first use (each on its own, see :func:`opendelta.plugins.call_each`); rebuilt after
``opendelta.registry.reload()``.

When two plugins map one model type, the shipped mappings (``opendelta-common-structures``) keep it, then the plugin
registered first.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from opendelta import plugins
from opendelta.errors import StructureNotFoundError, StructureValidationError
from opendelta.structures import CommonStructure, find_config_model

if TYPE_CHECKING:
    from torch import nn

__all__ = ["get_structure", "list_structures", "structure_for_model"]

_lock = threading.RLock()
_structures: dict[str, CommonStructure] | None = None
_built_at = -1
"""The :func:`opendelta.plugins.generation` ``_structures`` was built at."""
_failed_resolvers: set[str] = set()
"""Plugins whose ``resolve_common_structure`` raised or returned garbage: warned about once, then skipped."""


def _collect() -> dict[str, CommonStructure]:
    pending: list[tuple[bool, int, str, CommonStructure]] = []

    def make_register(plugin_name: str) -> Any:
        def register(document: dict[str, Any], *, source: str | None = None) -> None:
            where = f"{source} from plugin {plugin_name!r}" if source else f"from plugin {plugin_name!r}"
            try:
                structure = CommonStructure(document, source=where)
            except plugins.PLUGIN_ERRORS as exc:  # a schema violation, or a document jsonschema cannot even walk
                detail = str(exc) if isinstance(exc, StructureValidationError) else f"{type(exc).__name__}: {exc}"
                plugins.warn_plugin(plugin_name, f"registered an invalid mapping, which was ignored: {detail}")
                return
            shipped = plugins.owns(plugin_name, "common_structures")  # opendelta-common-structures, core's own
            pending.append((not shipped, len(pending), plugin_name, structure))

        return register

    plugins.call_each("register_common_structures", make_register)
    structures: dict[str, CommonStructure] = {}
    for _, _, plugin_name, structure in sorted(pending, key=lambda item: item[:2]):
        if structure.model_type in structures:
            plugins.warn_plugin(
                plugin_name,
                f"registered a mapping for {structure.model_type!r}, which is already registered "
                f"({structures[structure.model_type].source}); {structure.source} was ignored",
            )
            continue
        structures[structure.model_type] = structure
    return structures


def _ensure() -> dict[str, CommonStructure]:
    global _structures, _built_at
    with _lock:
        plugins.load_plugins()
        if _structures is None or _built_at != plugins.generation():
            _failed_resolvers.clear()
            _built_at = plugins.generation()
            _structures = _collect()
        return _structures


def list_structures() -> list[CommonStructure]:
    """Every registered common-structure mapping, sorted by model type."""
    return sorted(_ensure().values(), key=lambda s: s.model_type)


def get_structure(model_type: str) -> CommonStructure | None:
    """The registered mapping for ``model_type``, or ``None``."""
    return _ensure().get(model_type)


def structure_for_model(model: nn.Module) -> CommonStructure:
    """The mapping that names ``model``'s modules: a registered one, else the first a plugin resolves.

    Raises:
        StructureNotFoundError: nothing maps this model; the message says how to proceed without a mapping.
    """
    located = find_config_model(model)
    model_type = located[1].config.model_type if located else None
    structure = get_structure(model_type) if model_type else None
    if structure is not None:
        return structure
    owner = located[1] if located else model
    refusals: list[str] = []
    structure = _resolve(owner, model_type, model_type or type(model).__name__, refusals)
    if structure is not None:
        return structure
    known = ", ".join(s.model_type for s in list_structures()) or "none"
    why = "".join(f" {reason[0].upper()}{reason[1:]}." for reason in refusals)
    raise StructureNotFoundError(
        f"no common-structure mapping for {type(model).__name__} (model_type={model_type!r}); mapped model types: "
        f"{known}.{why} Pass modified_modules=[...] with real module names (list them with `opendelta show "
        f"<model folder>`, which reads no weights), or install a plugin that maps this architecture (a clone of "
        f"OpenDelta has one for StableLM in tests/third_party/opendelta-stablelm-structure)."
    )


def _resolve(model: nn.Module, model_type: str | None, what: str, refusals: list[str]) -> CommonStructure | None:
    """The first valid document a ``resolve_common_structure`` implementation returns, in pluggy's call order.

    Each implementation is called on its own: one that raises or returns something that is not a valid mapping
    is warned about once (naming its distribution) and skipped until the next ``reload()``; the next one is tried.
    One that refuses the model (:class:`StructureNotFoundError`) adds its reason to ``refusals``, for the message.
    """
    _ensure()
    kwargs = {"model": model, "model_type": model_type}
    impls = [i for i in plugins.pm.hook.resolve_common_structure.get_hookimpls() if not (i.hookwrapper or i.wrapper)]
    for impl in reversed(impls):  # pluggy calls the last registered (and tryfirst) first
        name = impl.plugin_name
        if name in _failed_resolvers:
            continue
        try:
            document = impl.function(**{arg: kwargs[arg] for arg in impl.argnames})
            if document is None:
                continue
            return CommonStructure(document, source=f"resolve_common_structure for {what} from plugin {name!r}")
        except StructureNotFoundError as exc:  # a resolver that looked at the model and refuses it, saying why
            refusals.append(str(exc).rstrip("."))
        except plugins.PLUGIN_ERRORS as exc:
            with _lock:
                _failed_resolvers.add(name)
            if isinstance(exc, StructureValidationError):
                problem = f"returned an invalid mapping from resolve_common_structure for {what}: {exc}"
            else:
                problem = f"raised inside resolve_common_structure for {what} ({type(exc).__name__}: {exc})"
            plugins.warn_plugin(name, f"{problem}; its resolver is skipped until opendelta.registry.reload()")
    return None
