"""The public contract for plugin authors: everything a delta method or a structure mapping may use from core.

A plugin imports from this module only (``from opendelta.plugin_api import DeltaModel, DeltaConfig, hookimpl``);
first-party plugins do, and a test fails if one reaches anywhere else in core. Every other core module is an
implementation detail that may change in any release.

Versioning promise: :data:`PLUGIN_API_VERSION` is ``MAJOR.MINOR``. Within one major version a name here is never
removed or renamed, a function or hook never loses or renames an argument, and the override points of
:class:`DeltaModel` keep their meaning; a minor version only adds (names, keyword arguments with defaults, hooks).
A plugin states the core it needs with ``opendelta-core>=X.Y,<NEXT_MAJOR`` in its ``pyproject.toml``.

The sections below are the contract, grouped by what a plugin does with them:

* registering: :data:`hookimpl`, the ``register`` callbacks' types;
* the model and its config: :class:`DeltaModel` (its docstring lists the override points), :class:`DeltaConfig`,
  :class:`Target`, :data:`SHARED_POSITIONALS`;
* building deltas: shape queries, initialisers and activations, reusable layers;
* addressing: patterns, exclusions, the backbone's own module names;
* placing deltas: the insertion primitives, soft prompts and prefixes;
* reading and writing files: contained paths, atomic writes, checked tensors, PEFT adapter folders;
* errors and warnings: every exception a plugin raises or catches.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opendelta import file_patterns
    from opendelta.addressing import compile_patterns, is_excluded
    from opendelta.base import DeltaModel, Placement
    from opendelta.checkpoint import apply_checkpoint
    from opendelta.checkpoint_record import CheckpointRecord
    from opendelta.config import INT64_RANGE, DeltaConfig
    from opendelta.delta_protocols import (
        FusedParallel,
        HotLoadable,
        LoadPlan,
        LoadsLowRankFactors,
        LowRankBranch,
        LowRankFactors,
        Mergeable,
        ParameterUpdate,
        PrefixSource,
        PromptSource,
        WrapsReplaced,
    )
    from opendelta.errors import (
        AddressingError,
        CheckpointError,
        DeltaClassError,
        DeltaConfigError,
        DeltaStateError,
        ModuleNotFoundInStructureError,
        OpenDeltaAddressingWarning,
        OpenDeltaServingWarning,
        UnsupportedTargetError,
    )
    from opendelta.expert_stacks import StackLayout, is_expert_list, stack_layout, stacked_parameters
    from opendelta.expert_targets import expert_targets
    from opendelta.hookspecs import RegisterCommonStructure, RegisterDeltaMethod, RegisterQuantizationBackend, hookimpl
    from opendelta.insertion import (
        Insertion,
        insert_parallel_module,
        insert_sequential_module,
        placement_kinds,
        register_placement,
        replace_module,
    )
    from opendelta.layers import (
        ACTIVATIONS,
        INITIALISERS,
        BottleneckAdapter,
        SamplerAdapter,
        get_activation,
        init_weight_,
    )
    from opendelta.legacy import legacy_size_limit, read_pickled_tensors
    from opendelta.markers import DELTA_MARK, backbone_submodules, delta_parameter_names
    from opendelta.parameter_insertion import insert_parameter_delta
    from opendelta.peft_files import PEFT_PREFIX, PeftFolder, peft_folder, refuse_task_heads, write_peft_folder
    from opendelta.positional import SHARED_POSITIONALS
    from opendelta.prefix import AttentionParts, attention_parts, insert_prefix
    from opendelta.prompt import check_prompt_length, input_stack, insert_soft_prompt, prompt_embeddings, prompt_sites
    from opendelta.quantization import QuantizationBackend, backend_of, is_quantized
    from opendelta.saving import (
        contained_file,
        move_into_place,
        new_temporary,
        read_config_dict,
        read_safetensors,
        write_atomically,
    )
    from opendelta.shapes import (
        factory_kwargs,
        fused_output_index,
        is_linear,
        is_norm,
        linear_features,
        linear_types,
        stored_update,
    )
    from opendelta.targets import Target, backbone_module_names, resolve_targets
    from opendelta.task_heads import TASK_HEAD_NAME, head_module_names
    from opendelta.tensor_checks import checked_tensors

PLUGIN_API_VERSION = "1.5"
"""The contract's version (``MAJOR.MINOR``); see the module docstring for what each part promises.

1.1: ``register(ModelClass)``, ``_prepare(targets)``, ``supports(module)``, ``placements()``, the
``delta_protocols``, ``register_placement``, ``DeltaClassError``, ``attention_parts``; the ``read_checkpoint``
hook with ``CheckpointRecord`` and ``apply_checkpoint``; ``write_atomically``.

1.2: fused parts of unequal or interleaved layout: ``Target.split`` and ``Target.output_index(out_features)``
(what a method with ``supports_fused_targets`` slices with), ``fused_output_index(..., split=, where=)``. A method
that still calls ``fused_output_index(out, parts, num_parts)`` without ``split`` slices equal contiguous parts,
which is wrong for such targets: pass ``split=target.split`` or use ``target.output_index``.

Also 1.2: deltas on stacked expert weights (transformers 5's experts): ``Target.parameter``, ``ParameterUpdate``,
``insert_parameter_delta``, ``expert_targets``, ``stacked_parameters``, ``stack_layout`` and ``StackLayout``;
``backbone_submodules``, ``is_expert_list``.

Also 1.2: ``prompt_sites`` and ``prompt_embeddings`` (soft prompts on models that embed no tokens: ViT, CLIP,
Whisper).

1.3: quantized backbones: the ``register_quantization_backends`` hook with ``RegisterQuantizationBackend`` and
``QuantizationBackend`` (a quantization library's linear layers, see :mod:`opendelta.quantization`),
``backend_of``, ``is_quantized``; ``stored_update`` (an ``[out, in]`` weight update in the layout the module stores,
what a ``merge_update`` returns). ``factory_kwargs`` and ``linear_features`` read a quantized layer through its
backend, so a method that sizes and places its deltas with them works on quantized layers unchanged.

1.4: PEFT adapter folders: ``peft_folder`` (a folder of one ``peft_type``, as a :class:`PeftFolder` with its checked
config, tensors on demand and refusals by name: ``refuse_unknown``, ``refuse_other_class``, ``require_targets``
for a missing or ``all-linear`` ``target_modules``, ``refuse_trained_bias`` for a ``bias`` other than ``"none"``;
``weights_file``/``tensors`` with ``pickled=False`` for safetensors only), ``write_peft_folder``, ``PEFT_PREFIX``;
what a plugin reading or exporting its method's PEFT format shares with the others.

1.5: many deltas on one backbone: ``LowRankBranch`` and ``LowRankFactors`` (a parallel delta that is exactly a scaled
low-rank product, so per-row serving batches many of them into one gathered product).

Also 1.5: combining several delta models into one (``opendelta.combine_deltas``): ``LoadsLowRankFactors`` (a
low-rank branch whose factors core overwrites) with the ``DeltaModel`` class attribute ``low_rank_fields`` (the
config's rank and alpha fields), and the ``DeltaModel`` class attribute ``combines_linearly`` (its delta parameters
combine as a weighted sum).

Also 1.5: hot-loading a checkpoint into an existing delta in place (``DeltaModel.load_weights``): ``HotLoadable``
and ``LoadPlan`` (which tensors may be zero-padded along which dimensions, which buffers the checkpoint's config
sets, which config fields may differ; LoRA's ``max_rank`` implements it).

Also 1.5: per-task heads: ``DeltaModel.task_heads()`` (a delta model's copies of its ``modules_to_save``) and
``TASK_HEAD_NAME``, the middle of their tensors' names (``classifier.task_head.weight``), and ``head_module_names``
(what ``modules_to_save`` may designate on a backbone), for a PEFT format's reader and writer; ``refuse_task_heads``
for a PEFT writer that does not ship them."""

_SOURCES: dict[str, str] = {
    "TASK_HEAD_NAME": "opendelta.task_heads",
    "head_module_names": "opendelta.task_heads",
    "refuse_task_heads": "opendelta.peft_files",
    "write_atomically": "opendelta.saving",
    "apply_checkpoint": "opendelta.checkpoint",
    "CheckpointRecord": "opendelta.checkpoint_record",
    "compile_patterns": "opendelta.addressing",
    "is_excluded": "opendelta.addressing",
    "DeltaModel": "opendelta.base",
    "Placement": "opendelta.base",
    "INT64_RANGE": "opendelta.config",
    "DeltaConfig": "opendelta.config",
    "FusedParallel": "opendelta.delta_protocols",
    "LoadsLowRankFactors": "opendelta.delta_protocols",
    "HotLoadable": "opendelta.delta_protocols",
    "LoadPlan": "opendelta.delta_protocols",
    "LowRankBranch": "opendelta.delta_protocols",
    "LowRankFactors": "opendelta.delta_protocols",
    "Mergeable": "opendelta.delta_protocols",
    "PrefixSource": "opendelta.delta_protocols",
    "PromptSource": "opendelta.delta_protocols",
    "WrapsReplaced": "opendelta.delta_protocols",
    "ParameterUpdate": "opendelta.delta_protocols",
    "StackLayout": "opendelta.expert_stacks",
    "stack_layout": "opendelta.expert_stacks",
    "is_expert_list": "opendelta.expert_stacks",
    "stacked_parameters": "opendelta.expert_stacks",
    "expert_targets": "opendelta.expert_targets",
    "insert_parameter_delta": "opendelta.parameter_insertion",
    "AddressingError": "opendelta.errors",
    "CheckpointError": "opendelta.errors",
    "DeltaClassError": "opendelta.errors",
    "DeltaConfigError": "opendelta.errors",
    "DeltaStateError": "opendelta.errors",
    "ModuleNotFoundInStructureError": "opendelta.errors",
    "OpenDeltaAddressingWarning": "opendelta.errors",
    "OpenDeltaServingWarning": "opendelta.errors",
    "UnsupportedTargetError": "opendelta.errors",
    "RegisterCommonStructure": "opendelta.hookspecs",
    "RegisterDeltaMethod": "opendelta.hookspecs",
    "hookimpl": "opendelta.hookspecs",
    "Insertion": "opendelta.insertion",
    "insert_parallel_module": "opendelta.insertion",
    "insert_sequential_module": "opendelta.insertion",
    "placement_kinds": "opendelta.insertion",
    "register_placement": "opendelta.insertion",
    "replace_module": "opendelta.insertion",
    "ACTIVATIONS": "opendelta.layers",
    "INITIALISERS": "opendelta.layers",
    "BottleneckAdapter": "opendelta.layers",
    "SamplerAdapter": "opendelta.layers",
    "get_activation": "opendelta.layers",
    "init_weight_": "opendelta.layers",
    "legacy_size_limit": "opendelta.legacy",
    "read_pickled_tensors": "opendelta.legacy",
    "DELTA_MARK": "opendelta.markers",
    "delta_parameter_names": "opendelta.markers",
    "backbone_submodules": "opendelta.markers",
    "SHARED_POSITIONALS": "opendelta.positional",
    "AttentionParts": "opendelta.prefix",
    "attention_parts": "opendelta.prefix",
    "insert_prefix": "opendelta.prefix",
    "check_prompt_length": "opendelta.prompt",
    "input_stack": "opendelta.prompt",
    "insert_soft_prompt": "opendelta.prompt",
    "prompt_embeddings": "opendelta.prompt",
    "prompt_sites": "opendelta.prompt",
    "contained_file": "opendelta.saving",
    "move_into_place": "opendelta.saving",
    "new_temporary": "opendelta.saving",
    "read_config_dict": "opendelta.saving",
    "read_safetensors": "opendelta.saving",
    "factory_kwargs": "opendelta.shapes",
    "fused_output_index": "opendelta.shapes",
    "is_linear": "opendelta.shapes",
    "is_norm": "opendelta.shapes",
    "linear_features": "opendelta.shapes",
    "linear_types": "opendelta.shapes",
    "stored_update": "opendelta.shapes",
    "QuantizationBackend": "opendelta.quantization",
    "RegisterQuantizationBackend": "opendelta.hookspecs",
    "backend_of": "opendelta.quantization",
    "is_quantized": "opendelta.quantization",
    "Target": "opendelta.targets",
    "backbone_module_names": "opendelta.targets",
    "resolve_targets": "opendelta.targets",
    "checked_tensors": "opendelta.tensor_checks",
    "PEFT_PREFIX": "opendelta.peft_files",
    "PeftFolder": "opendelta.peft_files",
    "peft_folder": "opendelta.peft_files",
    "write_peft_folder": "opendelta.peft_files",
    "file_patterns": "opendelta",
}
"""Where each name lives; imported on first use, so a plugin module that needs only ``hookimpl`` loads no torch."""

__all__ = [
    "ACTIVATIONS",
    "DELTA_MARK",
    "INITIALISERS",
    "INT64_RANGE",
    "PEFT_PREFIX",
    "PLUGIN_API_VERSION",
    "SHARED_POSITIONALS",
    "TASK_HEAD_NAME",
    "AddressingError",
    "AttentionParts",
    "BottleneckAdapter",
    "CheckpointError",
    "CheckpointRecord",
    "DeltaClassError",
    "DeltaConfig",
    "DeltaConfigError",
    "DeltaModel",
    "DeltaStateError",
    "FusedParallel",
    "HotLoadable",
    "Insertion",
    "LoadPlan",
    "LoadsLowRankFactors",
    "LowRankBranch",
    "LowRankFactors",
    "Mergeable",
    "ModuleNotFoundInStructureError",
    "OpenDeltaAddressingWarning",
    "OpenDeltaServingWarning",
    "ParameterUpdate",
    "PeftFolder",
    "Placement",
    "PrefixSource",
    "PromptSource",
    "QuantizationBackend",
    "RegisterCommonStructure",
    "RegisterDeltaMethod",
    "RegisterQuantizationBackend",
    "SamplerAdapter",
    "StackLayout",
    "Target",
    "UnsupportedTargetError",
    "WrapsReplaced",
    "apply_checkpoint",
    "attention_parts",
    "backbone_module_names",
    "backbone_submodules",
    "backend_of",
    "check_prompt_length",
    "checked_tensors",
    "compile_patterns",
    "contained_file",
    "delta_parameter_names",
    "expert_targets",
    "factory_kwargs",
    "file_patterns",
    "fused_output_index",
    "get_activation",
    "head_module_names",
    "hookimpl",
    "init_weight_",
    "input_stack",
    "insert_parallel_module",
    "insert_parameter_delta",
    "insert_prefix",
    "insert_sequential_module",
    "insert_soft_prompt",
    "is_excluded",
    "is_expert_list",
    "is_linear",
    "is_norm",
    "is_quantized",
    "legacy_size_limit",
    "linear_features",
    "linear_types",
    "move_into_place",
    "new_temporary",
    "peft_folder",
    "placement_kinds",
    "prompt_embeddings",
    "prompt_sites",
    "read_config_dict",
    "read_pickled_tensors",
    "read_safetensors",
    "refuse_task_heads",
    "register_placement",
    "replace_module",
    "resolve_targets",
    "stack_layout",
    "stacked_parameters",
    "stored_update",
    "write_atomically",
    "write_peft_folder",
]


def __getattr__(name: str) -> Any:
    """The contract's names, imported on first access (and then cached in this module)."""
    source = _SOURCES.get(name)
    if source is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}: not part of the plugin contract")
    value = getattr(import_module(source), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
