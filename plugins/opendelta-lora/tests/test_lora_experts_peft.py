"""LoRA on stacked expert weights computes what PEFT's ``target_parameters`` computes, checked against the REAL peft.

PEFT wraps each targeted 3-D parameter in a ``ParamWrapper`` whose ``lora_A`` is ``[experts * r, in]`` (expert-major
rows) and ``lora_B`` ``[out, r * experts]`` (rank-major columns). The same numbers, laid out as OpenDelta's
``[experts, r, in]`` and ``[experts, out, r]``, must give the same outputs: the per-expert update and its routing
are the same math, whatever each library's code path.
"""

from __future__ import annotations

import copy

import pytest
import torch

from opendelta import LoraModel
from opendelta.plugin_api import stacked_parameters
from opendelta.testing.tiny_models import MOE_ARCHITECTURES, TASK_HEADS, tiny_inputs, tiny_model
from opendelta_lora.expert_layer import ExpertLoraLayer

peft = pytest.importorskip("peft")

R, ALPHA = 2, 6
ATOL = 1e-5


def _experts_of(model: torch.nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if stacked_parameters(module)]


@pytest.mark.parametrize("arch", MOE_ARCHITECTURES)
def test_outputs_equal_peft_target_parameters_from_the_same_weights(arch):
    model = tiny_model(arch, TASK_HEADS[arch][1])
    if not _experts_of(model):
        pytest.skip("transformers 4.57's experts are linear layers: PEFT's target_modules, checked elsewhere")
    config = peft.LoraConfig(
        r=R,
        lora_alpha=ALPHA,
        target_modules=[],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    )
    peft_model = peft.get_peft_model(copy.deepcopy(model), config)
    generator = torch.Generator().manual_seed(0)
    wrappers = {}
    with torch.no_grad():
        for name, module in peft_model.named_modules():
            if isinstance(module, peft.tuners.lora.layer.ParamWrapper):
                for factor in (module.lora_A["default"].weight, module.lora_B["default"].weight):
                    factor.copy_(torch.randn(factor.shape, generator=generator) * 0.3)
                experts_name = name.removeprefix("base_model.model.").removesuffix(".base_layer")
                wrappers[(experts_name, module.parameter_name)] = module
    with torch.no_grad():
        expected = peft_model(**tiny_inputs(arch)).logits

    delta_model = LoraModel(model, modified_modules=["ff.experts"], common_structure=True, lora_r=R, lora_alpha=ALPHA)
    names = {id(m): n for n, m in model.named_modules()}
    placed = 0
    with torch.no_grad():
        for placement in delta_model.placements():
            delta = placement.insertion.delta
            assert isinstance(delta, ExpertLoraLayer)
            wrapper = wrappers[(names[id(placement.insertion.host)], delta.parameter)]
            experts, out = delta.layout.num_experts, delta.layout.out_features
            delta.lora_A.copy_(wrapper.lora_A["default"].weight.reshape(experts, R, -1))
            delta.lora_B.copy_(wrapper.lora_B["default"].weight.reshape(out, R, experts).permute(2, 0, 1))
            placed += 1
        assert placed == len(wrappers) == 4
        ours = model(**tiny_inputs(arch)).logits
        delta_model.detach()
        bare = model(**tiny_inputs(arch)).logits
    assert (expected - bare).abs().max() > 1e-3, "PEFT's update changed nothing: the comparison would prove nothing"
    assert (ours - expected).abs().max() <= ATOL
