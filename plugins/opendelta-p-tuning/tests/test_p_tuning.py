"""P-tuning: the encoder, folding, saving, training, generation, the names and the refusals."""

import pytest
import torch

from opendelta import AutoDeltaConfig, AutoDeltaModel, DeltaConfigError, DeltaStateError
from opendelta.testing import (
    GENERATION_HEADS,
    Pristine,
    generation_inputs,
    model_output_tensor,
    tiny_inputs,
    tiny_model,
)
from opendelta_p_tuning import PromptEncoderLayer, PTuningConfig, PTuningModel


def run(model, arch="gpt2"):
    with torch.no_grad():
        return model_output_tensor(model(**tiny_inputs(arch)))


def test_the_classic_call_shape_and_the_positional_order():
    model = tiny_model("gpt2", "GPT2LMHeadModel")
    delta_model = PTuningModel(model, 5, "LSTM", 8)
    config = delta_model.config
    assert (config.num_virtual_tokens, config.encoder_reparameterization_type) == (5, "LSTM")
    assert config.encoder_hidden_size == 8
    layer = delta_model.deltas[0]
    assert isinstance(layer, PromptEncoderLayer) and layer.prompt().shape == (5, 32)
    assert {n.split(".")[0] for n, _ in layer.named_parameters()} == {"embedding", "lstm_head", "mlp_head"}
    keyword = PTuningModel(backbone_model=tiny_model("bert"), modified_modules=["bert"], num_virtual_tokens=2)
    assert [t.name for t in keyword.targets] == ["bert"]


def test_both_names_build_it_and_the_defaults_are_peft_s():
    for name in ("p_tuning", "ptuning"):
        config = AutoDeltaConfig.from_dict({"delta_type": name, "num_virtual_tokens": 2})
        assert isinstance(config, PTuningConfig) and config.num_virtual_tokens == 2
    delta_model = AutoDeltaModel.from_config(PTuningConfig(), backbone_model=tiny_model("bert"))
    assert type(delta_model) is PTuningModel
    mlp = delta_model.deltas[0].mlp_head
    assert [type(m).__name__ for m in mlp] == ["Linear", "ReLU", "Linear", "ReLU", "Linear"]
    assert mlp[0].out_features == 128 and delta_model.deltas[0].embedding.weight.shape == (20, 32)


def test_fold_keeps_the_outputs_and_leaves_only_the_prompt(tmp_path):
    model = tiny_model("gpt2", "GPT2LMHeadModel")
    delta_model = PTuningModel(model, 4, "LSTM", 8)
    before = run(model)
    delta_model.freeze_module()
    delta_model.fold()
    assert delta_model.config.inference_mode
    assert set(delta_model.delta_state_dict()) == {"transformer.p_tuning.embedding.weight"}
    assert torch.allclose(run(model), before, atol=1e-6)
    delta_model.save_finetuned(tmp_path / "folded")
    again = tiny_model("gpt2", "GPT2LMHeadModel")
    AutoDeltaModel.from_finetuned(tmp_path / "folded", backbone_model=again)
    assert torch.equal(run(again), run(model))
    delta_model.detach()
    with pytest.raises(DeltaStateError, match="attach"):
        delta_model.fold()


def test_a_saved_encoder_loads_back_with_its_outputs(tmp_path):
    model = tiny_model("t5", "T5ForConditionalGeneration")
    delta_model = PTuningModel(model, 3, "LSTM", 8)
    delta_model.freeze_module()
    assert delta_model.deltas[0].embedding.weight.shape[0] == 6  # PEFT's seq2seq default: two submodules
    delta_model.save_finetuned(tmp_path / "encoder")
    again = tiny_model("t5", "T5ForConditionalGeneration")
    loaded = AutoDeltaModel.from_finetuned(tmp_path / "encoder", backbone_model=again)
    assert not loaded.config.inference_mode and "lstm_head" in loaded.deltas[0]._modules
    assert torch.equal(run(again, "t5"), run(model, "t5"))
    one = PTuningModel(tiny_model("t5", "T5ForConditionalGeneration"), 3, num_transformer_submodules=1)
    assert one.deltas[0].embedding.weight.shape[0] == 3


def test_training_reaches_the_encoder_and_nothing_else():
    model = tiny_model("gpt2", "GPT2LMHeadModel")
    delta_model = PTuningModel(model, 4, "LSTM", 8, encoder_num_layers=2, encoder_dropout=0.5)
    delta_model.freeze_module()
    inputs = tiny_inputs("gpt2")
    model.train()
    torch.manual_seed(0)
    first = delta_model.deltas[0].prompt()
    second = delta_model.deltas[0].prompt()
    assert not torch.equal(first, second)  # the LSTM's dropout acts in training mode only
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trainable == {n for n, _ in model.named_parameters() if n.startswith("transformer.p_tuning.")}
    assert {"transformer.p_tuning.embedding.weight", "transformer.p_tuning.lstm_head.weight_hh_l1"} <= trainable
    model.eval()
    assert torch.equal(delta_model.deltas[0].prompt(), delta_model.deltas[0].prompt())


@pytest.mark.parametrize("arch", ["gpt2", "llama", "t5"])
def test_generate_with_the_cache_equals_generate_without_and_detach_restores_the_bare_model(arch):
    model = tiny_model(arch, GENERATION_HEADS[arch])
    inputs = generation_inputs(arch, model)
    options = {"max_new_tokens": 5, "do_sample": False, "output_scores": True, "return_dict_in_generate": True}
    pristine = Pristine.of(model)
    with torch.no_grad():
        bare = model.generate(**inputs, **options)
        delta_model = PTuningModel(model, 4, encoder_hidden_size=8)
        cached = model.generate(**inputs, use_cache=True, **options)
        uncached = model.generate(**inputs, use_cache=False, **options)
        delta_model.detach()
    assert torch.equal(cached.sequences, uncached.sequences)
    for with_cache, without in zip(cached.scores, uncached.scores, strict=True):
        torch.testing.assert_close(with_cache, without, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(cached.scores[0], bare.scores[0])
    pristine.assert_unchanged(model)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"num_virtual_tokens": 0}, "num_virtual_tokens"),
        ({"encoder_hidden_size": 0}, "encoder_hidden_size"),
        ({"encoder_num_layers": 0}, "encoder_num_layers"),
        ({"encoder_dropout": 1.0}, "encoder_dropout"),
        ({"encoder_reparameterization_type": "GRU"}, "encoder_reparameterization_type"),
        ({"num_transformer_submodules": 3}, "num_transformer_submodules"),
        ({"num_transformer_submodules": True}, "num_transformer_submodules"),
    ],
)
def test_bad_hyper_parameters_name_the_field(kwargs, field):
    with pytest.raises(DeltaConfigError, match=field):
        PTuningConfig(**kwargs)


def test_a_layer_count_the_mlp_would_ignore_is_refused_and_a_lower_case_type_is_read():
    with pytest.raises(DeltaConfigError, match="encoder_num_layers=3 does not apply"):
        PTuningConfig(encoder_num_layers=3)
    assert PTuningConfig(encoder_num_layers=3, inference_mode=True).encoder_num_layers == 3  # no encoder: moot
    assert PTuningConfig(encoder_reparameterization_type="lstm").encoder_reparameterization_type == "LSTM"


def test_a_prompt_that_leaves_no_position_for_the_input_is_refused_by_name():
    with pytest.raises(DeltaConfigError, match="num_virtual_tokens"):
        PTuningModel(tiny_model("bert"), 128)


def test_on_vit_the_prompt_goes_in_front_of_the_first_block():
    model = tiny_model("vit")
    bare = model_output_tensor(model(**tiny_inputs("vit")))
    delta_model = PTuningModel(model, 2, encoder_hidden_size=8)
    assert delta_model.deltas[0].prompt().shape == (2, 32)
    assert model_output_tensor(model(**tiny_inputs("vit"))).shape == bare.shape
