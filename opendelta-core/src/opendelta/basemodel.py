"""``DeltaBase``: OpenDelta 0.3.2's base class for user-defined delta methods (manual section 1.20.2).

The manual teaches writing a method as a subclass whose ``__init__`` calls ``DeltaBase.__init__(self, backbone_model,
modified_modules=..., ...)``, sets its hyper-parameters as attributes, then ``self.add_all_delta_to_backbone(
self.backbone_model, self.modified_modules)``, which calls the subclass's ``update_module(module, key)`` for every
designated module; that one builds a delta and places it with ``self.insert_sequential_module``,
``self.insert_parallel_module`` or ``self.replace_module``.

Here that protocol drives :class:`opendelta.DeltaModel`: the designated modules are resolved by its name-based
addressing, every placement is one of :mod:`opendelta.insertion`'s (a delta with ``pre_forward``/``post_forward`` in
0.3.2's sequential protocol: see :mod:`opendelta.pre_post_forward`), and the config is built from the attributes
once the deltas are in. Such a class thus gets everything a plugin's method has: ``freeze_module``, ``log``,
``detach``/``attach``, ``save_finetuned``/``from_finetuned`` (its own hyper-parameters in ``config.json``), and
``merge`` refused, with the reason, for deltas that cannot be folded into weights.
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

from torch import nn

from opendelta.base import DeltaModel
from opendelta.config import DeltaConfig
from opendelta.errors import DeltaConfigError, UnsupportedTargetError
from opendelta.insertion import Insertion
from opendelta.insertion import insert_parallel_module as _insert_parallel
from opendelta.insertion import insert_sequential_module as _insert_sequential
from opendelta.insertion import replace_module as _replace
from opendelta.legacy_names import strip_legacy_names
from opendelta.pre_post_forward import has_pre_post, insert_pre_post_module
from opendelta.targets import Target, resolve_targets

__all__ = ["DeltaBase"]

_METHODS = ("sequential", "parallel", "before", "after")


def _has_no_tensors(module: nn.Module) -> bool:
    return next(iter(module.parameters()), None) is None and next(iter(module.buffers()), None) is None


class DeltaBase(DeltaModel):
    """Base class of a delta method written in OpenDelta 0.3.2's style (see the module docstring).

    Class attributes a subclass sets: ``config_class`` (a :class:`~opendelta.delta_configs.BaseDeltaConfig`
    subclass, 0.3.2-style or a dataclass), ``delta_type`` and ``default_modified_modules`` (common names, used when
    ``modified_modules`` is ``None``; 0.3.2's ``attn@.q@`` spelling is accepted). It implements
    ``update_module(module, key)``.
    """

    config_class: ClassVar[type[DeltaConfig]] = DeltaConfig
    default_exclude_modules: ClassVar[list[str] | None] = ["lm_head"]
    """What ``exclude_modules=None`` means: 0.3.2 never modified a language-modelling head."""
    default_unfrozen_modules: ClassVar[list[str]] = ["deltas"]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = cls.config_class.delta_type
        if own and cls.delta_type and own != cls.delta_type:
            raise DeltaConfigError(
                f"{cls.__name__}.config_class {cls.config_class.__name__} is the config of delta_type {own!r}, but "
                f"{cls.__name__}.delta_type is {cls.delta_type!r}; give the method a config class of its own"
            )

    def __init__(
        self,
        backbone_model: nn.Module,
        modified_modules: list[str] | None = None,
        exclude_modules: list[str] | None = None,
        unfrozen_modules: list[str] | None = None,
        interactive_modify: bool | int = False,
        common_structure: bool | None = False,
        backend: str = "hf",
    ) -> None:
        nn.Module.__init__(self)
        if not isinstance(backbone_model, nn.Module):
            raise TypeError(f"backbone_model must be a torch.nn.Module, got {type(backbone_model).__name__}")
        if backend != "hf":
            raise DeltaConfigError(f"backend={backend!r} is not supported; only 'hf' (PyTorch modules) is")
        self._init_state(backbone_model)
        if interactive_modify:  # the modules clicked on a local page (manual 1.15.3)
            from opendelta.interactive import modified_modules_from_page

            chosen = modified_modules_from_page(type(self), backbone_model, interactive_modify, modified_modules)
            modified_modules, common_structure = chosen["modified_modules"], chosen["common_structure"]
        if modified_modules is None:  # the paper's places, by common names (0.3.2 did the same)
            defaults = list(self.default_modified_modules)
            modified_modules, _ = strip_legacy_names(defaults, True, "default_modified_modules")
            common_structure = True
        self.modified_modules = modified_modules
        self.exclude_modules = self.default_exclude_modules if exclude_modules is None else exclude_modules
        self.unfrozen_modules = list(self.default_unfrozen_modules if unfrozen_modules is None else unfrozen_modules)
        self.common_structure = common_structure
        self.backend = backend

    # ------------------------------------------------------------------------------------- the 0.3.2 protocol
    def update_module(self, module: nn.Module, key: str) -> None:
        """Build and place the delta of the submodule ``key`` of ``module`` (the subclass's one job)."""
        raise TypeError(
            f"{type(self).__name__} must implement update_module(module, key): find the submodule with "
            f"self.find_module(module, key) and place a delta on it with self.insert_sequential_module(...)"
        )

    def add_all_delta_to_backbone(self, backbone: nn.Module, modified_modules: list[str] | None) -> nn.Module:
        """Call :meth:`update_module` for every module ``modified_modules`` designates, then build the config.

        Designated modules are found by name-based addressing (common names with ``common_structure``), minus
        ``exclude_modules``; a list that designates nothing is an error. If one ``update_module`` fails, the deltas
        placed so far are taken out again and the backbone is as it was.

        Returns:
            The backbone, modified in place.

        Raises:
            ModuleNotFoundInStructureError: ``modified_modules`` designates no module.
            UnsupportedTargetError: no ``update_module`` call placed any delta.
            DeltaConfigError: a placed delta has no parameter yet (0.3.2 let deltas create them lazily).
        """
        self._check_module(backbone)
        targets = resolve_targets(
            backbone, modified_modules, self.exclude_modules, (), self.common_structure, type(self).__name__
        )
        self._check_targets(targets)
        self._names = {id(m): n for n, m in backbone.named_modules()}
        with self._building():
            for target in targets:
                self.update_module(backbone, target.name)
            empty = [t.name for t, i in self.placements() if _has_no_tensors(i.delta)]
            if empty:
                raise DeltaConfigError(
                    f"{type(self).__name__} placed deltas without parameters on {', '.join(empty[:3])}: 0.3.2 let a "
                    f"delta create them in a pseudo forward pass; create them in the delta's __init__ (in "
                    f"update_module, self.features(ref) gives the module's (in, out) sizes), so they can be saved, "
                    f"loaded and moved with the backbone"
                )
            if not self._insertions:
                raise UnsupportedTargetError(
                    f"{type(self).__name__}.update_module placed no delta on any of "
                    f"{', '.join(t.name for t in targets[:5])}; place them with self.insert_sequential_module, "
                    f"self.insert_parallel_module or self.replace_module"
                )
        del self._names
        config = self.create_config_from_model()
        self._record_backbone(config)
        return backbone

    def create_config_from_model(self) -> DeltaConfig:
        """This model's config, from its attributes (``self.my_dim``...) and the base fields, as 0.3.2 built it."""
        if "config" in self.__dict__:
            return self.__dict__["config"]
        values = {k: self.__dict__[k] for k in self.config_class.field_names() if k in self.__dict__}
        config = self.config_class.from_dict(values)
        if not self.config_class.delta_type:  # a 0.3.2-style config has no class-level type: the method's is used
            config.delta_type = self.delta_type  # type: ignore[misc]
        self.__dict__["config"] = config
        return config

    @classmethod
    def from_config(
        cls, config: DeltaConfig | dict[str, Any], backbone_model: nn.Module, check_hash: bool = True, **kwargs: Any
    ) -> DeltaBase:
        """Build this method on ``backbone_model`` from ``config``'s values (``kwargs`` override them).

        As in 0.3.2, the values the constructor takes (with ``**kwargs``: and ``DeltaBase.__init__``'s) are passed to
        it by name; the
        resulting delta model keeps ``config`` itself (with ``kwargs`` applied), so what a checkpoint recorded stays.
        """
        del check_hash  # checked by from_finetuned, where there are weights to check it against
        if kwargs.pop("dummy_inputs", None) is not None:
            raise DeltaConfigError(
                f"{cls.__name__} is a 0.3.2-style method: its update_module() sizes its own deltas, so dummy_inputs= "
                f"cannot reach them; size them from the module (self.features(ref) reads Linear and LayerNorm sizes)"
            )
        if isinstance(config, dict) or kwargs:
            given = config
            config = cls.config_class.from_dict(config if isinstance(config, dict) else config.to_dict(), **kwargs)
            if isinstance(given, DeltaConfig):
                config.copy_marks(given, overridden=kwargs)
        own = inspect.signature(cls.__init__).parameters
        accepted = set(own) | (
            set(inspect.signature(DeltaBase.__init__).parameters)
            if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in own.values())
            else set()
        )
        values = {k: v for k, v in config.to_dict().items() if k in accepted - {"self", "backbone_model"}}
        model = cls(backbone_model, **values)
        built = model.create_config_from_model()
        config.delta_type = built.delta_type  # type: ignore[misc]
        config.backbone_class, config.backbone_checkpoint_name = built.backbone_class, built.backbone_checkpoint_name
        model.__dict__["config"] = config
        return model

    # ------------------------------------------------------------------------------------------- placements
    def insert_sequential_module(
        self,
        module: nn.Module,
        delta_module: nn.Module | None = None,
        delta_name: str = "delta",
        strict: bool = False,
        _delta_info: dict[str, Any] | None = None,
    ) -> None:
        """Run ``delta_module`` around ``module`` (0.3.2's sequential protocol).

        Its ``pre_forward(*args, **kwargs)`` runs on the input, its ``post_forward(output)`` on the output; a delta
        with neither runs ``delta(hidden)`` on the output's hidden state, as :func:`opendelta.insert_sequential_module`.
        """
        self.insert_module(module, "sequential", delta_module, delta_name, strict, _delta_info)

    def insert_parallel_module(
        self,
        module: nn.Module,
        delta_module: nn.Module | None = None,
        delta_name: str = "delta",
        strict: bool = False,
        _delta_info: dict[str, Any] | None = None,
    ) -> None:
        """Add ``delta_module(x)`` to ``module``'s output, ``x`` being its input.

        See :func:`opendelta.insert_parallel_module`.
        """
        self.insert_module(module, "parallel", delta_module, delta_name, strict, _delta_info)

    def insert_module(
        self,
        module: nn.Module,
        method: str = "sequential",
        delta_module: nn.Module | None = None,
        delta_name: str = "delta",
        strict: bool = False,
        _delta_info: dict[str, Any] | None = None,
    ) -> None:
        """Place ``delta_module`` on ``module`` the way ``method`` says.

        ``method`` is ``"sequential"``, ``"parallel"``, ``"before"`` (only ``pre_forward``) or ``"after"`` (only
        ``post_forward``).

        Raises:
            TypeError: no ``delta_module``, or ``_delta_info`` (0.3.2's re-attach record: use :meth:`attach`).
            DeltaConfigError: an unknown ``method``.
        """
        if _delta_info is not None:
            raise TypeError("_delta_info is 0.3.2's record for re-attaching; call attach() to put deltas back")
        if delta_module is None:
            raise TypeError(f"{type(self).__name__}.insert_module needs the delta_module to place")
        if method not in _METHODS:
            raise DeltaConfigError(f"insert_module(method={method!r}): use one of {', '.join(_METHODS)}")
        if method == "parallel":
            insertion = _insert_parallel(module, delta_module, delta_name, strict)
        elif has_pre_post(delta_module):
            hooks = {"sequential": "both", "before": "pre", "after": "post"}[method]
            insertion = insert_pre_post_module(module, delta_module, delta_name, strict, hooks)  # type: ignore[arg-type]
        else:
            position = "before" if method == "before" else "after"
            insertion = _insert_sequential(module, delta_module, delta_name, strict, position=position)
        self._keep(insertion, module)

    def replace_module(
        self,
        parent_module: nn.Module,
        child_name: str,
        child_module: nn.Module,
        new_module: nn.Module,
        delta_name: str = "delta",
    ) -> None:
        """Put ``new_module`` in place of ``parent_module.<child_name>`` (detach puts the child back).

        If ``new_module`` keeps the child inside it (a wrapper), the child's parameters stay the backbone's.
        """
        wrapped = next((n for n, m in new_module.named_modules() if m is child_module and n), None)
        insertion = _replace(parent_module, child_name, child_module, new_module, delta_name, wrapped=wrapped)
        parent_name = self._name_of(parent_module)
        self._keep(insertion, child_module, f"{parent_name}.{child_name}" if parent_name else child_name)
        own = self._modules.get("delta_modules")
        if isinstance(own, nn.ModuleList) and all(m is not new_module for m in own):
            own.append(new_module)  # 0.3.2's replace_module listed the replacement there

    def _name_of(self, module: nn.Module) -> str:
        names = self.__dict__.get("_names") or {id(m): n for n, m in self.backbone_model.named_modules()}
        if id(module) not in names:
            raise DeltaConfigError(
                f"{type(self).__name__}: the {type(module).__name__} to modify is not a module of the backbone; find "
                f"it with self.find_module(module, key) in update_module"
            )
        return names[id(module)]

    def _keep(self, insertion: Insertion, module: nn.Module, name: str | None = None) -> None:
        name = self._name_of(module) if name is None else name
        self._record(insertion, Target(name, module), discovered=True)
