"""BitFit's own behaviour: its math against hand computations, the modules its defaults cover, and refusals."""

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from opendelta import (
    AutoDeltaConfig,
    AutoDeltaModel,
    DeltaConfigError,
    ModuleNotFoundInStructureError,
    UnsupportedTargetError,
    count_parameters,
)
from opendelta.testing import model_output_tensor, perturb, tiny_inputs, tiny_model
from opendelta_bitfit import BiasDelta, BitFitConfig, BitFitModel


def _out_size(module):
    """Output size read independently of core's helpers: Linear out_features, Conv1D weight [in, out], norm size."""
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, Conv1D):
        return module.weight.shape[1]
    return module.weight.shape[0]


# ------------------------------------------------------------------------------------------------------- the math
def test_linear_with_bias_gives_x_wt_plus_b_plus_delta():
    model = tiny_model("bert")
    query = model.bert.encoder.layer[0].attention.self.query
    x = torch.randn(2, 5, query.in_features)
    delta_model = BitFitModel(backbone_model=model, modified_modules=["0.attention.self.query"])
    perturb(delta_model)
    delta = query.bitfit.bias
    assert delta.shape == (query.out_features,) and torch.count_nonzero(delta) == query.out_features
    expected = x @ query.weight.t() + query.bias + delta
    torch.testing.assert_close(query(x), expected)


def test_conv1d_weight_stored_in_out_gives_x_w_plus_b_plus_delta():
    model = tiny_model("gpt2")
    c_fc = model.transformer.h[0].mlp.c_fc  # Conv1D 32 -> 37: a transposed weight would not even multiply
    x = torch.randn(2, 4, c_fc.weight.shape[0])
    BitFitModel(backbone_model=model, modified_modules=["h.0.mlp.c_fc"])
    with torch.no_grad():
        c_fc.bitfit.bias.copy_(torch.linspace(-1, 1, 37))
    assert c_fc.bitfit.bias.shape == (37,)
    torch.testing.assert_close(c_fc(x), x @ c_fc.weight + c_fc.bias + torch.linspace(-1, 1, 37))


def test_t5_bias_less_linears_and_t5_layer_norm_get_the_bias_they_lack():
    model = tiny_model("t5")
    attention = model.encoder.block[0].layer[0]
    q, norm = attention.SelfAttention.q, attention.layer_norm
    assert q.bias is None and not hasattr(norm, "bias")
    delta_model = BitFitModel(backbone_model=model, modified_modules=["encoder.block.0.layer.0"])
    assert {t.name.rsplit(".", 1)[-1] for t in delta_model.targets} == {"q", "k", "v", "o", "layer_norm"}
    perturb(delta_model)
    x = torch.randn(2, 3, q.in_features)
    torch.testing.assert_close(q(x), x @ q.weight.t() + q.bitfit.bias)
    rms = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    torch.testing.assert_close(norm(x), norm.weight * rms + norm.bitfit.bias)
    assert q.bias is None and [n for n, _ in q.named_parameters()] == ["weight", "bitfit.bias"]  # no bias created


def test_delta_gets_exactly_the_gradient_the_layers_own_bias_gets():
    model = tiny_model("bert")
    delta_model = BitFitModel(backbone_model=model)
    perturb(delta_model)
    model_output_tensor(model(**tiny_inputs("bert"))).pow(2).mean().backward()
    with_bias = [t.module for t in delta_model.targets if getattr(t.module, "bias", None) is not None]
    assert len(with_bias) == len(delta_model.targets) == 16
    for module in with_bias:
        assert module.bias.grad.abs().sum() > 0
        torch.testing.assert_close(module.bitfit.bias.grad, module.bias.grad)


def test_output_dtype_is_kept_under_autocast():
    model = tiny_model("bert")
    query = model.bert.encoder.layer[0].attention.self.query
    BitFitModel(backbone_model=model, modified_modules=["0.attention.self.query"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert query(torch.randn(1, 2, query.in_features)).dtype == torch.bfloat16
    assert query.bitfit.bias.dtype == torch.float32


def test_bias_follows_the_dtype_of_the_layer():
    model = tiny_model("bert").to(torch.bfloat16)
    delta_model = BitFitModel(backbone_model=model)
    assert {p.dtype for p in delta_model.parameters()} == {torch.bfloat16}


# ------------------------------------------------------------------------------------------------ what is modified
def test_bert_defaults_cover_attention_feed_forward_and_their_layer_norms():
    names = [t.name for t in BitFitModel(backbone_model=tiny_model("bert")).targets]
    per_layer = [
        "attention.self.query",
        "attention.self.key",
        "attention.self.value",
        "attention.output.dense",
        "attention.output.LayerNorm",
        "intermediate.dense",  # common name ff.w1: under the ff scope, outside BertOutput (the module named ff)
        "output.dense",
        "output.LayerNorm",
    ]
    assert names == [f"bert.encoder.layer.{i}.{p}" for i in range(2) for p in per_layer]


def test_bert_masked_lm_default_also_covers_the_lm_head_projection():
    model = tiny_model("bert", "BertForMaskedLM")
    names = [t.name for t in BitFitModel(backbone_model=model).targets]
    assert len(names) == 17 and names[-1] == "cls.predictions.decoder"
    assert "cls.predictions.transform.dense" not in names and "bert.embeddings.LayerNorm" not in names


def test_gpt2_defaults_cover_every_conv1d_the_fused_c_attn_whole_and_every_layer_norm():
    model = tiny_model("gpt2", "GPT2LMHeadModel")
    delta_model = BitFitModel(backbone_model=model)
    per_layer = ["ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"]
    expected = [f"transformer.h.{i}.{p}" for i in range(2) for p in per_layer] + ["transformer.ln_f", "lm_head"]
    assert [t.name for t in delta_model.targets] == expected
    assert all(t.parts is None for t in delta_model.targets)
    assert model.transformer.h[0].attn.c_attn.bitfit.bias.shape == (96,)  # q, k and v
    assert model.lm_head.bias is None and model.lm_head.bitfit.bias.shape == (model.config.vocab_size,)


def test_t5_defaults_cover_self_attention_feed_forward_every_layer_norm_and_the_lm_head():
    model = tiny_model("t5")
    names = {t.name for t in BitFitModel(backbone_model=model).targets}
    encoder = {f"encoder.block.{i}.layer.0.SelfAttention.{p}" for i in range(2) for p in "qkvo"}
    encoder |= {f"encoder.block.{i}.layer.1.DenseReluDense.{p}" for i in range(2) for p in ("wi", "wo")}
    encoder |= {f"encoder.block.{i}.layer.{j}.layer_norm" for i in range(2) for j in range(2)}
    decoder = {f"decoder.block.{i}.layer.0.SelfAttention.{p}" for i in range(2) for p in "qkvo"}
    decoder |= {f"decoder.block.{i}.layer.2.DenseReluDense.{p}" for i in range(2) for p in ("wi", "wo")}
    decoder |= {f"decoder.block.{i}.layer.{j}.layer_norm" for i in range(2) for j in range(3)}
    final = {"encoder.final_layer_norm", "decoder.final_layer_norm", "lm_head"}
    assert names == encoder | decoder | final  # cross-attention (common name crossattn) keeps only its layer norm


def test_bart_feed_forward_scope_covers_fc1_and_fc2_although_no_module_is_named_ff():
    names = {t.name for t in BitFitModel(backbone_model=tiny_model("bart")).targets}
    for stack in ("encoder", "decoder"):
        for i in range(2):
            assert {f"model.{stack}.layers.{i}.fc1", f"model.{stack}.layers.{i}.fc2"} <= names
    assert not any("encoder_attn." in n for n in names) and "model.decoder.layers.0.encoder_attn_layer_norm" in names


@pytest.mark.parametrize("kind, head", [("bert", "BertForMaskedLM"), ("gpt2", "GPT2LMHeadModel"), ("t5", None)])
def test_delta_parameter_count_is_the_sum_of_the_modified_layers_output_sizes(kind, head):
    model = tiny_model(kind, head) if head else tiny_model(kind)
    delta_model = BitFitModel(backbone_model=model)
    expected = sum(_out_size(t.module) for t in delta_model.targets)
    assert count_parameters(model).delta == expected == sum(p.numel() for p in delta_model.parameters())


def test_a_fused_part_named_through_common_names_gets_a_bias_on_that_slice_only():
    model = tiny_model("gpt2")
    c_attn = model.transformer.h[0].attn.c_attn
    x = torch.randn(2, 3, 32)
    with torch.no_grad():
        bare = c_attn(x)
    delta_model = BitFitModel(backbone_model=model, modified_modules=["attn.q", "attn.v"], common_structure=True)
    assert {t.parts for t in delta_model.targets} == {(0, 2)}
    perturb(delta_model)
    assert c_attn.bitfit.bias.shape == (64,)
    q, k, v = slice(0, 32), slice(32, 64), slice(64, 96)
    with torch.no_grad():
        out = c_attn(x)
    torch.testing.assert_close(out[..., q], bare[..., q] + c_attn.bitfit.bias[:32])
    assert torch.equal(out[..., k], bare[..., k])
    torch.testing.assert_close(out[..., v], bare[..., v] + c_attn.bitfit.bias[32:])
    full = c_attn.bitfit.delta_bias()
    assert full.shape == (96,) and torch.count_nonzero(full[k]) == 0


def test_exclude_modules_is_honoured_for_defaults_and_inside_broadcast_modules():
    defaults = BitFitModel(backbone_model=tiny_model("bert"), exclude_modules=["bert.encoder.layer.1"])
    assert len(defaults.targets) == 8 and all(".layer.0." in t.name for t in defaults.targets)
    inside = BitFitModel(
        backbone_model=tiny_model("bert"), modified_modules=["layer.0.attention"], exclude_modules=["attention.self"]
    )
    assert [t.name for t in inside.targets] == [
        "bert.encoder.layer.0.attention.output.dense",
        "bert.encoder.layer.0.attention.output.LayerNorm",
    ]


def _untouched(model, keys):
    return list(model.state_dict()) == keys and not any(
        hasattr(m, "_opendelta_slots") or "bitfit" in m._modules for m in model.modules()
    )


@pytest.mark.parametrize("target", ["word_embeddings", "[r].*dropout"])
def test_targets_without_a_linear_layer_or_layer_norm_are_refused_and_nothing_changes(target):
    model = tiny_model("bert")
    keys = list(model.state_dict())
    with pytest.raises(UnsupportedTargetError, match="found nothing it can modify"):
        BitFitModel(backbone_model=model, modified_modules=[target])
    assert _untouched(model, keys)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"modified_modules": ["attn.nope"], "common_structure": True}, "attn.nope"),
        ({"modified_modules": ["query"], "exclude_modules": ["encoder"]}, "excluded all of them"),
        ({"exclude_modules": ["bert"]}, "excluded all of them"),
        ({"modified_modules": []}, "empty modified_modules"),
    ],
)
def test_targets_that_resolve_to_nothing_are_refused_and_nothing_changes(kwargs, message):
    model = tiny_model("bert")
    keys = list(model.state_dict())
    with pytest.raises(ModuleNotFoundInStructureError, match=message):
        BitFitModel(backbone_model=model, **kwargs)
    assert _untouched(model, keys)


# ----------------------------------------------------------------------------------------- code of the original
def test_code_written_for_the_original_runs_unchanged():
    from opendelta import BitFitConfig as Exported
    from opendelta import BitFitModel as ExportedModel

    assert Exported is BitFitConfig and ExportedModel is BitFitModel
    model = tiny_model("roberta")
    delta_model = BitFitModel(backbone_model=model, modified_modules=["attention", "output"])
    delta_model.freeze_module(exclude=["deltas", "classifier"])
    assert delta_model.config.delta_type == "bitfit" and isinstance(delta_model.deltas[0], BiasDelta)
    config = AutoDeltaConfig.from_dict({"delta_type": "bitfit", "modified_modules": ["attention"]})
    assert type(config) is BitFitConfig
    rebuilt = AutoDeltaModel.from_config(config, backbone_model=tiny_model("roberta"))
    assert type(rebuilt) is BitFitModel and len(rebuilt.targets) == 10


def test_hyper_parameters_of_other_methods_are_refused_by_name():
    with pytest.raises(DeltaConfigError, match="bottleneck_dim"):
        BitFitModel(backbone_model=tiny_model("bert"), bottleneck_dim=8)


def test_log_prints_each_bias_with_its_shape(capsys):
    BitFitModel(backbone_model=tiny_model("roberta"), modified_modules=["intermediate.dense"]).log()
    out = capsys.readouterr().out
    assert "bitfit (BiasDelta)" in out and "bias:[37]" in out
