"""``DeltaModel``: the base class every delta method plugs into (manual section 1.20.2, ``DeltaBase``).

Template method: core owns the public calls (construction, ``freeze_module``, ``detach``/``attach``, ``log``,
``save_finetuned``/``from_finetuned``) with target resolution, checks and errors; a plugin sets a few class
attributes and implements one method, :meth:`DeltaModel._build_delta`, returning the ``nn.Module`` to place on one
target. ``insertion`` says how it is placed: ``"after"``/``"before"`` (sequential), ``"parallel"`` or ``"replace"``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar, NamedTuple, TypeVar

import torch
from torch import nn

import opendelta.prefix
import opendelta.prompt  # noqa: F401  (registers the "prompt" insertion kind)
from opendelta.addressing import compile_patterns, is_excluded
from opendelta.budget import DeltaMemoryBudget
from opendelta.classic_api import ClassicDeltaApi
from opendelta.concurrency import switching
from opendelta.config import DeltaConfig
from opendelta.delta_protocols import wrapped_name
from opendelta.errors import DeltaClassError, DeltaConfigError, DeltaStateError, UnsupportedTargetError
from opendelta.freezing import (
    freeze_module,
    freeze_outside,
    has_trainable_only_state_dict,
    own_parameters,
    trainable_only_state_dict,
)
from opendelta.insertion import (
    PLACERS,
    Insertion,
    Kind,
    insert_parallel_module,
    insert_sequential_module,
    placement_kinds,
    replace_module,
)
from opendelta.markers import WRAPPED_ATTR
from opendelta.merge_steps import fold_in, forget_merged, mergeable, take_out, unmergeable_names
from opendelta.method_class_checks import check_class_attributes, declare_names
from opendelta.parameter_insertion import insert_parameter_delta
from opendelta.positional import bind_positionals, constructor_signature, positional_names
from opendelta.quantization import compute_dtype_hint
from opendelta.quantized_merge import dequantize_into
from opendelta.save_options import check_save_options, positional_032
from opendelta.shapes import known_features, module_features, pseudo_call
from opendelta.targets import Target, resolve_targets
from opendelta.task_heads import TaskHead, build_heads, detached_heads, resolve_heads, sync_all
from opendelta.task_heads import state_dict as heads_state_dict
from opendelta.visualization import log_model

__all__ = ["DeltaConfig", "DeltaModel", "Placement", "Target"]

logger = logging.getLogger(__name__)
M = TypeVar("M", bound="DeltaModel")
F = TypeVar("F", bound=Callable[..., Any])

_CORE_ARGS = ("interactive_modify", "backend", "dummy_inputs")


def _target_modules(target: Target) -> list[nn.Module]:
    return [target.module] + ([target.output.module] if target.output is not None else [])


def _switch_all(insertions: Iterable[Insertion], *, attach: bool) -> None:
    """Attach (or detach) each insertion in turn; if one refuses, undo those done, so that all switch or none."""
    done: list[Insertion] = []
    try:
        for insertion in insertions:
            insertion.attach() if attach else insertion.detach()
            done.append(insertion)
    except BaseException:
        for insertion in reversed(done):
            insertion.detach() if attach else insertion.attach()
        raise


def _switches(method: F) -> F:
    """Run a call that rewires the backbone as the writer of its switching gate (see :mod:`opendelta.concurrency`).

    It waits for forward passes of the backbone running in other threads and holds new ones back until done, so a
    forward sees the old state or the new one, never a mix; such calls from several threads run one at a time.
    """

    @functools.wraps(method)
    def switch(self: DeltaModel, *args: Any, **kwargs: Any) -> Any:
        with switching(self.backbone_model, f"{type(self).__name__}.{method.__name__}()"):
            return method(self, *args, **kwargs)

    return switch  # type: ignore[return-value]


class Placement(NamedTuple):
    """One placed delta and the target it is on (see :meth:`DeltaModel.placements`)."""

    target: Target
    insertion: Insertion


class DeltaModel(ClassicDeltaApi):
    """A set of delta modules attached to a backbone, built from a :class:`DeltaConfig`.

    Writing a method (the whole contract is :mod:`opendelta.plugin_api`): subclass this, set class attributes, and
    override the methods below. Everything else (addressing, checks, freezing, attach/detach, merging, routing,
    saving) is core's and works for every method.

    Class attributes (checked when the class is defined; a wrong one raises :class:`~opendelta.errors.DeltaClassError`):

    * ``config_class``: the method's :class:`DeltaConfig` dataclass. Its ``delta_type`` is the method's name, written
      there once: this class's ``delta_type`` and ``delta_name`` default to it, and ``register(ModelClass)`` reads it;
    * ``delta_name``: the child name a delta gets on the module it modifies (default: ``delta_type``);
    * ``default_modified_modules``: common names used when ``modified_modules`` is ``None``;
    * ``insertion``: how a delta is placed, one of :func:`~opendelta.insertion.placement_kinds`: ``"after"``,
      ``"before"`` (sequential), ``"parallel"``, ``"replace"``, or a registered kind (``"prefix"``, ``"prompt"``);
    * ``supported_layer_types``: module types a target must be (``None``: any), or a function returning them
      (``linear_types``, so transformers is imported only when targets are checked); or override :meth:`supports`;
    * ``supports_fused_targets``: whether the method handles one slice of a fused module (GPT-2 ``c_attn``);
    * ``cover_common_scopes``, ``identity_at_init``, ``positional_args``: see each;
    * ``low_rank_fields``, ``combines_linearly``: how :func:`opendelta.combine_deltas` combines several (see each).

    Override points, in the order construction calls them. The naming rule: a name with a leading underscore is
    called by core only (override it, never call it from outside); a name without one is also public API, which a
    user may call:

    1. ``_resolve_targets()`` -> the :class:`Target` list (default: name-based addressing through the mapping);
    2. ``_expand_target(target)`` -> the modules to modify inside one match (default: itself);
    3. :meth:`supports` -> whether a target module can be modified (default: ``supported_layer_types``);
    4. ``_prepare(targets)`` -> nothing: state every delta shares (one network, offsets), set up before any is built;
    5. ``_build_delta(target)`` -> the ``nn.Module`` for one target (required; size it with :meth:`features`);
    6. ``placement_options(target)`` -> keyword arguments for a registered insertion kind's placer;
    7. ``translate_legacy_config`` / ``translate_legacy_state_dict``: reading OpenDelta 0.3.x checkpoints.

    A delta module may also declare optional behaviours, each a :mod:`opendelta.delta_protocols` ``Protocol``
    (merging into its host's weights, adding to a spanned output, wrapping the module it replaces...).

    The backbone is modified in place and is *not* registered as a submodule of the delta model; the delta modules
    are (``delta_model.parameters()`` are the delta parameters).
    """

    config_class: ClassVar[type[DeltaConfig]] = DeltaConfig
    delta_type: ClassVar[str] = ""
    delta_name: ClassVar[str] = "delta"
    default_modified_modules: ClassVar[tuple[str | tuple[str, str], ...]] = ()
    insertion: ClassVar[Kind] = "after"
    supported_layer_types: ClassVar[tuple[type[nn.Module], ...] | Callable[[], tuple[type[nn.Module], ...]] | None] = (
        None
    )
    supports_fused_targets: ClassVar[bool] = False
    _delta_type_from_config: ClassVar[bool] = False
    """Whether ``delta_type`` was read from ``config_class`` (see ``_declare_names``), not declared here."""
    _delta_name_from_config: ClassVar[bool] = False
    """Whether ``delta_name`` is ``delta_type`` by default (see ``_declare_names``), not declared here."""
    cover_common_scopes: ClassVar[bool] = False
    """Whether a common name also designates everything named under it (see ``resolve_targets(cover_scopes=)``)."""
    identity_at_init: ClassVar[bool] = True
    """Whether a freshly built delta leaves the backbone's outputs unchanged (checked by the conformance battery)."""
    low_rank_fields: ClassVar[tuple[str, str] | None] = None
    """``(rank field, alpha field)`` of ``config_class`` when every delta is a low-rank branch scaled by a function
    of the two (LoRA's ``("lora_r", "lora_alpha")``), its layers :class:`~opendelta.delta_protocols.LowRankBranch`
    and :class:`~opendelta.delta_protocols.LoadsLowRankFactors`: what :func:`opendelta.combine_deltas` sets to build
    the combined delta at a new rank. ``None``: the method's deltas are not combined as low-rank factors."""
    combines_linearly: ClassVar[bool] = False
    """Whether a weighted sum of each delta parameter combines several of this method's delta models (BitFit's
    biases, IA3's vectors as PEFT's IA3 sums them): :func:`opendelta.combine_deltas` with ``"linear"``."""

    positional_args: ClassVar[tuple[str, ...] | None] = None
    """The hyper-parameters the constructor takes by position after the backbone, in the manual's order for this
    method (``LoraModel(model, 4, 8)`` is ``lora_r=4, lora_alpha=8``): config field names, ``interactive_modify``
    and ``backend``. ``None``: the config's fields in declaration order (its ``backbone_*`` records left out)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        declare_names(cls)
        check_class_attributes(cls)
        if cls.__init__ is not DeltaModel.__init__:  # a constructor of its own (0.3.2-style DeltaBase) tells the truth
            cls.__signature__ = None  # type: ignore[attr-defined]
            return
        cls.__signature__ = constructor_signature(cls.positional_names(), cls.config_class.defaults())  # type: ignore[attr-defined]

    @classmethod
    def positional_names(cls) -> tuple[str, ...]:
        """The names the constructor's positional arguments after the backbone stand for (see ``positional_args``).

        Raises:
            DeltaConfigError: ``positional_args`` names something that is neither a config field nor a constructor
                option, or names one twice (raised when the class is defined).
        """
        return positional_names(cls.__name__, cls.positional_args, cls.config_class.field_names())

    def __init__(
        self,
        backbone_model: nn.Module,
        *args: Any,
        config: DeltaConfig | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        kwargs = bind_positionals(type(self).__name__, self.positional_names(), args, kwargs)
        if "unfrozen_modules" in kwargs and kwargs["unfrozen_modules"] is None:
            del kwargs["unfrozen_modules"]  # the manual's signatures default it to None, meaning ["deltas"]
        interactive_modify: bool | int = kwargs.pop("interactive_modify", False)
        backend: str = kwargs.pop("backend", "hf")
        dummy_inputs = pseudo_call(kwargs.pop("dummy_inputs", None))  # for the pseudo forward pass; not a config field
        if not isinstance(backbone_model, nn.Module):
            raise TypeError(f"backbone_model must be a torch.nn.Module, got {type(backbone_model).__name__}")
        if backend != "hf":
            raise DeltaConfigError(f"backend={backend!r} is not supported; only 'hf' (PyTorch modules) is")
        if interactive_modify:  # the modules clicked on a local page become modified_modules (manual 1.15.3)
            from opendelta.interactive import modified_modules_from_page

            self.config_class.from_dict({} if config is None else config.to_dict(), **kwargs)  # typos before the page
            given = kwargs.get("modified_modules", None if config is None else config.modified_modules)
            kwargs = {**kwargs, **modified_modules_from_page(type(self), backbone_model, interactive_modify, given)}
        if config is None:
            config = self.config_class.from_dict({}, **kwargs)  # keyword arguments: an unknown one is named
        elif kwargs:
            given, config = config, self.config_class.from_dict(config.to_dict(), **kwargs)
            config.copy_marks(given, overridden=kwargs)  # patterns a file set stay the file's
        if type(config) is not self.config_class:
            raise DeltaConfigError(
                f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}"
            )
        self._init_state(backbone_model)
        self._dummy_inputs = dummy_inputs
        self.config = config
        targets = self._expand_all(self._resolve_targets())
        self._check_targets(targets)
        head_names = resolve_heads(backbone_model, config.modules_to_save, targets, type(self).__name__)
        self.targets = targets
        budget = DeltaMemoryBudget(self, len(targets))  # a rank of 10**9 fails here, at once (see opendelta.budget)
        with self._building():
            with budget:  # shared state (a prefix's network) is sized by the same settings
                self._prepare(targets)
            for count, target in enumerate(targets, start=1):
                with budget:
                    delta = self._build_delta(target)
                budget.built(delta, count)
                self._record(self._place(target, delta), target)
            self._heads = build_heads(backbone_model, head_names)  # modules_to_save: see opendelta.task_heads
            self.deltas.extend(head.copy for head in self._heads)
        self._record_backbone(config)

    def _init_state(self, backbone_model: nn.Module) -> None:
        """The bookkeeping every delta model starts with, before any delta is placed."""
        self.__dict__["backbone_model"] = backbone_model  # not a submodule: the backbone is the user's, not ours
        self._placed: list[Placement] = []
        self._merged: list[Insertion] = []
        self._premerge_samples: dict[str, bytes | None] = {}
        self._unloaded = False
        self.deltas = nn.ModuleList()
        self.targets: list[Target] = []
        self._heads: list[TaskHead] = []
        self._features: dict[int, tuple[int, int]] = {}
        self._dummy_inputs: Any = None  # the constructor's dummy_inputs=, as a call (see opendelta.shapes.pseudo_call)

    @contextlib.contextmanager
    def _building(self) -> Iterator[None]:
        """Place deltas as the backbone's switching writer; if one fails, take out those placed, then re-raise."""
        with switching(self.backbone_model, f"building {type(self).__name__}"), compute_dtype_hint(self.backbone_model):
            try:
                yield
            except BaseException:
                for insertion in reversed(self._insertions):
                    insertion.detach()
                sync_all(self._heads)
                raise

    def _record(self, insertion: Insertion, target: Target, *, discovered: bool = False) -> None:
        """Keep one placed delta with the target it is on.

        ``discovered``: a target found while building (by a 0.3.2-style ``update_module``), added to ``targets`` too.
        """
        if discovered:
            self.targets.append(target)
        self._placed.append(Placement(target, insertion))
        self.deltas.append(insertion.delta)

    @property
    def _insertions(self) -> list[Insertion]:
        """The placed deltas in placement order, then the task heads' copies (read-only).

        :attr:`_placed` is the record of the deltas, :attr:`_heads` of the heads (see :mod:`opendelta.task_heads`).
        """
        return [p.insertion for p in self._placed] + [h.insertion for h in self.__dict__.get("_heads", ())]

    def placements(self) -> Iterator[Placement]:
        """Each placed delta with the target it is on: ``(target, insertion)`` pairs, in placement order."""
        return iter(list(self._placed))

    def _record_backbone(self, config: DeltaConfig) -> None:
        """After building: forget measured sizes, and record the backbone's class and checkpoint in ``config``."""
        self._features.clear()  # measured for building; ids of modules must not outlive this call
        config.backbone_class = type(self.backbone_model).__name__
        config.backbone_checkpoint_name = (
            getattr(getattr(self.backbone_model, "config", None), "_name_or_path", None) or None
        )

    # ----------------------------------------------------------------------------------------------- plugin API
    def _build_delta(self, target: Target) -> nn.Module:
        """Create the delta module for one target (the plugin's one job)."""
        raise TypeError(f"{type(self).__name__} must implement _build_delta(target) to create its delta modules")

    def _resolve_targets(self) -> list[Target]:
        """The modules the config designates (name-based addressing, common names through the mapping).

        Plugins with an addressing scheme of their own (spans of two modules...) override this, building on
        :func:`opendelta.targets.resolve_targets`.
        """
        return resolve_targets(
            self.backbone_model,
            self.config.modified_modules,
            self.config.exclude_modules,
            self.default_modified_modules,
            self.config.common_structure,
            type(self).__name__,
            cover_scopes=self.cover_common_scopes,
        )

    def features(self, module: nn.Module) -> tuple[int, int]:
        """``(in_features, out_features)`` of a target module, for sizing its delta in :meth:`_build_delta`.

        Read from the module's type when it tells (Linear, Conv1D, LayerNorm, Embedding); otherwise measured by
        one pseudo forward pass that sizes every target of this delta model at once (see
        :func:`opendelta.shapes.module_features`), before any of them is modified. That pass runs on the
        constructor's ``dummy_inputs`` when given (``AdapterModel(model, dummy_inputs={"input_ids": ids})``: a dict
        of keyword arguments, or a tensor or tuple of positional ones; used for that pass only, never saved).
        """
        if id(module) not in self._features:
            wanted = [module] + [m for t in self.targets for m in _target_modules(t) if id(m) not in self._features]
            sizes = module_features(self.backbone_model, wanted, self._dummy_inputs, type(self).__name__)
            self._features.update(zip(map(id, wanted), sizes, strict=True))
        return self._features[id(module)]

    def _expand_target(self, target: Target) -> list[Target]:
        """The modules to place deltas on for one matched module: itself by default.

        Methods that "broadcast" to submodules (BitFit adds a bias to every linear layer and layer norm inside
        ``attn``) override this; core drops the submodules ``exclude_modules`` names, and an empty list for every
        target is reported as an error, not a silent no-op.
        """
        return [target]

    def _expand_all(self, targets: Sequence[Target]) -> list[Target]:
        expanded: list[Target] = []
        seen: set[tuple[int, int | None, tuple[int, ...] | None, str | None]] = set()
        exclude = compile_patterns(self.config.exclude_modules, argument="exclude_modules")
        for target in targets:
            for leaf in self._expand_target(target):
                if leaf is not target and is_excluded(leaf.name, exclude):
                    continue  # a submodule a broadcasting method found inside an allowed target
                output = id(leaf.output.module) if leaf.output is not None else None
                key = (id(leaf.module), output, leaf.parts, leaf.parameter)
                if key not in seen:
                    seen.add(key)
                    expanded.append(leaf)
        if not expanded:
            raise UnsupportedTargetError(
                f"{type(self).__name__} found nothing it can modify inside "
                f"{', '.join(t.name for t in targets[:5])}{'...' if len(targets) > 5 else ''}; point modified_modules "
                f"at other modules (see Visualization(model).structure_graph())"
            )
        return expanded

    def _check_targets(self, targets: Sequence[Target]) -> None:
        """Refuse, before anything changes, targets the method cannot modify."""
        problems = []
        for t in (end for target in targets for end in (target, target.output) if end is not None):
            if not self.supports(t.module):
                problems.append(f"{t.name} ({type(t.module).__name__})")
            elif t.parts is not None and not self.supports_fused_targets:
                problems.append(f"{t.name} (fused {type(t.module).__name__}, parts {t.parts} of {t.num_parts})")
        for t in targets:  # a part the mapping cannot slice on this model is refused by name, before anything changes
            features = known_features(t.module) if t.parts is not None and self.supports_fused_targets else None
            if features is not None:
                t.output_index(features[1])
        if problems:
            kinds = ", ".join(k.__name__ for k in self.layer_types() or ()) or "non-fused modules"
            shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
            raise UnsupportedTargetError(
                f"{type(self).__name__} can modify {kinds} only, but modified_modules="
                f"{self.config.modified_modules or list(self.default_modified_modules)!r} designates: {shown}. "
                f"Point modified_modules at modules of a supported type (see Visualization(model).structure_graph())."
            )

    def _prepare(self, targets: Sequence[Target]) -> None:
        """Set up what the deltas of this model share, once every target is known and before any delta is built.

        The default does nothing. ``PrefixModel`` builds its shared reparameterisation network here (sized by every
        target's keys and values) and reads each attention's projections once. State kept on ``self`` here is the
        delta model's; a module kept in a plain attribute is not one of its registered submodules.
        """

    def supports(self, module: nn.Module) -> bool:
        """Whether a target module is one this method can modify (default: an instance of ``supported_layer_types``).

        Checked for every target before anything changes; override it for a test a type tuple cannot express.
        """
        types = self.layer_types()
        return types is None or isinstance(module, types)

    @classmethod
    def layer_types(cls) -> tuple[type[nn.Module], ...] | None:
        """``supported_layer_types`` as a tuple (called first when it is a function, such as ``linear_types``)."""
        types = cls.supported_layer_types
        return types() if callable(types) and not isinstance(types, (tuple, type)) else types

    def placement_options(self, target: Target) -> dict[str, Any]:
        """Method-specific options for a placement kind registered in :data:`opendelta.insertion.PLACERS`."""
        return {}

    def _place(self, target: Target, delta: nn.Module) -> Insertion:
        if target.parameter is not None:  # a stacked expert weight: whatever the method's kind, it changes the weight
            return insert_parameter_delta(
                target.module, target.parameter, delta, f"{self.delta_name}_{target.parameter}"
            )
        if self.insertion in PLACERS:
            return PLACERS[self.insertion](self, target, delta, **self.placement_options(target))
        if self.insertion == "parallel":
            output = target.output.module if target.output is not None else None
            return insert_parallel_module(target.module, delta, self.delta_name, output_module=output)
        if self.insertion in ("before", "after"):
            return insert_sequential_module(target.module, delta, self.delta_name, position=self.insertion)
        if self.insertion != "replace":  # declared valid, then changed on the class or the instance
            raise DeltaClassError(
                f"{type(self).__name__}.insertion is {self.insertion!r}, not one of {', '.join(placement_kinds())}"
            )
        parent_name, child = target.parent_and_child_name
        parent = self.backbone_model.get_submodule(parent_name)
        return replace_module(parent, child, target.module, delta, self.delta_name, wrapped=wrapped_name(delta))

    # ------------------------------------------------------------------------------------------------ user API
    @classmethod
    def from_config(
        cls: type[M],
        config: DeltaConfig | dict[str, Any],
        backbone_model: nn.Module,
        check_hash: bool = True,
        **kwargs: Any,
    ) -> M:
        """Build the delta model described by ``config`` on ``backbone_model`` (weights freshly initialised).

        ``kwargs`` override config entries. A dict is one made in code (``asdict(delta_args)`` of a 0.3.2
        pipeline): its keys that are no field of the method are dropped with one warning, while ``kwargs`` stay
        strict (see :meth:`DeltaConfig.from_dict`). ``check_hash`` is accepted for compatibility; the hash is checked
        by :meth:`from_finetuned`, where there are weights to check it against.
        """
        del check_hash
        core = {k: kwargs.pop(k) for k in _CORE_ARGS if k in kwargs}  # constructor options, not config fields
        if isinstance(config, dict):
            config = cls.config_class.from_dict(config, **kwargs)
            kwargs = {}
        return cls(backbone_model, config=config, **core, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Not callable: a delta model runs inside its backbone; call the backbone."""
        raise RuntimeError(
            f"{type(self).__name__} is attached to its backbone and does not run by itself; call the backbone model"
        )

    @property
    def attached(self) -> bool:
        """Whether the deltas are currently in the backbone."""
        return bool(self._insertions) and all(i.attached for i in self._insertions)

    def insertions(self) -> Iterator[Insertion]:
        """Each placed delta with its host module and child name, then each task head's copy (``modules_to_save``)."""
        return iter(self._insertions)

    def task_heads(self) -> dict[str, nn.Module]:
        """This model's copy of each module ``modules_to_save`` designates, by module name (see ``task_heads``)."""
        return {head.name: head.copy for head in self._heads}

    def _check_not_unloaded(self, call: str) -> None:
        """Refuse every call on a delta model whose deltas :meth:`merge_and_unload` folded into the backbone for good.

        It is empty then: without this, ``attach()`` would be a silent no-op and ``delta_state_dict()`` or
        ``save_finetuned()`` would fail with a bare ``ValueError`` or save a delta with no tensors.
        """
        if self.__dict__.get("_unloaded", False):
            raise DeltaStateError(
                f"{type(self).__name__}.{call}() after merge_and_unload(): its deltas are part of the backbone's "
                f"weights for good and this delta model is empty. Save the merged backbone with save_pretrained(); "
                f"to keep working with the delta, build a new one (or load it with from_finetuned) on a fresh backbone"
            )

    def _check_module(self, module: nn.Module | None) -> None:
        """Refuse a module other than the backbone (a deep copy of it included: its deltas are its own)."""
        if module is not None and module is not self.backbone_model:
            raise DeltaStateError(
                f"{type(self).__name__} belongs to the {type(self.backbone_model).__name__} it was built on and cannot "
                f"move to another module ({type(module).__name__}); to put these deltas on another model, "
                f"save_finetuned() them and from_finetuned() onto it, or copy.deepcopy() this delta model, which "
                f"copies its backbone along"
            )

    @_switches
    def detach(self, module: nn.Module | None = None, reset_state_dict: bool = True) -> None:
        """Take every delta of this model out of the backbone; outputs become the bare backbone's, exactly.

        Nothing is copied or deleted: :meth:`attach` puts the same modules back. Other delta models on the same
        backbone are unaffected, whatever the order. A merged delta model is unmerged first (the weights come back to
        within float rounding). Detaching a detached delta model changes nothing (as in OpenDelta 0.3.2). What the
        user did to the backbone's parameters stays: :meth:`freeze_module`'s ``requires_grad`` flags, a ``.to()``
        move.

        Args:
            module: the backbone, or ``None``; any other module is refused.
            reset_state_dict: give the backbone its whole ``state_dict()`` back (every parameter and buffer, as the
                bare model's), where :meth:`freeze_module` limited it to the trainable parameters; :meth:`attach`
                limits it again. ``False`` leaves the ``state_dict`` as it is.

        Raises:
            DeltaStateError: a delta cannot come out (a later replacement of the same module is attached), or
                ``module`` is not the backbone; the delta model is then left as it was.
        """
        self._check_not_unloaded("detach")
        self._check_module(module)
        if self.merged:
            self.unmerge()
        if self.attached:
            try:
                _switch_all(reversed(self._insertions), attach=False)
            finally:
                sync_all(self._heads)
        if reset_state_dict and has_trainable_only_state_dict(self.backbone_model):
            trainable_only_state_dict(self.backbone_model, enable=False)
            self._trim_on_attach = True  # freeze_module's trimmed state_dict comes back with the deltas

    @_switches
    def attach(self, module: nn.Module | None = None, reset_state_dict: bool = True) -> None:
        """Put the deltas taken out by :meth:`detach` back; outputs equal the attached ones exactly.

        The deltas run at their original place in the order of insertion, whatever order delta models are attached
        in. A backbone moved while they were out (``.to(torch.float64)``, ``.half()``, ``.cuda()``) moves them
        likewise first (see :meth:`opendelta.insertion.Insertion.attach`), as ``.to()`` would have done had they been
        attached: outputs then equal those of the attached model moved. Attaching an attached delta model changes
        nothing (as in OpenDelta 0.3.2).

        Args:
            module: the backbone, or ``None``; any other module is refused.
            reset_state_dict: where :meth:`detach` gave the backbone its whole ``state_dict()`` back, limit it to the
                trainable parameters again, as :meth:`freeze_module` (``set_state_dict=True``) had. ``False`` leaves
                the ``state_dict`` as it is.

        Raises:
            DeltaStateError: it is merged, ``module`` is not the backbone, or attaching would silently change what
                another delta model computes (see :meth:`~opendelta.insertion.Insertion.attach`); nothing changes then.
        """
        self._check_not_unloaded("attach")
        self._check_module(module)
        if self.merged:
            raise DeltaStateError(f"{type(self).__name__} is merged into the weights; call unmerge() to attach it")
        if not self.attached:
            try:
                _switch_all(self._insertions, attach=True)
            finally:
                sync_all(self._heads)
        if reset_state_dict and getattr(self, "_trim_on_attach", False):
            trainable_only_state_dict(self.backbone_model)
            self._trim_on_attach = False

    # ------------------------------------------------------------------------------------------------- merging
    @property
    def merged(self) -> bool:
        """Whether (some of) the deltas are folded into the backbone's weights (see :meth:`merge`)."""
        return bool(self._merged)

    @_switches
    def merge(self, safe_merge: bool = False) -> int:
        """Fold every delta whose math allows it into the weights of the module it modifies.

        The parameters are updated in place and the merged deltas detached, so the model runs the bare model's code
        at its speed; deltas that cannot be merged (an adapter, or BitFit on T5's bias-less layer norm) stay attached.
        Merging twice is a no-op; :meth:`unmerge` takes the deltas out of the weights again, exactly what was added
        even if the deltas changed meanwhile (see :mod:`opendelta.merging`).

        Args:
            safe_merge: compute every merged weight first and refuse, changing nothing, if one holds NaN or Inf.

        Returns:
            How many deltas were merged (0 when already merged).

        Raises:
            DeltaStateError: the deltas are detached; none of them can be merged; or merging one would change
                outputs, because a delta that is not an additive change of the same module's parameters (another
                delta model's adapter) runs after that module before it. Nothing changes then.
        """
        self._check_not_unloaded("merge")
        if self.merged:
            return 0
        if not self.attached:
            raise DeltaStateError(f"{type(self).__name__} is detached; attach() it before merging")
        return self._fold_in(self._insertions, safe_merge)

    def _fold_in(
        self, insertions: list[Insertion], safe_merge: bool, float_weights: dict[int, torch.Tensor] | None = None
    ) -> int:
        """Merge the mergeable ones of ``insertions`` (see :func:`opendelta.merge_steps.fold_in`); how many."""
        chosen = mergeable(insertions, type(self).__name__)
        fold_in(
            chosen,
            self.backbone_model,
            type(self).__name__,
            safe_merge=safe_merge,
            premerge_samples=self._premerge_samples,
            float_weights=float_weights,
        )
        self._merged = chosen
        return len(chosen)

    @_switches
    def unmerge(self) -> None:
        """Take merged deltas out of the weights again and re-attach them (exact to float rounding).

        What is subtracted is what :meth:`merge` added, computed from the deltas as they were then: deltas changed
        while merged (loaded, perturbed) come back with their new values and the backbone without either. A backbone
        moved meanwhile (``.to(dtype)``) takes the update in its new dtype, and the deltas follow it.

        Raises:
            DeltaStateError: nothing is merged.
        """
        self._check_not_unloaded("unmerge")
        if not self.merged:
            raise DeltaStateError(f"{type(self).__name__} is not merged")
        take_out(self._merged)
        self._merged = []
        self._premerge_samples = {}

    @_switches
    def merge_and_unload(self, safe_merge: bool = False, dequantize: bool = False) -> nn.Module:
        """Merge every delta for good and return the backbone: a plain model, ``save_pretrained`` ready.

        The backbone then has no delta, hook or extra child, and its ``state_dict()`` holds every parameter again (as
        ``freeze_module(set_state_dict=True)`` may have limited it); this delta model is left empty, and every later
        call on it (save, ``delta_state_dict``, attach, detach, merge...) raises
        :class:`~opendelta.errors.DeltaStateError`.

        Args:
            safe_merge: see :meth:`merge`.
            dequantize: on a quantized backbone, replace every quantized linear layer by a float ``nn.Linear`` (in
                its compute dtype), with the deltas merged into the float weights without requantizing: a plain
                float model that transformers saves and loads with no quantization library. Without it, merging into
                quantized layers requantizes them (lossy, reported in a warning) or is refused by name where the
                library cannot requantize.

        Raises:
            DeltaStateError: some delta cannot be merged (nothing is changed then); the message lists them.
        """
        self._check_not_unloaded("merge_and_unload")
        if self._heads:
            raise DeltaStateError(
                f"{type(self).__name__} holds task heads (modules_to_save={self.config.modules_to_save!r}), which are "
                f"copies beside the backbone's modules, not weight changes; merge() merges the rest and keeps them"
            )
        pending = [i for i in self._insertions if i not in self._merged]
        unmergeable = unmergeable_names(pending)
        if unmergeable:
            raise DeltaStateError(
                f"{type(self).__name__} cannot be unloaded into plain weights: {', '.join(unmergeable[:5])} cannot be "
                f"merged; keep the delta model attached, or detach() it"
            )
        if pending and not self.attached:
            raise DeltaStateError(f"{type(self).__name__} is detached; attach() it before merging")
        float_weights: dict[int, torch.Tensor] | None = {} if dequantize else None
        if dequantize and self._merged:  # merged earlier into requantized storage: start again from the original
            take_out(self._merged)
            pending, self._merged = list(self._insertions), []
        if pending:
            self._fold_in(pending, safe_merge, float_weights)
        forget_merged(self._merged)
        if float_weights is not None:
            dequantize_into(self.backbone_model, float_weights)
        self._placed, self._merged, self._premerge_samples = [], [], {}
        self.deltas = nn.ModuleList()
        self._unloaded = True
        trainable_only_state_dict(self.backbone_model, enable=False)
        return self.backbone_model

    def premerge_samples(self) -> dict[str, bytes | None]:
        """What the backbone hash read of the parameters merging changed, before it changed them (by name).

        ``None`` marks a parameter merging created (a bias BitFit added to a bias-less layer). Saving a merged delta
        model records the hash of the backbone it belongs to, not of the merged weights.
        """
        return dict(self._premerge_samples)

    def freeze_module(
        self, module: nn.Module | None = None, exclude: Sequence[str] | None = None, set_state_dict: bool = True
    ) -> None:
        """Freeze the backbone except the deltas and ``exclude`` (default: the config's ``unfrozen_modules``).

        The rule, parameter by parameter (see :func:`opendelta.freezing.freeze_module`):

        * a parameter matched by a pattern of ``exclude`` trains (name-based addressing, as ``modified_modules``);
        * with ``"deltas"`` in ``exclude``, *this* delta model's delta parameters train;
        * another delta model's parameters on the same backbone are never turned back on: with ``"deltas"``, or
          matched by a pattern, they are left as they are (as that model's ``freeze_module``, or the user by hand,
          set them); otherwise they are frozen like the rest (as OpenDelta 0.3.2, which only ever froze);
        * everything else is frozen.

        So ``first.freeze_module(exclude=["deltas"])``, then freezing one of ``first``'s parameters by hand, then
        ``second.freeze_module(exclude=["deltas"])`` leaves that parameter frozen.

        Works whether this delta model is attached or not. Its detached (or merged) deltas are not in the backbone,
        so freezing the backbone cannot reach them; they get the ``requires_grad`` they would get attached (from
        ``"deltas"`` and the patterns, matched against the names they have attached), so that freezing then
        :meth:`attach` gives exactly what :meth:`attach` then freezing gives. Freezing is the backbone's own setting:
        the ``requires_grad`` flags outlive :meth:`detach`; the trimmed ``state_dict`` is lifted by
        :meth:`detach` (the bare model's whole ``state_dict`` again) and comes back on :meth:`attach`.

        Args:
            module: what to freeze; the backbone by default.
            exclude: patterns of what stays trainable; ``"deltas"`` means this delta model's delta parameters.
            set_state_dict: make the backbone's ``state_dict()`` hold only trainable parameters.
        """
        self._check_not_unloaded("freeze_module")
        target = self.backbone_model if module is None else module
        patterns = self.config.unfrozen_modules if exclude is None else exclude
        names = {id(m): n for n, m in target.named_modules()}
        placed: dict[bool, dict[str, nn.Module]] = {True: {}, False: {}}
        for i in self._insertions:
            if id(i.host) in names:
                placed[i.attached][f"{names[id(i.host)]}.{i.attr}" if names[id(i.host)] else i.attr] = i.delta
        placed[False].update(detached_heads(self._heads, target))
        own = {name for prefix, delta in placed[True].items() for name, _ in own_parameters(prefix, delta)}
        freeze_module(target, patterns, set_state_dict, own=own)
        freeze_outside(placed[False], patterns)

    def log(
        self,
        module: nn.Module | None = None,
        delta_ratio: bool = True,
        trainable_ratio: bool = True,
        visualization: bool = True,
        cuda_memory: bool = True,
    ) -> None:
        """Print the backbone's module tree with each delta's parameters, then the parameter ratios."""
        log_model(
            self.backbone_model if module is None else module,
            delta_ratio=delta_ratio,
            trainable_ratio=trainable_ratio,
            visualization=visualization,
            cuda_memory=cuda_memory,
        )

    # ------------------------------------------------------------------------------------------ save and load
    def delta_state_dict(self) -> dict[str, torch.Tensor]:
        """This model's delta tensors under stable names: ``<target>.<delta_name>.<param>``.

        The names do not depend on which suffix (``lora_1``) a delta got when another one held its name, nor on
        whether it is attached, so a checkpoint loads into any backbone state.
        """
        self._check_not_unloaded("delta_state_dict")
        state: dict[str, torch.Tensor] = {}
        used: dict[str, int] = {}
        for target, insertion in self._placed:
            if insertion.kind == "replace":
                prefix = target.name
            else:  # a delta on the backbone's root module (a soft prompt on a BertModel) has no host name
                prefix = f"{target.host_name}.{insertion.base_name}" if target.host_name else insertion.base_name
            used[prefix] = used.get(prefix, -1) + 1
            prefix += f"_{used[prefix]}" if used[prefix] else ""  # two deltas of this model on one module
            wrapped = getattr(insertion.delta, WRAPPED_ATTR, None)  # set for every replacement that wraps
            for name, tensor in insertion.delta.state_dict().items():
                if wrapped and (name == wrapped or name.startswith(wrapped + ".")):
                    continue
                state[f"{prefix}.{name}"] = tensor
        state.update(heads_state_dict(self._heads))
        return state

    @classmethod
    def translate_legacy_config(cls, config: dict[str, Any]) -> dict[str, Any]:
        """This method's part of reading an OpenDelta 0.3.x ``config.json`` (see :mod:`opendelta.legacy`).

        Core has already turned ``@`` names into common names and dropped stale fields; a plugin overrides this where
        one of its fields changed name, type or meaning since the original. The default returns ``config`` as is.
        """
        return config

    def translate_legacy_state_dict(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This method's part of reading an OpenDelta 0.3.x ``pytorch_model.bin``, on the freshly built delta model.

        Returns the tensors under :meth:`delta_state_dict`'s names (backbone parameters, such as a task head, keep
        theirs). The default returns them as is: the original named a delta's tensors as this library does
        (``<module>.<delta_name>.<param>``); a plugin overrides this where its names or values differ (BitFit, which
        trained the backbone's own biases). Names left unknown are refused afterwards, naming them.
        """
        return tensors

    def save_finetuned(
        self,
        finetuned_delta_path: str | os.PathLike[str] = "./delta_checkpoints/",
        save_config: bool = True,
        state_dict: dict[str, torch.Tensor] | None = None,
        push_to_hub: bool = False,
        repo_id: str | None = None,
        **kwargs: Any,
    ) -> Path:
        """Save this delta (and any trainable backbone parameter, like a task head) to a folder.

        Writes ``config.json`` and ``delta_model-<digest>.safetensors`` atomically (see ``opendelta.saving``).

        Args:
            finetuned_delta_path: the folder (created if needed).
            save_config: kept for compatibility; ``False`` warns, as the config is always written (a checkpoint
                without it cannot be rebuilt nor its backbone checked).
            state_dict: tensors to save instead of the delta's own and the trainable backbone parameters.
            push_to_hub: also upload the folder to the Hugging Face Hub as ``repo_id`` (with ``huggingface_hub``;
                a failed upload raises :class:`~opendelta.errors.HubError` and leaves the local save complete).
            repo_id: the Hub repo (``user/name``) for ``push_to_hub``. (0.3.2's 4th and 5th positional parameters,
                ``save_function`` and ``push_to_dc``, are recognised here by their types: a function, a bool.)
            kwargs: ``private``, ``token``, ``commit_message`` for the upload; and OpenDelta 0.3.2's
                ``list_tags`` (Hub tags of the model card), ``dict_tags``, ``test_result``, ``usage`` (sections of
                the model card), ``save_function`` (``torch.save`` warns, the tensors are safetensors; another
                function is refused), ``push_to_dc``, ``center_args``, ``center_args_pool``, ``delay_push``
                (DeltaCenter's: they warn, naming ``push_to_hub``). See :mod:`opendelta.save_options`.

        A model card (``README.md``: method, backbone, trainable parameters, usage code) is written beside the
        checkpoint unless the folder holds a README of the user's own (or our card, edited). Nothing else that is
        in the folder is replaced or removed (see :mod:`opendelta.ownership`).

        Returns:
            The folder.

        Raises:
            UnknownArgumentError: a keyword argument not listed above (a typo such as ``finetuned_dela_path=``); the
                message names it and the accepted ones; nothing is written.
            CheckpointError: the folder holds a ``config.json`` that is not a delta config of ours (a transformers
                model's, a Trainer checkpoint's); nothing is written.
            DeltaStateError: merged, with backbone parameters that merging changed requiring grad (loading would
                apply the delta twice: ``unmerge()`` first, or freeze them); or called after ``merge_and_unload()``.
        """
        from opendelta.checkpoint import save_delta

        self._check_not_unloaded("save_finetuned")
        push_to_hub, repo_id = positional_032(push_to_hub, repo_id, kwargs)  # save_function, push_to_dc in 0.3.2
        upload, card = check_save_options(save_config, kwargs)
        return save_delta(
            self, finetuned_delta_path, state_dict, push_to_hub=push_to_hub, repo_id=repo_id, card=card, **upload
        )

    @classmethod
    def from_finetuned(
        cls: type[M],
        finetuned_delta_path: str | os.PathLike[str],
        backbone_model: nn.Module,
        *model_args: Any,
        delta_config: DeltaConfig | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        state_dict: dict[str, torch.Tensor] | None = None,
        force_download: bool = False,
        check_hash: bool = True,
        local_files_only: bool = False,
        **kwargs: Any,
    ) -> M:
        """Rebuild a saved delta on ``backbone_model`` and load its weights; the backbone is put in eval mode.

        Everything is checked before the backbone changes: a checkpoint made for another backbone (its recorded
        hash differs from the one this backbone would have after loading) is refused with
        :class:`~opendelta.errors.BackboneMismatchError`, or only warned about with ``check_hash=False``; tensor
        names or shapes that do not fit are refused and the backbone is left as it was. The same weights in float16 or
        bfloat16 are the same backbone (the delta is cast to its dtype). A config that records no hash is refused
        unless ``check_hash=False`` (:class:`~opendelta.errors.BackboneUnverifiedError`); a weights file holding
        backbone parameters its config does not declare, or a checkpoint already loaded onto this backbone and still
        attached, is refused too (see ``opendelta.backbone_check``).

        ``finetuned_delta_path`` is a local folder or a Hub repo id (``user/name``), fetched with
        ``huggingface_hub`` into its cache (``cache_dir``, ``local_files_only``, ``force_download``, and ``revision``
        and ``token`` as keywords); with ``HF_HUB_OFFLINE=1`` a repo already in the cache loads without network.
        """
        from opendelta.checkpoint import load_delta

        if model_args:
            raise TypeError(f"unexpected positional arguments {model_args!r}; pass options by name")
        hub = {"cache_dir": cache_dir, "force_download": force_download, "local_files_only": local_files_only}
        hub.update({k: kwargs.pop(k) for k in ("revision", "token") if k in kwargs})
        return load_delta(
            cls,
            finetuned_delta_path,
            backbone_model,
            delta_config=delta_config,
            state_dict=state_dict,
            check_hash=check_hash,
            hub_kwargs=hub,
            **kwargs,
        )

    def load_weights(
        self, source: str | os.PathLike[str] | dict[str, torch.Tensor], *, check_hash: bool = True, strict: bool = True
    ) -> Any:
        """Hot-load another checkpoint into these deltas in place: same parameters, new values (no recompile).

        ``source`` is a local folder ``from_finetuned`` reads (``save_finetuned``'s, a PEFT adapter a plugin
        reads) or a state dict under :meth:`delta_state_dict`'s names. Every tensor is copied with ``copy_`` into
        the parameter or buffer already attached (its storage and ``data_ptr`` unchanged), so a ``torch.compile``d
        model runs the new values with the graphs it has. Everything is checked first (method, hyper-parameters,
        tensor names, shapes, dtypes, values, the backbone hash with ``check_hash``); on any error nothing is
        changed. A LoRA built with ``max_rank`` loads any rank up to it (see :mod:`opendelta.hot_loading`).

        Args:
            source: the checkpoint folder, or a state dict (taken with this model's own hyper-parameters).
            check_hash: refuse a folder whose recorded backbone hash is not this backbone's.
            strict: refuse a checkpoint whose tensor names differ from this model's; ``False`` loads those both
                have (the others keep their values) and reports the rest.

        Returns:
            A ``LoadResult(missing_keys, unexpected_keys)``.

        Raises:
            CheckpointError: the checkpoint does not fit (naming what differs and the fix).
            BackboneMismatchError: trained on another backbone (``check_hash=True``).
            DeltaStateError: merged (``unmerge()`` first) or after ``merge_and_unload()``.
        """
        from opendelta.hot_loading import load_weights

        return load_weights(self, source, check_hash=check_hash, strict=strict)

    def extra_repr(self) -> str:
        state = "attached" if self.attached else "detached"
        return f"delta_type={self.delta_type!r}, targets={len(self._placed)}, {state}"
