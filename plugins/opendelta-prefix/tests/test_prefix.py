"""Prefix tuning's behaviour: one mechanism for every architecture, padding, generation, folding, refusals."""

import copy
import pickle

import pytest
import torch
from torch import nn

import opendelta.prefix
from opendelta import AutoDeltaModel, UnsupportedTargetError
from opendelta.testing import (
    ARCHITECTURES,
    GENERATION_HEADS,
    TASK_HEADS,
    generation_inputs,
    model_output_tensor,
    perturb,
    tiny_inputs,
    tiny_model,
)
from opendelta.testing.tiny_models import CACHE_DIFFERS_WITHOUT_DELTA
from opendelta_prefix import PrefixConfig, PrefixLayer, PrefixModel


def run(model, inputs):
    with torch.no_grad():
        return model_output_tensor(model(**inputs))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_prefix_is_one_set_of_keys_and_values_per_self_attention(arch):
    model = tiny_model(arch)
    delta_model = PrefixModel(backbone_model=model, prefix_token_num=4, reparameterize=False)
    layers = 2 * (2 if model.config.is_encoder_decoder else 1)
    assert len(delta_model.deltas) == layers
    for layer in delta_model.deltas:
        key, value = layer.key_value()
        assert key.shape == value.shape == (4, 32)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_both_placements_give_the_same_outputs(arch, monkeypatch):
    """Keys/values at transformers' attention interface, or placeholder rows filled at the projections: same math."""
    outputs = {}
    for backend in ("interface", "rows"):
        if backend == "rows":
            monkeypatch.setattr(opendelta.prefix, "attention_backend", lambda attention: "rows")
        model = tiny_model(arch)
        delta_model = PrefixModel(backbone_model=model, prefix_token_num=3)
        perturb(delta_model, seed=1)
        outputs[backend] = run(model, tiny_inputs(arch))
    torch.testing.assert_close(outputs["interface"], outputs["rows"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_padded_batch_gives_each_row_what_it_gives_alone(arch):
    model = tiny_model(arch)
    PrefixModel(backbone_model=model, prefix_token_num=3)
    inputs = tiny_inputs(arch, batch=3)
    batch = run(model, inputs)
    for row in range(3):
        length = int(inputs["attention_mask"][row].sum())
        alone = {k: v[row : row + 1] for k, v in inputs.items()}
        if arch != "bart":  # BART pools on its eos token, which the padded rows keep in place
            alone = {k: (v[:, :length] if k in ("input_ids", "attention_mask") else v) for k, v in alone.items()}
        expected = batch[row : row + 1]
        if expected.dim() == 3 and not model.config.is_encoder_decoder:
            expected = expected[:, : alone["input_ids"].shape[1]]
        torch.testing.assert_close(run(model, alone), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", sorted(GENERATION_HEADS))
@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("padding", ["left", "none"])
def test_generate_with_the_cache_equals_generate_without(arch, num_beams, padding):
    if arch in CACHE_DIFFERS_WITHOUT_DELTA:
        pytest.skip(f"{arch}: {CACHE_DIFFERS_WITHOUT_DELTA[arch]}")
    model = tiny_model(arch, GENERATION_HEADS[arch])
    delta_model = PrefixModel(backbone_model=model, prefix_token_num=4)
    perturb(delta_model, seed=2, scale=1.0)
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
def test_the_prefix_steers_generation_and_a_detached_one_leaves_the_bare_model(arch):
    model = tiny_model(arch, GENERATION_HEADS[arch])
    inputs = generation_inputs(arch, model)
    options = {"max_new_tokens": 4, "do_sample": False, "output_scores": True, "return_dict_in_generate": True}
    with torch.no_grad():
        bare = model.generate(**inputs, **options)
        delta_model = PrefixModel(backbone_model=model)
        perturb(delta_model, seed=3, scale=1.0)
        steered = model.generate(**inputs, **options)
        delta_model.detach()
        again = model.generate(**inputs, **options)
    assert not torch.allclose(steered.scores[0], bare.scores[0])
    assert torch.equal(again.sequences, bare.sequences)
    for first, second in zip(again.scores, bare.scores, strict=True):
        assert torch.equal(first, second)


@pytest.mark.parametrize("arch", ["bert", "gpt2", "t5", "deberta-v2"])
def test_the_callers_tensors_are_never_modified(arch):
    model = tiny_model(arch)
    PrefixModel(backbone_model=model)
    inputs = tiny_inputs(arch)
    copies = {k: v.clone() for k, v in inputs.items()}
    pointers = {k: v.data_ptr() for k, v in inputs.items()}
    run(model, inputs)
    for key, value in inputs.items():
        assert (
            torch.equal(value, copies[key]) and value.data_ptr() == pointers[key] and value.shape == copies[key].shape
        )


@pytest.mark.parametrize("arch", ["gpt2", "t5", "deberta-v2"])
def test_fold_replaces_the_network_by_plain_prefixes_with_identical_outputs(arch, tmp_path):
    model = tiny_model(arch)
    delta_model = PrefixModel(backbone_model=model, prefix_token_num=5, embed_dim=16, mid_dim=24)
    perturb(delta_model, seed=4)
    inputs = tiny_inputs(arch)
    trained = run(model, inputs)
    network_size = sum(p.numel() for p in delta_model.parameters())
    delta_model.fold()
    assert delta_model.config.reparameterize is False
    assert all(not layer.reparameterized for layer in delta_model.deltas)
    assert sum(p.numel() for p in delta_model.parameters()) == len(delta_model.deltas) * 5 * 64 < network_size
    torch.testing.assert_close(run(model, inputs), trained, rtol=1e-6, atol=1e-6)
    delta_model.freeze_module()
    delta_model.save_finetuned(tmp_path / "folded")
    fresh = tiny_model(arch)
    loaded = AutoDeltaModel.from_finetuned(tmp_path / "folded", backbone_model=fresh)
    assert isinstance(loaded, PrefixModel) and loaded.config.reparameterize is False
    assert torch.equal(run(fresh, inputs), run(model, inputs))


def test_the_reparameterisation_is_one_network_shared_by_every_layer():
    model = tiny_model("bart")
    delta_model = PrefixModel(backbone_model=model, prefix_token_num=2, embed_dim=8, mid_dim=12)
    networks = {id(layer.reparameterization) for layer in delta_model.deltas}
    assert len(networks) == 1
    expected = 2 * 8 + (8 * 12 + 12) + (12 * 4 * 64 + 4 * 64)  # embedding, hidden layer, every layer's keys/values
    assert sum(p.numel() for p in delta_model.parameters()) == expected


def test_gradients_reach_the_prefix_and_the_network_and_nothing_else():
    model = tiny_model("t5")
    delta_model = PrefixModel(backbone_model=model, prefix_token_num=2, embed_dim=8, mid_dim=8)
    delta_model.freeze_module()
    model.train()
    model(**tiny_inputs("t5")).logits.pow(2).mean().backward()
    trainable = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trainable and all(".prefix." in n for n in trainable)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in delta_model.parameters())


def test_deepcopy_and_pickle_carry_their_own_prefixes():
    model = tiny_model("bert")
    delta_model = PrefixModel(backbone_model=model, reparameterize=False)
    perturb(delta_model, seed=5)
    inputs = tiny_inputs("bert")
    expected = run(model, inputs)
    clone, again = copy.deepcopy(model), pickle.loads(pickle.dumps(model))
    delta_model.detach()
    assert torch.equal(run(clone, inputs), expected) and torch.equal(run(again, inputs), expected)
    assert not torch.equal(run(model, inputs), expected)


def test_a_wrapped_model_without_input_embeddings_at_the_top_works():
    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = tiny_model("roberta", "RobertaModel")
            self.score = nn.Linear(32, 1)

        def forward(self, **inputs):
            return self.score(self.encoder(**inputs).last_hidden_state[:, 0])

    wrapper = Wrapper()
    inputs = tiny_inputs("roberta")
    bare = run(wrapper, inputs)
    delta_model = PrefixModel(backbone_model=wrapper, reparameterize=False)
    assert [t.name for t in delta_model.targets] == [f"encoder.encoder.layer.{i}.attention" for i in range(2)]
    assert not torch.allclose(run(wrapper, inputs), bare)


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_task_heads_keep_their_output_shapes(arch):
    for head in TASK_HEADS[arch]:
        model = tiny_model(arch, head)
        inputs = tiny_inputs(arch)
        shape = run(model, inputs).shape
        PrefixModel(backbone_model=model)
        assert run(model, inputs).shape == shape


def test_a_module_that_is_no_self_attention_is_refused_naming_it():
    model = tiny_model("bert")
    with pytest.raises(UnsupportedTargetError, match=r"BertIntermediate at bert\.encoder\.layer\.0\.intermediate"):
        PrefixModel(backbone_model=model, modified_modules=["intermediate"])
    assert not any(isinstance(m, PrefixLayer) for m in model.modules())


def test_an_unmapped_attention_is_refused_naming_the_model_and_the_module():
    class Attention(nn.Module):
        def forward(self, x):
            return x

    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = Attention()

        def forward(self, x):
            return self.attention(x)

    with pytest.raises(Exception, match="Custom"):
        PrefixModel(backbone_model=Custom(), modified_modules=["attention"])


@pytest.mark.parametrize(
    "kwargs, field",
    [({"prefix_token_num": 0}, "prefix_token_num"), ({"mid_dim": 0}, "mid_dim"), ({"embed_dim": "8"}, "embed_dim")],
)
def test_bad_hyper_parameters_name_the_field(kwargs, field):
    with pytest.raises(Exception, match=field):
        PrefixConfig(**kwargs)


@pytest.mark.parametrize("arch", sorted(GENERATION_HEADS))
def test_a_prefix_on_some_decoder_layers_generates_or_says_why_not(arch):
    """Through the attention interface any subset works; through placeholder rows (T5 on 4.57) a cached generate()
    needs every layer of the stack, and says so instead of failing deep inside the model."""
    if arch in CACHE_DIFFERS_WITHOUT_DELTA:
        pytest.skip(f"{arch}: {CACHE_DIFFERS_WITHOUT_DELTA[arch]}")
    model = tiny_model(arch, GENERATION_HEADS[arch])
    pattern = r"[r]decoder\.block\.1\.attn"
    delta_model = PrefixModel(backbone_model=model, modified_modules=[pattern], common_structure=True)
    perturb(delta_model, seed=6, scale=1.0)
    assert len(delta_model.targets) == 1
    inputs = generation_inputs(arch, model)
    options = {"max_new_tokens": 4, "do_sample": False}
    if opendelta.prefix.attention_backend(delta_model.targets[0].module) == "interface":
        with torch.no_grad():
            assert torch.equal(
                model.generate(**inputs, **options), model.generate(**inputs, use_cache=False, **options)
            )
    else:
        with pytest.raises(Exception, match="every self-attention layer of the stack"), torch.no_grad():
            model.generate(**inputs, **options)
        with torch.no_grad():
            model.generate(**inputs, use_cache=False, **options)
