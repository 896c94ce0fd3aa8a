"""The manual's printed shapes (sections 1.7.2 and 1.12), the constructor signature and the registration."""

import inspect

from transformers import BartConfig, BartForSequenceClassification

import opendelta
from opendelta import AutoDeltaConfig, get_method
from opendelta.layers import SamplerAdapter
from opendelta_low_rank_adapter import LowRankAdapter, LowRankAdapterConfig, LowRankAdapterModel


def test_manual_1_7_2_shapes_on_a_bart_of_width_768(capsys):
    config = BartConfig(
        d_model=768,
        encoder_ffn_dim=3072,
        decoder_ffn_dim=3072,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=12,
        decoder_attention_heads=12,
        vocab_size=100,
        max_position_embeddings=64,
        num_labels=3,
    )
    model = BartForSequenceClassification(config)
    delta_model = LowRankAdapterModel(backbone_model=model, modified_modules=["fc2"], reduction_factor=12)
    assert [t.name for t in delta_model.targets] == ["model.encoder.layers.0.fc2", "model.decoder.layers.0.fc2"]
    for stack in (model.model.encoder, model.model.decoder):
        adapter = stack.layers[0].fc2.low_rank_adapter
        shapes = {n: tuple(p.shape) for n, p in adapter.named_parameters()}
        assert shapes == {
            "down_sampler.W_left": (768, 1),
            "down_sampler.W_right": (1, 64),
            "down_sampler.b": (64,),
            "up_sampler.W_left": (64, 1),
            "up_sampler.W_right": (1, 768),
            "up_sampler.b": (768,),
        }
    delta_model.log()
    out = capsys.readouterr().out
    assert "low_rank_adapter (LowRankAdapter)" in out
    assert "W_left:[768, 1] W_right:[1, 64] b:[64]" in out and "W_left:[64, 1] W_right:[1, 768] b:[768]" in out
    default = LowRankAdapterModel(backbone_model=model, modified_modules=["encoder.layers.0.self_attn.out_proj"])
    assert default.deltas[0].down_sampler.W_right.shape == (1, 768 // 32)  # the manual's BERT-base tree: [1, 24]


def test_registered_under_its_delta_type_and_alias_and_importable_from_opendelta():
    assert opendelta.LowRankAdapterModel is LowRankAdapterModel
    assert opendelta.LowRankAdapterConfig is LowRankAdapterConfig
    assert get_method("low_rank_adapter") is get_method("lowrankadapter")  # the old name is an alias
    assert get_method("low_rank_adapter").name == LowRankAdapterModel.delta_type == "low_rank_adapter"  # as 0.3.2
    assert get_method("low_rank_adapter").model_cls is LowRankAdapterModel
    for name in ("low_rank_adapter", "lowrankadapter"):
        config = AutoDeltaConfig.from_dict({"delta_type": name, "reduction_factor": 16})
        assert type(config) is LowRankAdapterConfig and config.reduction_factor == 16
    assert LowRankAdapterModel.delta_name == "low_rank_adapter" and LowRankAdapterModel.identity_at_init
    assert issubclass(LowRankAdapter, SamplerAdapter)


def test_constructor_keeps_the_manual_signature_and_defaults():
    params = inspect.signature(LowRankAdapterModel).parameters
    expected = {"reduction_factor": 32, "non_linearity": "gelu_new", "low_rank_w_init": "glorot-uniform"}
    assert {k: params[k].default for k in expected} == expected and params["low_rank_rank"].default == 1
    assert {"modified_modules", "exclude_modules", "unfrozen_modules", "common_structure"} <= set(params)
    assert {"interactive_modify", "backend"} <= set(params)
