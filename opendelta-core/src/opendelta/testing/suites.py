"""The conformance battery: the checks every delta method (ours or a third party's) must pass.

A plugin's test file needs two lines::

    pytest_plugins = ["opendelta.testing.fixtures"]      # in conftest.py

    class TestLora(DeltaMethodSuite):
        method_name = "lora"

and gets every check on tiny models of the seven classic architectures (see ``tiny_models``). Set ``config_kwargs``
for non-default hyper-parameters, and ``architectures`` to ``MODERN_ARCHITECTURES`` for the modern decoders and mT5,
or to narrow the set (say why in a comment).
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from opendelta import (
    AutoDeltaConfig,
    AutoDeltaModel,
    DeltaModel,
    ModuleNotFoundInStructureError,
    get_method,
    list_plugins,
)
from opendelta.markers import delta_parameter_names
from opendelta.testing.tiny_models import ARCHITECTURES, TASK_HEADS, model_output_tensor, tiny_inputs, tiny_model

__all__ = ["DeltaMethodSuite", "perturb"]


def perturb(delta_model: DeltaModel, seed: int = 0, scale: float = 0.1) -> None:
    """Move every delta parameter away from its initial value, so zero-initialised parts (LoRA's B) matter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in delta_model.parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            param.add_(noise.to(param.dtype) * scale)


def _run(model: nn.Module, arch: str) -> torch.Tensor:
    with torch.no_grad():
        return model_output_tensor(model(**tiny_inputs(arch)))


class _KernelLog(TorchDispatchMode):
    """Records every aten call with its tensor arguments' shapes and strides: which kernels a forward pass runs."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        tensors = [a for a in args if isinstance(a, torch.Tensor) and a.layout == torch.strided]
        layout = tuple((tuple(a.shape), a.stride()) for a in tensors)
        self.calls.append((str(func), layout))
        return func(*args, **(kwargs or {}))


def _kernels(model: nn.Module, arch: str) -> list[tuple[str, tuple[Any, ...]]]:
    with torch.no_grad(), _KernelLog() as log:
        model(**tiny_inputs(arch))
    return log.calls


class DeltaMethodSuite:
    """Checks shared by every delta method; subclass it and set ``method_name``."""

    method_name: ClassVar[str | None] = None
    config_kwargs: ClassVar[dict[str, Any]] = {}
    architectures: ClassVar[tuple[str, ...]] = ARCHITECTURES

    def build(
        self, method_name: str, arch: str, config_kwargs: dict[str, Any], **extra: Any
    ) -> tuple[nn.Module, DeltaModel]:
        """A tiny backbone of ``arch`` and the method attached to it with the suite's configuration."""
        model = tiny_model(arch)
        return model, get_method(method_name).model_cls(model, **{**config_kwargs, **extra})

    def test_registered_through_entry_point(self, method_name: str) -> None:
        spec = get_method(method_name)
        assert spec.distribution, f"{method_name!r} was not registered by an installed distribution's entry point"
        assert any(p.name == spec.plugin and p.distribution == spec.distribution for p in list_plugins())

    def test_attaches_with_defaults(self, method_name: str, arch: str, config_kwargs: dict[str, Any]) -> None:
        model, delta_model = self.build(method_name, arch, config_kwargs)
        assert delta_model.targets, "no target module"
        delta_names = delta_parameter_names(model)
        assert delta_names and sum(p.numel() for p in delta_model.parameters()) > 0
        every_name = model.named_parameters(remove_duplicate=False)  # a shared parameter has one name per place
        assert delta_names == {n for n, p in every_name if any(p is q for q in delta_model.parameters())}

    def test_attaches_on_every_task_head(self, method_name: str, arch: str, config_kwargs: dict[str, Any]) -> None:
        for head in TASK_HEADS[arch]:
            model = tiny_model(arch, head)
            delta_model = get_method(method_name).model_cls(model, **config_kwargs)
            assert delta_model.targets, f"no target on {head}"
            assert model_output_tensor(model(**tiny_inputs(arch))).isfinite().all()

    def test_output_shape_and_identity_at_init(
        self, method_name: str, arch: str, config_kwargs: dict[str, Any]
    ) -> None:
        model = tiny_model(arch)
        bare = _run(model, arch)
        delta_model = get_method(method_name).model_cls(model, **config_kwargs)
        modified = _run(model, arch)
        assert modified.shape == bare.shape
        if delta_model.identity_at_init:
            torch.testing.assert_close(modified, bare, rtol=0, atol=1e-6)

    def test_freeze_leaves_only_deltas_trainable(
        self, method_name: str, arch: str, config_kwargs: dict[str, Any]
    ) -> None:
        model, delta_model = self.build(method_name, arch, config_kwargs)
        delta_model.freeze_module(set_state_dict=True)
        trainable = {n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
        assert trainable == delta_parameter_names(model)
        assert set(model.state_dict()) == trainable

    def test_gradients_reach_every_delta_and_no_frozen_parameter(
        self, method_name: str, arch: str, config_kwargs: dict[str, Any]
    ) -> None:
        model, delta_model = self.build(method_name, arch, config_kwargs)
        delta_model.freeze_module()
        perturb(delta_model)
        model.train()
        model_output_tensor(model(**tiny_inputs(arch))).float().pow(2).mean().backward()
        deltas = delta_parameter_names(model)
        for name, param in model.named_parameters():
            if name in deltas:
                assert param.grad is not None and param.grad.abs().sum() > 0, f"no gradient reaches {name}"
            else:
                assert param.grad is None, f"frozen {name} got a gradient"

    def test_detach_and_attach_are_exact_and_copy_nothing(
        self, method_name: str, arch: str, config_kwargs: dict[str, Any]
    ) -> None:
        model = tiny_model(arch)
        bare_out, bare_keys = _run(model, arch), list(model.state_dict())
        bare_params = [n for n, _ in model.named_parameters()]
        delta_model = get_method(method_name).model_cls(model, **config_kwargs)
        perturb(delta_model)
        attached_out, attached_keys = _run(model, arch), list(model.state_dict())
        pointers = [p.data_ptr() for p in delta_model.parameters()]
        delta_model.detach()
        assert torch.equal(_run(model, arch), bare_out)
        assert list(model.state_dict()) == bare_keys
        assert [n for n, _ in model.named_parameters()] == bare_params
        delta_model.attach()
        assert torch.equal(_run(model, arch), attached_out)
        assert list(model.state_dict()) == attached_keys
        assert [p.data_ptr() for p in delta_model.parameters()] == pointers

    def test_save_and_load_round_trip(
        self, method_name: str, arch: str, config_kwargs: dict[str, Any], tmp_path: Any
    ) -> None:
        model, delta_model = self.build(method_name, arch, config_kwargs)
        delta_model.freeze_module()
        perturb(delta_model)
        expected = _run(model, arch)
        delta_model.save_finetuned(tmp_path / "delta")
        files = sorted(p.name for p in (tmp_path / "delta").iterdir())
        assert files[:2] == ["README.md", "config.json"] and len(files) == 3, files
        assert files[2].endswith(".safetensors"), files
        assert f"**Method**: `{method_name}`" in (tmp_path / "delta" / "README.md").read_text()  # the model card
        fresh = tiny_model(arch)
        AutoDeltaModel.from_finetuned(tmp_path / "delta", backbone_model=fresh)
        assert torch.equal(_run(fresh, arch), expected)

    def test_task_head_is_its_own_copy_and_round_trips(
        self, method_name: str, arch: str, config_kwargs: dict[str, Any], tmp_path: Any
    ) -> None:
        heads = TASK_HEADS[arch]
        head_class = heads[1] if len(heads) > 1 else heads[0]  # a class with a head, else the last part of the model
        model = tiny_model(arch, head_class)
        name = next(n for n, m in reversed(list(model.named_children())) if any(True for _ in m.parameters()))
        original, bare = model.get_submodule(name), _run(model, arch)
        weights = {k: v.clone() for k, v in original.state_dict().items()}
        exclude = [*(config_kwargs.get("exclude_modules") or []), name]  # a method that modifies the head (BitFit)
        options = {**config_kwargs, "exclude_modules": exclude, "modules_to_save": [name]}
        delta_model = get_method(method_name).model_cls(model, **options)
        delta_model.freeze_module()
        perturb(delta_model)
        expected = _run(model, arch)
        assert not torch.equal(expected, bare), "the perturbed head copy did not change the output"
        delta_model.save_finetuned(tmp_path / "delta")
        fresh = tiny_model(arch, head_class)
        AutoDeltaModel.from_finetuned(tmp_path / "delta", backbone_model=fresh)
        torch.testing.assert_close(_run(fresh, arch), expected, rtol=0, atol=0)
        delta_model.detach()
        assert model.get_submodule(name) is original
        assert all(torch.equal(v, weights[k]) for k, v in original.state_dict().items())
        assert torch.equal(_run(model, arch), bare)

    def test_kernels_do_not_depend_on_freezing(
        self, method_name: str, arch: str, config_kwargs: dict[str, Any]
    ) -> None:
        # A checkpoint is trained on a frozen backbone and reloaded onto a fresh, fully trainable one. PyTorch's
        # matmul folds a 3-D input into one mm when the weight requires grad but runs bmm on a strided input of a
        # frozen one, and MKL rounds the two differently on AVX-512 CPUs: the same kernels must run either way.
        model, delta_model = self.build(method_name, arch, config_kwargs)
        perturb(delta_model)
        trainable = _kernels(model, arch)
        delta_model.freeze_module()
        frozen = _kernels(model, arch)
        first = next((i for i, (a, b) in enumerate(zip(frozen, trainable, strict=False)) if a != b), None)
        assert frozen == trainable, f"call {first}: frozen {frozen[first:][:1]} != trainable {trainable[first:][:1]}"

    def test_config_round_trips_through_json(self, method_name: str, arch: str, config_kwargs: dict[str, Any]) -> None:
        _model, delta_model = self.build(method_name, arch, config_kwargs)
        document = json.loads(delta_model.config.to_json_string())
        assert document["delta_type"] == get_method(method_name).name
        again = AutoDeltaConfig.from_dict(document)
        assert type(again) is type(delta_model.config) and again.to_dict() == delta_model.config.to_dict()

    def test_bad_target_raises_and_leaves_backbone_untouched(
        self, method_name: str, arch: str, config_kwargs: dict[str, Any]
    ) -> None:
        model = tiny_model(arch)
        before = list(model.state_dict())
        kwargs = {**config_kwargs, "modified_modules": ["no_such_module_anywhere"]}
        with pytest.raises(ModuleNotFoundInStructureError, match="no_such_module_anywhere"):
            get_method(method_name).model_cls(model, **kwargs)
        assert list(model.state_dict()) == before
