"""The prefix mechanism in core, with a test-only prefix: both placements agree, detach is exact, errors name things."""

import pytest
import torch
from torch import nn

import opendelta.prefix
from opendelta.errors import DeltaStateError, UnsupportedTargetError
from opendelta.insertion import SLOTS_ATTR
from opendelta.prefix import attention_parts, insert_prefix
from opendelta.testing import ARCHITECTURES, model_output_tensor, tiny_inputs, tiny_model


class Prefix(nn.Module):
    def __init__(self, count, key_features, value_features, seed):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.num_tokens = count
        self.keys = nn.Parameter(torch.randn(count, key_features, generator=generator))
        self.values = nn.Parameter(torch.randn(count, value_features, generator=generator))

    def key_value(self):
        return self.keys, self.values


def self_attentions(model):
    from opendelta.registry import structure_for_model

    common = structure_for_model(model).common_names(model)
    return [real for real, names in common.items() if any(n.name.split(".")[-1] == "attn" for n in names)]


def place_all(model, backend=None):
    insertions = []
    for seed, name in enumerate(self_attentions(model)):
        parts = attention_parts(model, name, "Test")
        prefix = Prefix(3, parts.key_features, parts.value_features, seed)
        insertions.append(
            insert_prefix(
                model.get_submodule(name),
                prefix,
                key=parts.key,
                value=parts.value,
                relative_bias=parts.relative_bias,
                relative_positions=parts.relative_positions,
                backend=backend,
            )
        )
    return insertions


def run(model, arch):
    with torch.no_grad():
        return model_output_tensor(model(**tiny_inputs(arch)))


@pytest.mark.parametrize("arch", [*ARCHITECTURES, "llama", "mixtral"])  # rotary decoders: rows get no rotation
def test_interface_and_rows_placements_agree_and_detach_exactly(arch):
    bare_model = tiny_model(arch)
    bare = run(bare_model, arch)
    outputs = []
    for backend in ("rows", None):
        model = tiny_model(arch)
        insertions = place_all(model, backend)
        outputs.append(run(model, arch))
        for insertion in insertions:
            insertion.detach()
        assert torch.equal(run(model, arch), bare)
        assert not any(hasattr(m, SLOTS_ATTR) for m in model.modules())
    assert not torch.allclose(outputs[0], bare)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)


def test_the_backend_follows_how_the_attention_computes():
    gpt2 = tiny_model("gpt2")
    assert opendelta.prefix.attention_backend(gpt2.transformer.h[0].attn) == "interface"
    deberta = tiny_model("deberta-v2")
    assert opendelta.prefix.attention_backend(deberta.deberta.encoder.layer[0].attention) == "rows"


def test_the_config_names_our_implementation_only_while_the_attention_runs():
    model = tiny_model("gpt2")
    place_all(model)
    before = model.config._attn_implementation
    run(model, "gpt2")
    assert model.config._attn_implementation == before


def test_a_second_prefix_on_one_attention_is_refused():
    model = tiny_model("bert")
    place_all(model)
    with pytest.raises(DeltaStateError, match="already carries a prefix"):
        place_all(model)


def test_attention_parts_name_the_model_and_the_module_when_they_cannot_help():
    model = tiny_model("bert")
    with pytest.raises(UnsupportedTargetError, match=r"BertOutput at bert\.encoder\.layer\.0\.output of Bert"):
        attention_parts(model, "bert.encoder.layer.0.output", "Test")
    parts = attention_parts(tiny_model("gpt2"), "transformer.h.0.attn", "Test")
    assert parts.key[0] is parts.value[0] and parts.key[1].tolist() == list(range(32, 64))
    t5 = attention_parts(tiny_model("t5"), "encoder.block.0.layer.0", "Test")
    assert len(t5.relative_bias) == 1 and t5.relative_bias[0][1] == -2
    assert attention_parts(tiny_model("t5"), "encoder.block.1.layer.0", "Test").relative_bias == ()
