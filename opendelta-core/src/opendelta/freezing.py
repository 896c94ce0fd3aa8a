"""Freezing: which parameters train, and a ``state_dict`` that holds only those.

``freeze_module(exclude=["deltas", "classifier"])`` leaves trainable every delta parameter (the keyword
``"deltas"``) and every parameter under a module matched by the other patterns (name-based addressing rules, so
``"classifier"``, ``"bias"`` or ``"3.ffn.lin2"`` all work); everything else gets ``requires_grad=False``.

With ``set_state_dict=True`` the model's ``state_dict()`` keeps only parameters that require grad. This is a
``state_dict`` post-hook evaluated at each call, not a snapshot of names: freezing twice, or creating parameters
later, keeps it right.

Several delta models on one backbone: a delta model's ``freeze_module`` decides about its own deltas (``own``) and
never turns another delta model's parameters back on, so a parameter the user froze by hand on the first stays
frozen when the second freezes (see :func:`freeze_module`).
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping, Sequence
from typing import Any

from torch import nn

from opendelta.addressing import compile_patterns, is_excluded
from opendelta.file_patterns import source_of
from opendelta.markers import WRAPPED_ATTR, delta_parameter_names

__all__ = [
    "DELTAS_KEYWORD",
    "freeze_module",
    "freeze_outside",
    "has_trainable_only_state_dict",
    "own_parameters",
    "trainable_only_state_dict",
    "trainable_parameter_names",
]

DELTAS_KEYWORD = "deltas"
_STATE_DICT_HANDLE = "_opendelta_state_dict_handle"


def freeze_module(
    module: nn.Module,
    exclude: Sequence[str] | None = None,
    set_state_dict: bool = True,
    *,
    own: Collection[str] | None = None,
) -> None:
    """Freeze ``module``'s parameters except the delta ones and those matched by ``exclude``.

    The rule, parameter by parameter:

    * a backbone parameter matched by a pattern of ``exclude`` trains, any other is frozen;
    * a delta parameter ``"deltas"`` covers trains: every delta parameter, or with ``own`` only those named there
      (a delta model's own deltas); one of those matched by a pattern trains too;
    * any other delta parameter (another delta model's) is never turned back on: when ``"deltas"`` is given or a
      pattern matches it, it is left as it is (what its own delta model, or the user by hand, set stays), otherwise
      it is frozen, as everything else is (the original's rule: it only ever froze).

    Args:
        module: usually the backbone.
        exclude: patterns of what stays trainable; ``"deltas"`` means the delta parameters (see ``own``).
            ``None`` means ``["deltas"]``.
        set_state_dict: make ``module.state_dict()`` return only the trainable parameters.
        own: the names (in ``module``) of the delta parameters ``"deltas"`` covers; ``None``: every delta's.
    """
    keep_deltas, patterns = _rules(exclude)
    deltas = delta_parameter_names(module)
    covered = deltas if own is None else deltas & set(own)
    for name, param in module.named_parameters():
        keep = is_excluded(name, patterns) or (keep_deltas and name in deltas)
        if name in deltas and name not in covered:  # another delta model's: never turned back on
            param.requires_grad = param.requires_grad and keep
        else:
            param.requires_grad = keep
    if set_state_dict:
        trainable_only_state_dict(module)


def own_parameters(prefix: str, delta: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """A delta's parameters under the names they have (or would have) in the model: ``<prefix>.<name>``.

    A replacement's wrapped original is the backbone's, not the delta's, and is left out; shared parameters are
    listed under each of their names.
    """
    wrapped = getattr(delta, WRAPPED_ATTR, None)
    for name, param in delta.named_parameters(remove_duplicate=False):
        if wrapped and (name == wrapped or name.startswith(wrapped + ".")):
            continue
        yield (f"{prefix}.{name}" if prefix else name), param


def _rules(exclude: Sequence[str] | None) -> tuple[bool, Any]:
    source = source_of(exclude)  # a config's unfrozen_modules read from a file: matched with bounds
    exclude = [DELTAS_KEYWORD] if exclude is None else list(exclude)
    argument = "exclude" if source is None else "unfrozen_modules"
    patterns = compile_patterns([e for e in exclude if e != DELTAS_KEYWORD], argument=argument, source=source)
    return DELTAS_KEYWORD in exclude, patterns


def freeze_outside(deltas: Mapping[str, nn.Module], exclude: Sequence[str] | None = None) -> None:
    """Apply :func:`freeze_module`'s rule to deltas outside the model now (detached), by their attached names.

    ``deltas`` maps the name a delta has attached (``"encoder.layer.0.attention.lora"``) to it, so re-attaching them
    gives what freezing the model with them attached gives. A replacement's wrapped original is the backbone's, frozen
    with it.
    """
    keep_deltas, patterns = _rules(exclude)
    for prefix, delta in deltas.items():
        for name, param in own_parameters(prefix, delta):
            param.requires_grad = keep_deltas or is_excluded(name, patterns)


def trainable_parameter_names(module: nn.Module) -> set[str]:
    """Every name under which a trainable parameter appears in ``module.state_dict()`` (tied names included)."""
    return {n for n, p in module.named_parameters(remove_duplicate=False) if p.requires_grad}


class _KeepTrainable:
    """``state_dict`` post-hook that drops frozen parameters and buffers (picklable, so the model stays so)."""

    def __call__(self, module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
        keep = {prefix + n for n in trainable_parameter_names(module)}
        for key in [k for k in state_dict if k.startswith(prefix) and k not in keep]:
            del state_dict[key]


class _FrozenMayBeMissing:
    """``load_state_dict`` hooks: what the trimmed ``state_dict`` leaves out is not "missing" when loading it back.

    Without them ``model.load_state_dict(model.state_dict())`` fails under ``strict=True`` and every non-strict
    loader (the Trainer resuming, accelerate's ``load_state``) reports the whole frozen backbone as missing keys. A
    missing *trainable* key is still reported. The pre-hook records under which prefix this module is being loaded,
    since the post-hook sees the keys of the outermost ``load_state_dict`` call.
    """

    def pre(self, module: nn.Module, state_dict: Any, prefix: str, *args: Any) -> None:
        module.__dict__["_opendelta_load_prefix"] = prefix

    def post(self, module: nn.Module, incompatible_keys: Any) -> None:
        prefix = module.__dict__.pop("_opendelta_load_prefix", "")
        trainable = trainable_parameter_names(module)
        frozen = {prefix + n for n, _ in module.named_parameters(remove_duplicate=False) if n not in trainable}
        frozen |= {prefix + n for n, _ in module.named_buffers(remove_duplicate=False)}
        incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys if k not in frozen]


def has_trainable_only_state_dict(module: nn.Module) -> bool:
    """Whether ``module.state_dict()`` is limited to trainable parameters (by :func:`trainable_only_state_dict`)."""
    return getattr(module, _STATE_DICT_HANDLE, None) is not None


def trainable_only_state_dict(module: nn.Module, enable: bool = True) -> None:
    """Make ``module.state_dict()`` hold only trainable parameters (``enable=False`` restores the full one).

    Loading such a state dict back (strictly or not) then leaves the frozen parameters as they are, without
    reporting them as missing.
    """
    handles = getattr(module, _STATE_DICT_HANDLE, None)
    if enable and handles is None:
        loading = _FrozenMayBeMissing()
        handles = (
            module.register_state_dict_post_hook(_KeepTrainable()),
            module.register_load_state_dict_pre_hook(loading.pre),
            module.register_load_state_dict_post_hook(loading.post),
        )
        setattr(module, _STATE_DICT_HANDLE, handles)
    elif not enable and handles is not None:
        for handle in handles:
            handle.remove()
        delattr(module, _STATE_DICT_HANDLE)
