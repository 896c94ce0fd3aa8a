"""LoRA on the experts of sparse mixture-of-experts decoders, on transformers 5 (stacked 3-D expert weights) and 4.57
(a list of expert MLPs): one line of user code, the same weights changed, each token through its own experts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from opendelta import AutoDeltaModel, LoraModel
from opendelta.errors import CheckpointError, DeltaConfigError, DeltaStateError, UnsupportedTargetError
from opendelta.plugin_api import stacked_parameters
from opendelta.routing import route_rows
from opendelta.testing import perturb
from opendelta.testing.tiny_models import MOE_ARCHITECTURES, TASK_HEADS, tiny_inputs, tiny_model
from opendelta_lora.expert_layer import ExpertLoraLayer
from opendelta_lora.layer import LoraLayer

EXPERTS = {"modified_modules": ["ff.experts"], "common_structure": True, "lora_r": 2, "lora_alpha": 6}


def _causal_lm(arch: str) -> nn.Module:
    return tiny_model(arch, TASK_HEADS[arch][1])


def _logits(model: nn.Module, arch: str) -> torch.Tensor:
    with torch.no_grad():
        return model(**tiny_inputs(arch)).logits


def _stores_stacked_experts(model: nn.Module) -> bool:
    return any(stacked_parameters(m) for m in model.modules())


def _bare_with_updates_folded_by_hand(arch: str, model: nn.Module, delta_model: LoraModel) -> nn.Module:
    """A fresh backbone (the same weights: same seed) whose expert weights are ``W_e + scale * B_e A_e``, computed
    here independently of the layers' own code (an einsum over experts, or ``B A`` of each expert's linear layer)."""
    names = {id(m): n for n, m in model.named_modules()}
    reference = _causal_lm(arch)
    with torch.no_grad():
        for placement in delta_model.placements():
            delta, host = placement.insertion.delta, reference.get_submodule(names[id(placement.insertion.host)])
            if isinstance(delta, ExpertLoraLayer):
                getattr(host, delta.parameter).add_(
                    torch.einsum("eor,eri->eoi", delta.lora_B, delta.lora_A) * delta.scaling
                )
            else:
                host.weight.add_(delta.lora_B @ delta.lora_A * delta.scaling)
    return reference


@pytest.mark.parametrize("arch", MOE_ARCHITECTURES)
def test_the_experts_get_one_update_per_expert_weight_on_either_line(arch):
    model = _causal_lm(arch)
    delta_model = LoraModel(model, **EXPERTS)
    per_block = {t.name.split(".experts")[0] for t in delta_model.targets}
    assert len(per_block) == 2  # both blocks
    if _stores_stacked_experts(model):  # transformers 5: gate_up_proj and down_proj of each block's experts
        assert sorted({t.parameter for t in delta_model.targets}) == ["down_proj", "gate_up_proj"]
        assert len(delta_model.targets) == 4 and all(isinstance(d, ExpertLoraLayer) for d in delta_model.deltas)
        assert all(d.lora_A.shape[0] == 4 and d.lora_B.shape[0] == 4 for d in delta_model.deltas)  # 4 experts
    else:  # 4.57: three linear layers in each of 4 experts of 2 blocks
        assert len(delta_model.targets) == 24 and all(isinstance(d, LoraLayer) for d in delta_model.deltas)


@pytest.mark.parametrize("arch", MOE_ARCHITECTURES)
def test_outputs_equal_a_model_whose_expert_weights_carry_the_updates(arch):
    model = _causal_lm(arch)
    delta_model = LoraModel(model, **EXPERTS)
    perturb(delta_model, seed=1, scale=0.5)
    changed = _logits(model, arch)
    reference = _bare_with_updates_folded_by_hand(arch, model, delta_model)
    delta_model.detach()
    assert not torch.allclose(changed, _logits(model, arch), atol=1e-4), "the update changed nothing"
    torch.testing.assert_close(changed, _logits(reference, arch), rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", MOE_ARCHITECTURES)
def test_the_stored_expert_weights_are_never_written_and_detach_is_exact(arch):
    model = _causal_lm(arch)
    bare, before = _logits(model, arch), {n: p.detach().clone() for n, p in model.named_parameters()}
    pointers, keys = {n: p.data_ptr() for n, p in model.named_parameters()}, list(model.state_dict())
    delta_model = LoraModel(model, **EXPERTS)
    perturb(delta_model, seed=2)
    _logits(model, arch)
    for name, param in model.named_parameters():
        if "lora" not in name:
            assert torch.equal(param, before[name]) and param.data_ptr() == pointers[name], name
    delta_model.detach()
    assert list(model.state_dict()) == keys
    assert all(torch.equal(p, before[n]) and p.data_ptr() == pointers[n] for n, p in model.named_parameters())
    assert torch.equal(_logits(model, arch), bare)
    assert not any(k in m.__dict__ for m in model.modules() for k in ("gate_up_proj", "down_proj"))


@pytest.mark.parametrize("arch", MOE_ARCHITECTURES)
def test_merge_is_exact_and_unmerge_takes_the_update_out(arch):
    model = _causal_lm(arch)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    delta_model = LoraModel(model, **EXPERTS)
    perturb(delta_model, seed=3, scale=0.5)
    unmerged = _logits(model, arch)
    assert delta_model.merge() == len(delta_model.targets)
    merged_keys = list(model.state_dict())
    assert not any("lora" in k for k in merged_keys)  # merged: the bare model's code and parameters only
    torch.testing.assert_close(_logits(model, arch), unmerged, rtol=0, atol=1e-5)
    delta_model.unmerge()
    torch.testing.assert_close(_logits(model, arch), unmerged, rtol=0, atol=1e-5)
    delta_model.detach()
    for name, param in model.named_parameters():  # subtracted again: to float rounding, as every merge in core
        torch.testing.assert_close(param, original[name], rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", MOE_ARCHITECTURES)
def test_save_and_load_round_trip(arch, tmp_path):
    model = _causal_lm(arch)
    delta_model = LoraModel(model, **EXPERTS)
    delta_model.freeze_module()
    perturb(delta_model, seed=4)
    expected = _logits(model, arch)
    delta_model.save_finetuned(tmp_path / "experts")
    fresh = _causal_lm(arch)
    loaded = AutoDeltaModel.from_finetuned(tmp_path / "experts", backbone_model=fresh)
    assert len(loaded.targets) == len(delta_model.targets)
    assert torch.equal(_logits(fresh, arch), expected)


@pytest.mark.parametrize("arch", MOE_ARCHITECTURES)
def test_gradients_reach_every_expert_update_and_no_frozen_weight(arch):
    model = _causal_lm(arch)
    delta_model = LoraModel(model, **EXPERTS)
    delta_model.freeze_module()
    perturb(delta_model, seed=5)
    model.train()
    model(**tiny_inputs(arch)).logits.pow(2).mean().backward()
    for name, param in model.named_parameters():
        if "lora" in name:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name


@pytest.mark.parametrize("arch", ["qwen2_moe", "olmoe"])
def test_the_real_name_designates_the_same_experts(arch):
    by_common = LoraModel(_causal_lm(arch), **EXPERTS)
    by_real = LoraModel(_causal_lm(arch), modified_modules=["mlp.experts"], lora_r=2, lora_alpha=6)
    assert [(t.name, t.parameter) for t in by_real.targets] == [(t.name, t.parameter) for t in by_common.targets]


def test_dropout_on_stacked_expert_weights_is_refused_by_name():
    model = _causal_lm("mixtral")
    if not _stores_stacked_experts(model):
        pytest.skip("transformers 4.57's experts are linear layers: dropout on their branch input applies")
    before = list(model.state_dict())
    with pytest.raises(DeltaConfigError, match=r"lora_dropout=0.1 .*experts\.gate_up_proj"):
        LoraModel(model, **EXPERTS, lora_dropout=0.1)
    assert list(model.state_dict()) == before and not any(getattr(m, "_opendelta_slots", None) for m in model.modules())


def test_a_router_that_is_no_linear_layer_is_refused_by_name():
    model = _causal_lm("mixtral")
    if not _stores_stacked_experts(model):
        pytest.skip("transformers 4.57's router is an nn.Linear, which LoRA modifies")
    with pytest.raises(UnsupportedTargetError, match="MixtralTopKRouter"):
        LoraModel(model, modified_modules=["ff.router"], common_structure=True)


def test_rows_are_not_routed_through_an_update_of_the_weights_every_row_shares():
    model = _causal_lm("olmoe")
    if not _stores_stacked_experts(model):
        pytest.skip("transformers 4.57's experts are linear layers, routed per row like any LoRA")
    delta_model = LoraModel(model, **EXPERTS)
    with pytest.raises(DeltaStateError, match="stacked expert weights"), route_rows(model, [delta_model, None]):
        pass


def test_save_peft_refuses_stacked_expert_weights_by_name(tmp_path):
    model = _causal_lm("qwen3_moe")
    if not _stores_stacked_experts(model):
        pytest.skip("transformers 4.57's experts are linear layers, which save_peft exports")
    delta_model = LoraModel(model, **EXPERTS)
    with pytest.raises(CheckpointError, match=r"stacked expert weights \(model\.layers\.0\.mlp\.experts\.gate_up_proj"):
        delta_model.save_peft(tmp_path / "peft")
    assert not (tmp_path / "peft").exists()
