"""PEFT's ``modules_to_save`` as per-task heads, checked against the REAL peft library.

A PEFT adapter's saved head loads as the ``LoraModel``'s own copy (as PEFT keeps it beside the original), so two
PEFT tasks with different heads share one backbone; a ``LoraModel`` with ``modules_to_save`` exports its copies.
"""

from __future__ import annotations

import json

import pytest
import torch

from opendelta import route_rows
from opendelta.testing import perturb, tiny_inputs, tiny_model
from opendelta_lora import LoraModel, load_peft_adapter, save_peft_adapter

peft = pytest.importorskip("peft")

ATOL = 1e-5
"""PEFT computes ``lora_B(lora_A(x)) * s``, LoraLayer a fused ``addmm``: equal to float32 rounding."""
CLS = "BertForSequenceClassification"


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def peft_task(folder, seed, options):
    """A PEFT LoRA with its own head on tiny BERT, every trainable tensor moved, saved; returns its logits."""
    model = peft.get_peft_model(tiny_model("bert", CLS), peft.LoraConfig(r=4, lora_alpha=8, **options))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.3)
    model.eval().save_pretrained(folder)
    return logits(model, tiny_inputs("bert", batch=3))


def test_two_peft_tasks_with_their_own_heads_share_one_backbone(tmp_path):
    inputs = tiny_inputs("bert", batch=3)
    first = peft_task(tmp_path / "a", 1, {"target_modules": ["query"], "modules_to_save": ["classifier"]})
    second = peft_task(tmp_path / "b", 2, {"target_modules": ["value"], "task_type": "SEQ_CLS"})  # adds classifier
    backbone = tiny_model("bert", CLS)
    bare = logits(backbone, inputs)
    tasks = [load_peft_adapter(tmp_path / name, backbone) for name in ("a", "b")]
    assert [t.config.modules_to_save for t in tasks] == [["classifier"], ["classifier"]]
    assert all(set(t.task_heads()) == {"classifier"} for t in tasks)
    for task, expected in zip(tasks, (first, second), strict=True):
        for other in tasks:
            other.detach()
        task.attach()
        torch.testing.assert_close(logits(backbone, inputs), expected, atol=ATOL, rtol=0)
    tasks[0].attach()
    with route_rows(backbone, [tasks[1], tasks[0], None]):
        routed = logits(backbone, inputs)
    torch.testing.assert_close(routed[0], second[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(routed[1], first[1], atol=ATOL, rtol=0)
    torch.testing.assert_close(routed[2], bare[2], atol=ATOL, rtol=0)  # a row alone may round otherwise
    for task in tasks:
        task.detach()
    assert torch.equal(logits(backbone, inputs), bare)  # the backbone's own head was never written


def test_a_lora_model_with_a_head_exports_it_as_peft_modules_to_save(tmp_path):
    inputs = tiny_inputs("bert", batch=2)
    backbone = tiny_model("bert", CLS)
    delta_model = LoraModel(backbone, modified_modules=["query"], modules_to_save=["classifier"])
    perturb(delta_model, seed=3, scale=0.5)
    expected = logits(backbone, inputs)
    save_peft_adapter(delta_model, tmp_path / "adapter", task_type="SEQ_CLS")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["modules_to_save"] == ["classifier"]
    peft_model = peft.PeftModel.from_pretrained(tiny_model("bert", CLS), tmp_path / "adapter").eval()
    torch.testing.assert_close(logits(peft_model, inputs), expected, atol=ATOL, rtol=0)
    again = load_peft_adapter(tmp_path / "adapter", tiny_model("bert", CLS))
    torch.testing.assert_close(logits(again.backbone_model, inputs), expected, atol=ATOL, rtol=0)
