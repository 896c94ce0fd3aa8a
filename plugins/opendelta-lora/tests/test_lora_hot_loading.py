"""LoRA's ``max_rank``: one allocation that hot-loads any rank up to it, exactly and without recompiling.

Every checkpoint is compared with the same checkpoint loaded on its own (``from_finetuned`` on a fresh backbone);
PEFT adapters with the real ``peft`` library's outputs.
"""

from __future__ import annotations

import pytest
import torch

from opendelta import CheckpointError, DeltaConfigError, DeltaStateError
from opendelta.testing import model_output_tensor, perturb, tiny_inputs, tiny_model
from opendelta_lora import LoraModel

ATOL = 1e-5


def run(model):
    with torch.no_grad():
        return model_output_tensor(model(**tiny_inputs("bert")))


def tenant(tmp_path, name, seed, **config):
    """A trained LoRA saved from its own tiny BERT, and that model's outputs."""
    model = tiny_model("bert")
    delta_model = LoraModel(model, **config)
    perturb(delta_model, seed=seed)
    delta_model.freeze_module(exclude=["deltas"])
    return delta_model.save_finetuned(tmp_path / name), run(model)


def test_max_rank_loads_every_lower_rank_zero_padded_with_its_own_scaling(tmp_path):
    model = tiny_model("bert")
    delta_model = LoraModel(model, lora_r=8, max_rank=8)
    pointers = {n: t.data_ptr() for n, t in delta_model.delta_state_dict().items()}
    cases = [
        ("r2", {"lora_r": 2, "lora_alpha": 4}),
        ("r8", {"lora_r": 8, "lora_alpha": 32}),
        ("r4-rslora", {"lora_r": 4, "lora_alpha": 8, "use_rslora": True}),
    ]
    for seed, (name, config) in enumerate(cases, start=1):
        folder, expected = tenant(tmp_path, name, seed, **config)
        delta_model.load_weights(folder)
        assert torch.allclose(run(model), expected, atol=ATOL), name
        rank = config["lora_r"]
        for layer in delta_model.deltas:
            assert not layer.lora_A[rank:].any() and not layer.lora_B[:, rank:].any(), name
        assert (delta_model.config.lora_r, delta_model.config.lora_alpha) == (rank, config["lora_alpha"])
    assert {n: t.data_ptr() for n, t in delta_model.delta_state_dict().items()} == pointers


def test_a_rank_above_max_rank_is_refused_by_name_and_nothing_changes(tmp_path):
    folder, _ = tenant(tmp_path, "r8", 1, lora_r=8)
    delta_model = LoraModel(tiny_model("bert"), lora_r=2, max_rank=4)
    before = {n: t.clone() for n, t in delta_model.delta_state_dict().items()}
    with pytest.raises(CheckpointError, match=r"lora_r=8 is above this LoRA's max_rank=4.*max_rank >= 8"):
        delta_model.load_weights(folder)
    assert all(torch.equal(t, before[n]) for n, t in delta_model.delta_state_dict().items())
    assert delta_model.config.lora_r == 2


def test_without_max_rank_another_rank_or_alpha_is_refused_naming_max_rank(tmp_path):
    delta_model = LoraModel(tiny_model("bert"), lora_r=4)
    folder, _ = tenant(tmp_path, "alpha", 1, lora_r=4, lora_alpha=32)
    with pytest.raises(CheckpointError, match=r"lora_alpha: checkpoint 32 vs this model 16"):
        delta_model.load_weights(folder)
    folder, _ = tenant(tmp_path, "rank", 2, lora_r=2, lora_alpha=16)
    with pytest.raises(CheckpointError, match=r"lora_r: checkpoint 2 vs this model 4"):
        delta_model.load_weights(folder)
    folder, expected = tenant(tmp_path, "same", 3, lora_r=4, lora_dropout=0.1)  # dropout: training only
    delta_model.load_weights(folder)
    assert torch.allclose(run(delta_model.backbone_model), expected, atol=ATOL)


def test_max_rank_is_refused_below_lora_r_and_where_it_does_not_apply():
    with pytest.raises(DeltaConfigError, match="max_rank=2 is below lora_r=4"):
        LoraModel(tiny_model("bert"), lora_r=4, max_rank=2)
    with pytest.raises(DeltaConfigError, match="plain LoRA layers only, not to DoRA"):
        LoraModel(tiny_model("bert"), lora_r=4, max_rank=8, use_dora=True)


def test_a_merged_lora_refuses_to_hot_load(tmp_path):
    folder, _ = tenant(tmp_path, "a", 1, lora_r=4)
    delta_model = LoraModel(tiny_model("bert"), lora_r=4)
    delta_model.merge()
    with pytest.raises(DeltaStateError, match=r"merged.*unmerge\(\) first"):
        delta_model.load_weights(folder)


def test_training_a_max_rank_lora_keeps_its_rank():
    model = tiny_model("bert")
    delta_model = LoraModel(model, lora_r=2, max_rank=6)
    delta_model.freeze_module(exclude=["deltas"])
    perturb_b = [layer.lora_B for layer in delta_model.deltas]
    with torch.no_grad():
        for b in perturb_b:
            b[:, :2].normal_()
    model.train()
    model_output_tensor(model(**tiny_inputs("bert"))).pow(2).mean().backward()
    for layer in delta_model.deltas:
        assert layer.lora_A.grad[:2].any() and not layer.lora_A.grad[2:].any()
        assert layer.lora_B.grad[:, :2].any() and not layer.lora_B.grad[:, 2:].any()


def test_a_saved_max_rank_lora_rebuilds_exactly_and_exports_its_rank_to_peft(tmp_path):
    peft = pytest.importorskip("peft")
    model = tiny_model("bert")
    delta_model = LoraModel(model, lora_r=8, max_rank=8)
    folder, expected = tenant(tmp_path, "r4", 1, lora_r=4, lora_alpha=4)
    delta_model.load_weights(folder)
    delta_model.freeze_module(exclude=["deltas"])
    saved = delta_model.save_finetuned(tmp_path / "resaved")
    rebuilt = LoraModel.from_finetuned(saved, tiny_model("bert"))
    assert (rebuilt.config.lora_r, rebuilt.config.max_rank) == (4, 8)
    assert torch.allclose(run(rebuilt.backbone_model), expected, atol=ATOL)
    exported = delta_model.save_peft(tmp_path / "peft")
    peft_model = peft.PeftModel.from_pretrained(tiny_model("bert"), exported)
    assert peft_model.peft_config["default"].r == 4
    assert torch.allclose(run(peft_model), expected, atol=ATOL)


def test_a_peft_adapter_folder_hot_loads_into_a_max_rank_lora(tmp_path):
    peft = pytest.importorskip("peft")
    trained = peft.get_peft_model(
        tiny_model("bert"), peft.LoraConfig(r=2, lora_alpha=6, lora_dropout=0.1, target_modules=["query", "value"])
    )
    with torch.no_grad():
        for name, param in trained.named_parameters():
            if "lora_" in name:
                param.normal_(std=0.2)
    expected = run(trained.eval())  # get_peft_model trains: its dropout would be on
    trained.save_pretrained(tmp_path / "adapter")
    model = tiny_model("bert")
    delta_model = LoraModel(model, lora_r=4, max_rank=4)
    delta_model.load_weights(tmp_path / "adapter")
    assert torch.allclose(run(model), expected, atol=ATOL)


def test_compiled_model_hot_loads_other_ranks_without_a_new_graph(tmp_path):
    from torch._dynamo.testing import CompileCounter

    first, first_out = tenant(tmp_path, "a", 1, lora_r=4, lora_alpha=8)
    second, second_out = tenant(tmp_path, "b", 2, lora_r=2, lora_alpha=16, use_rslora=True)
    same_rank, same_out = tenant(tmp_path, "c", 3, lora_r=4, lora_alpha=8)
    torch._dynamo.reset()
    model = tiny_model("bert")
    delta_model = LoraModel(model, lora_r=4, max_rank=4)
    delta_model.load_weights(first)
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    inputs = tiny_inputs("bert")
    outputs = []
    with torch.no_grad():
        outputs.append(model_output_tensor(compiled(**inputs)))
        graphs = counter.frame_count
        for folder in (second, same_rank):
            delta_model.load_weights(folder)
            outputs.append(model_output_tensor(compiled(**inputs)))
    assert graphs >= 1 and counter.frame_count == graphs, "no recompile: only values changed"
    for out, expected in zip(outputs, [first_out, second_out, same_out], strict=True):
        assert torch.allclose(out, expected, atol=ATOL)


def test_two_max_rank_loras_of_hot_loaded_ranks_route_per_row(tmp_path):
    from opendelta import route_rows

    first, _ = tenant(tmp_path, "a", 1, lora_r=4, lora_alpha=8)
    second, _ = tenant(tmp_path, "b", 2, lora_r=2, lora_alpha=16, use_rslora=True)
    model = tiny_model("bert")
    tenants = [LoraModel(model, lora_r=4, max_rank=4), LoraModel(model, lora_r=4, max_rank=4)]
    tenants[0].load_weights(first)
    tenants[1].load_weights(second)
    inputs = tiny_inputs("bert")
    with torch.no_grad():
        with route_rows(model, tenants):
            routed = model_output_tensor(model(**inputs))
        alone = []
        for row in range(len(tenants)):
            tenants[1 - row].detach()
            alone.append(model_output_tensor(model(**{k: v[row : row + 1] for k, v in inputs.items()})))
            tenants[1 - row].attach()
    assert torch.allclose(routed, torch.cat(alone), atol=ATOL)
