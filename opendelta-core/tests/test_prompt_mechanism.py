"""The soft-prompt mechanism in core, with a test-only prompt: placement, shapes, masks, detach."""

import pytest
import torch
from torch import nn

from opendelta.errors import UnsupportedTargetError
from opendelta.insertion import SLOTS_ATTR
from opendelta.prompt import input_stack, insert_soft_prompt
from opendelta.testing import ARCHITECTURES, model_output_tensor, tiny_inputs, tiny_model


class Prompt(nn.Module):
    def __init__(self, count, hidden):
        super().__init__()
        self.num_tokens = count
        self.embeds = nn.Parameter(torch.randn(count, hidden, generator=torch.Generator().manual_seed(0)))

    def prompt(self):
        return self.embeds


def place(model):
    _name, stack, outer = input_stack(model)
    hidden = stack.get_input_embeddings().weight.shape[1]
    return insert_soft_prompt(stack, Prompt(3, hidden), outer=model.get_submodule(outer) if outer is not None else None)


def run(model, arch):
    with torch.no_grad():
        return model_output_tensor(model(**tiny_inputs(arch)))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_prompt_changes_outputs_keeps_shapes_and_detaches_exactly(arch):
    model = tiny_model(arch)
    bare = run(model, arch)
    insertion = place(model)
    prompted = run(model, arch)
    assert prompted.shape == bare.shape and not torch.allclose(prompted, bare)
    insertion.detach()
    assert torch.equal(run(model, arch), bare)
    assert not any(hasattr(m, SLOTS_ATTR) for m in model.modules())


def test_the_input_stack_is_the_innermost_module_that_embeds_tokens():
    assert input_stack(tiny_model("opt", "OPTForCausalLM"))[:1] == ("model.decoder",)
    assert input_stack(tiny_model("bart"))[0::2] == ("model.encoder", "model")
    assert input_stack(tiny_model("bert", "BertModel"))[0] == ""


def test_a_module_without_a_transformers_model_is_refused_by_name():
    with pytest.raises(UnsupportedTargetError, match="Sequential"):
        input_stack(nn.Sequential(nn.Linear(2, 2)))
