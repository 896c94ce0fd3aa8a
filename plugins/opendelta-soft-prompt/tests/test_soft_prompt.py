"""Soft prompts: the prompt is attended to, padding and masks stay right, generation, wrapped models, refusals."""

import inspect

import pytest
import torch
from torch import nn

from opendelta import AutoDeltaModel, DeltaConfigError, DeltaStateError
from opendelta.testing import (
    ARCHITECTURES,
    GENERATION_HEADS,
    TASK_HEADS,
    Pristine,
    generation_inputs,
    model_output_tensor,
    perturb,
    tiny_inputs,
    tiny_model,
)
from opendelta.testing.tiny_models import CACHE_DIFFERS_WITHOUT_DELTA
from opendelta_soft_prompt import SoftPromptConfig, SoftPromptLayer, SoftPromptModel


def run(model, inputs):
    with torch.no_grad():
        return model_output_tensor(model(**inputs))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_the_prompt_is_prepended_to_the_embedded_input(arch):
    """The prompted model equals the bare model run on [prompt; embeddings] with an extended mask, rows cut."""
    model = tiny_model(arch, "BartModel" if arch == "bart" else None)  # BART's classifier refuses inputs_embeds
    delta_model = SoftPromptModel(backbone_model=model, soft_token_num=4, token_init=False)
    stack = delta_model.targets[0].module
    inputs = tiny_inputs(arch)
    prompted = run(model, inputs)
    delta_model.detach()
    embeds = stack.get_input_embeddings()(inputs["input_ids"])
    prompt = delta_model.deltas[0].prompt().expand(embeds.shape[0], -1, -1)
    manual = {k: v for k, v in inputs.items() if k != "input_ids"}
    manual["inputs_embeds"] = torch.cat([prompt, embeds], dim=1)
    manual["attention_mask"] = torch.cat(
        [torch.ones(embeds.shape[0], 4, dtype=torch.long), inputs["attention_mask"]], 1
    )
    if arch in ("gpt2", "opt", "bert", "roberta", "deberta-v2"):
        with torch.no_grad():
            hidden = stack(**manual)[0][:, 4:]
            bare_stack = stack(**{k: v for k, v in inputs.items() if k != "decoder_input_ids"})[0]
        assert hidden.shape == bare_stack.shape
        delta_model.attach()
        with torch.no_grad():
            torch.testing.assert_close(
                stack(**{k: v for k, v in inputs.items() if k != "decoder_input_ids"})[0], hidden
            )
    else:  # encoder-decoders: the decoder reads the prompted encoder, prompt rows included
        with torch.no_grad():
            expected = model_output_tensor(model(**manual))
        torch.testing.assert_close(prompted, expected)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_padded_batch_gives_each_row_what_it_gives_alone(arch):
    model = tiny_model(arch)
    SoftPromptModel(backbone_model=model, soft_token_num=3)
    inputs = tiny_inputs(arch, batch=3)
    batch = run(model, inputs)
    for row in range(3):
        length = int(inputs["attention_mask"][row].sum())
        alone = {k: v[row : row + 1] for k, v in inputs.items()}
        if arch != "bart":
            alone = {k: (v[:, :length] if k in ("input_ids", "attention_mask") else v) for k, v in alone.items()}
        expected = batch[row : row + 1]
        if expected.dim() == 3 and not model.config.is_encoder_decoder:
            expected = expected[:, : alone["input_ids"].shape[1]]
        torch.testing.assert_close(run(model, alone), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["bert", "gpt2", "t5", "deberta-v2", "bart"])
def test_the_callers_tensors_are_never_modified(arch):
    model = tiny_model(arch)
    SoftPromptModel(backbone_model=model, soft_token_num=3)
    inputs = {
        **tiny_inputs(arch),
        **({"token_type_ids": torch.zeros(2, 7, dtype=torch.long)} if arch == "bert" else {}),
    }
    copies = {k: v.clone() for k, v in inputs.items()}
    run(model, inputs)
    for key, value in inputs.items():
        assert value.shape == copies[key].shape and torch.equal(value, copies[key])


@pytest.mark.parametrize("arch", sorted(GENERATION_HEADS))
@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("padding", ["left", "none"])
def test_generate_with_the_cache_equals_generate_without(arch, num_beams, padding):
    if arch in CACHE_DIFFERS_WITHOUT_DELTA:
        pytest.skip(f"{arch}: {CACHE_DIFFERS_WITHOUT_DELTA[arch]}")
    model = tiny_model(arch, GENERATION_HEADS[arch])
    delta_model = SoftPromptModel(backbone_model=model, soft_token_num=4)
    perturb(delta_model, seed=1, scale=0.5)
    inputs = generation_inputs(arch, model, padding)
    options = {"max_new_tokens": 6, "do_sample": False, "num_beams": num_beams}
    with torch.no_grad():
        cached = model.generate(**inputs, use_cache=True, output_scores=True, return_dict_in_generate=True, **options)
        uncached = model.generate(
            **inputs, use_cache=False, output_scores=True, return_dict_in_generate=True, **options
        )
    assert torch.equal(cached.sequences, uncached.sequences)
    for with_cache, without in zip(cached.scores, uncached.scores, strict=True):
        torch.testing.assert_close(with_cache, without, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", sorted(GENERATION_HEADS))
def test_the_prompt_steers_generation_and_a_detached_one_leaves_the_bare_model(arch):
    model = tiny_model(arch, GENERATION_HEADS[arch])
    inputs = generation_inputs(arch, model)
    options = {"max_new_tokens": 4, "do_sample": False, "output_scores": True, "return_dict_in_generate": True}
    with torch.no_grad():
        bare = model.generate(**inputs, **options)
        delta_model = SoftPromptModel(backbone_model=model, soft_token_num=5)
        steered = model.generate(**inputs, **options)
        delta_model.detach()
        again = model.generate(**inputs, **options)
    assert not torch.allclose(steered.scores[0], bare.scores[0])
    assert torch.equal(again.sequences, bare.sequences)
    for first, second in zip(again.scores, bare.scores, strict=True):
        assert torch.equal(first, second)


def test_an_lm_loss_with_labels_trains_only_the_prompt():
    model = tiny_model("gpt2", "GPT2LMHeadModel")
    delta_model = SoftPromptModel(backbone_model=model, soft_token_num=4)
    delta_model.freeze_module()
    inputs = tiny_inputs("gpt2")
    model.train()
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    assert loss.isfinite()
    trainable = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trainable == {"transformer.soft_prompt.soft_embeds"}


def test_token_init_copies_the_first_vocabulary_embeddings():
    model = tiny_model("bert")
    delta_model = SoftPromptModel(backbone_model=model, soft_token_num=5)
    expected = model.bert.embeddings.word_embeddings.weight[:5]
    assert torch.equal(delta_model.deltas[0].soft_embeds, expected)
    assert delta_model.deltas[0].soft_embeds.data_ptr() != expected.data_ptr()
    random = SoftPromptModel(backbone_model=tiny_model("bert"), soft_token_num=5, token_init=False, init_range=0.1)
    assert random.deltas[0].soft_embeds.abs().max() <= 0.1


def test_a_wrapped_model_without_input_embeddings_at_the_top_works(tmp_path):
    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.lm = tiny_model("gpt2", "GPT2LMHeadModel")

        def forward(self, **inputs):
            return self.lm(**inputs).logits

    wrapper = Wrapper()
    inputs = tiny_inputs("gpt2")
    bare = run(wrapper, inputs)
    delta_model = SoftPromptModel(backbone_model=wrapper, soft_token_num=3)
    assert delta_model.targets[0].name == "lm.transformer"
    prompted = run(wrapper, inputs)
    assert prompted.shape == bare.shape and not torch.allclose(prompted, bare)
    delta_model.freeze_module()
    delta_model.save_finetuned(tmp_path / "prompt")
    fresh = Wrapper()
    AutoDeltaModel.from_finetuned(tmp_path / "prompt", backbone_model=fresh)
    assert torch.equal(run(fresh, inputs), prompted)


def test_a_prompt_too_long_for_the_positions_is_a_clear_error():
    model = tiny_model("bert")
    SoftPromptModel(backbone_model=model, soft_token_num=125)
    with pytest.raises(DeltaStateError, match="125 prompt tokens"):
        run(model, tiny_inputs("bert"))


def test_a_prompt_that_leaves_no_position_for_the_input_is_refused_before_it_is_built():
    model = tiny_model("bert")  # 128 learned positions
    pristine = Pristine.of(model)
    with pytest.raises(DeltaConfigError, match=r"soft_token_num=128 leaves no position.*soft_token_num < 128"):
        SoftPromptModel(backbone_model=model, soft_token_num=128)
    pristine.assert_unchanged(model)
    SoftPromptModel(backbone_model=model, soft_token_num=127)  # one input token still fits
    SoftPromptModel(backbone_model=tiny_model("t5"), soft_token_num=300)  # relative positions: no limit


def test_a_module_that_embeds_nothing_is_refused():
    with pytest.raises(Exception, match="exactly one module that embeds tokens"):
        SoftPromptModel(backbone_model=tiny_model("bert"), modified_modules=["intermediate.dense"])


@pytest.mark.parametrize("arch", ["bert", "opt"])
def test_task_heads_keep_their_output_shapes(arch):
    for head in TASK_HEADS[arch]:
        model = tiny_model(arch, head)
        inputs = tiny_inputs(arch)
        shape = run(model, inputs).shape
        SoftPromptModel(backbone_model=model, soft_token_num=6)
        assert run(model, inputs).shape == shape


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"soft_token_num": 0}, "soft_token_num"),
        ({"init_range": 0}, "init_range"),
        ({"token_init": "yes"}, "token_init"),
    ],
)
def test_bad_hyper_parameters_name_the_field(kwargs, field):
    with pytest.raises(DeltaConfigError, match=field):
        SoftPromptConfig(**kwargs)


def test_the_layer_holds_only_the_prompt():
    layer = SoftPromptLayer(3, torch.randn(10, 8), token_init=True, init_range=0.5)
    assert [n for n, _ in layer.named_parameters()] == ["soft_embeds"] and layer.prompt().shape == (3, 8)


def _blocks(model):
    from opendelta.structure_inference import layer_stacks

    return [stack for _path, stack in layer_stacks(model)]


def _run_blocks(blocks, hidden):
    """Run encoder blocks by hand, with no masks (arguments a block requires besides its input get ``None``)."""
    parameters = list(inspect.signature(type(blocks[0]).forward).parameters.values())[2:]  # after self, hidden
    required = {p.name: None for p in parameters if p.default is p.empty and p.kind is p.POSITIONAL_OR_KEYWORD}
    for block in blocks:
        out = block(hidden, **required)
        hidden = out if isinstance(out, torch.Tensor) else out[0]
    return hidden


def test_on_vit_the_prompt_goes_in_front_of_the_first_block_and_leaves_after_the_last():
    """Visual Prompt Tuning: the blocks read [prompt; class token; patches], the final norm sees the bare rows."""
    model = tiny_model("vit", "ViTModel")
    delta_model = SoftPromptModel(backbone_model=model, soft_token_num=3)
    (stack,) = _blocks(model)
    assert [t.module for t in delta_model.targets] == [stack[0]]
    assert delta_model.deltas[0].soft_embeds.shape == (3, 32)  # no vocabulary to start from: uniform
    assert delta_model.deltas[0].soft_embeds.abs().max() <= delta_model.config.init_range
    pixels = tiny_inputs("vit")["pixel_values"]
    prompted = run(model, {"pixel_values": pixels})
    delta_model.detach()
    with torch.no_grad():
        embeddings = model.embeddings(pixels)
        prompt = delta_model.deltas[0].prompt().expand(embeddings.shape[0], -1, -1)
        hidden = _run_blocks(stack, torch.cat([prompt, embeddings], dim=1))[:, 3:]
        expected = model.layernorm(hidden)
    assert prompted.shape == expected.shape == (2, 5, 32)
    torch.testing.assert_close(prompted, expected)


def test_on_clip_each_tower_gets_a_prompt_and_the_text_tower_still_pools_each_row_on_its_eos_token():
    """CLIP's text tower takes no inputs_embeds, so it gets its prompt in front of its blocks like the vision tower;
    its causal and padding masks cover the prompt in every block, and the pooling on the eos token is untouched."""
    model = tiny_model("clip")
    inputs = tiny_inputs("clip", batch=3)
    with torch.no_grad():
        bare = model(**inputs).text_embeds
    delta_model = SoftPromptModel(backbone_model=model, soft_token_num=3)
    assert [stack[0] for stack in _blocks(model)] == [t.module for t in delta_model.targets]
    assert [t.name.split(".")[0] for t in delta_model.targets] == ["text_model", "vision_model"]
    with torch.no_grad():
        batch = model(**inputs)
    assert batch.text_embeds.shape == bare.shape and not torch.allclose(batch.text_embeds, bare)
    for row in range(3):
        length = int(inputs["attention_mask"][row].sum())
        alone = {k: v[row : row + 1, :length] for k, v in inputs.items() if k != "pixel_values"}
        with torch.no_grad():
            text = model(**alone, pixel_values=inputs["pixel_values"][row : row + 1]).text_embeds
        torch.testing.assert_close(text, batch.text_embeds[row : row + 1], rtol=1e-5, atol=1e-5)


def test_on_whisper_the_prompt_enters_the_encoder_after_its_front_end_and_the_decoder_attends_to_it():
    """Whisper's encoder embeds no tokens: the prompt goes in front of its first layer (after the convolutions and
    the positions) and stays in its output, like T5's and BART's prompted encoders; the decoder is untouched."""
    model = tiny_model("whisper", "WhisperModel")
    delta_model = SoftPromptModel(backbone_model=model, soft_token_num=3)
    encoder_layers = model.encoder.layers
    assert [t.module for t in delta_model.targets] == [encoder_layers[0]]
    inputs = tiny_inputs("whisper")
    with torch.no_grad():
        prompted = model(**inputs)
    assert prompted.encoder_last_hidden_state.shape == (2, 8 + 3, 32)  # 16 frames, stride 2, then the prompt
    assert prompted.last_hidden_state.shape == (2, 7, 32)
    delta_model.detach()
    front_end = []
    handle = encoder_layers[0].register_forward_pre_hook(lambda _m, args: front_end.append(args[0]))
    with torch.no_grad():
        model.encoder(inputs["input_features"])
        handle.remove()
        prompt = delta_model.deltas[0].prompt().expand(2, -1, -1)
        encoded = model.encoder.layer_norm(_run_blocks(encoder_layers, torch.cat([prompt, front_end[0]], dim=1)))
        decoded = model.decoder(input_ids=inputs["decoder_input_ids"], encoder_hidden_states=encoded)
    torch.testing.assert_close(prompted.encoder_last_hidden_state, encoded)
    torch.testing.assert_close(prompted.last_hidden_state, decoded.last_hidden_state)
