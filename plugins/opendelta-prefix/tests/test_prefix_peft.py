"""PEFT 0.21.2's PREFIX_TUNING as the oracle: with ``peft_positions`` and PEFT's per-layer prefixes our hidden states
on the real positions are PEFT's; its folders load through ``from_finetuned``; ``save_peft`` writes folders PEFT
loads; encoder-decoders and unchecked architectures are refused by name."""

import json

import pytest
import torch

from opendelta import AutoDeltaModel, CheckpointError, DeltaConfigError
from opendelta.testing import Pristine, generation_inputs, tiny_inputs, tiny_model
from opendelta_prefix import PrefixModel

peft = pytest.importorskip("peft")

HEADS = {
    "bert": ("BertForSequenceClassification", "SEQ_CLS"),
    "gpt2": ("GPT2LMHeadModel", "CAUSAL_LM"),
    "llama": ("LlamaForCausalLM", "CAUSAL_LM"),
    "qwen2": ("Qwen2ForCausalLM", "CAUSAL_LM"),
    "qwen3": ("Qwen3ForCausalLM", "CAUSAL_LM"),
}
TOKENS = 3


def fresh(arch):
    return tiny_model(arch, HEADS[arch][0]).eval()


def run(model, arch, **extra):
    with torch.no_grad():
        return model(**tiny_inputs(arch), **extra, output_hidden_states=True)


def peft_prefix(arch, seed=0, projection=False):
    config = peft.PrefixTuningConfig(
        task_type=HEADS[arch][1], num_virtual_tokens=TOKENS, prefix_projection=projection, encoder_hidden_size=8
    )
    torch.manual_seed(seed)
    return peft.get_peft_model(fresh(arch), config).eval()


def gap(first, second):
    return (first.hidden_states[-1] - second.hidden_states[-1]).abs().max().item()


@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize("arch", tuple(HEADS))
def test_a_peft_prefix_folder_loads_with_peft_outputs_and_save_peft_goes_back(arch, projection, tmp_path):
    peft_prefix(arch, seed=3, projection=projection).save_pretrained(tmp_path / "peft")
    expected = run(peft.PeftModel.from_pretrained(fresh(arch), tmp_path / "peft").eval(), arch)
    model = fresh(arch)
    delta_model = AutoDeltaModel.from_finetuned(tmp_path / "peft", backbone_model=model)
    assert type(delta_model) is PrefixModel and delta_model.config.peft_positions
    assert not delta_model.config.reparameterize
    ours = run(model, arch)
    assert gap(expected, ours) <= 1e-5
    assert gap(ours, run(fresh(arch), arch)) > 1e-3  # the prefix matters
    folder = delta_model.save_peft(tmp_path / "exported")
    assert json.loads((folder / "adapter_config.json").read_text())["task_type"] == HEADS[arch][1]
    assert gap(run(peft.PeftModel.from_pretrained(fresh(arch), folder).eval(), arch), ours) <= 1e-5


def test_given_position_ids_move_up_as_in_peft(tmp_path):
    peft_prefix("gpt2", seed=1).save_pretrained(tmp_path / "peft")
    positions = torch.arange(7).expand(2, -1) + 2
    expected = run(
        peft.PeftModel.from_pretrained(fresh("gpt2"), tmp_path / "peft").eval(), "gpt2", position_ids=positions
    )
    model = fresh("gpt2")
    AutoDeltaModel.from_finetuned(tmp_path / "peft", backbone_model=model)
    assert gap(expected, run(model, "gpt2", position_ids=positions)) <= 1e-5


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_with_peft_positions_cached_generation_equals_uncached_and_detach_restores_the_model(arch):
    model = fresh(arch)
    inputs = generation_inputs(arch, model)
    options = {"max_new_tokens": 5, "do_sample": False, "output_scores": True, "return_dict_in_generate": True}
    delta_model = PrefixModel(model, TOKENS, reparameterize=False, peft_positions=True)
    with torch.no_grad():
        cached = model.generate(**inputs, use_cache=True, **options)
        uncached = model.generate(**inputs, use_cache=False, **options)
    assert torch.equal(cached.sequences, uncached.sequences)
    for with_cache, without in zip(cached.scores, uncached.scores, strict=True):
        torch.testing.assert_close(with_cache, without, rtol=1e-4, atol=1e-4)
    shifted = run(model, arch)
    delta_model.detach()
    assert gap(run(model, arch), run(fresh(arch), arch)) == 0
    delta_model.attach()
    assert gap(run(model, arch), shifted) == 0


def test_detach_takes_the_position_shift_out_and_a_discarded_delta_model_keeps_it():
    model = fresh("gpt2")
    pristine = Pristine.of(model)
    delta_model = PrefixModel(model, TOKENS, reparameterize=False, peft_positions=True)
    delta_model.detach()
    pristine.assert_unchanged(model)
    delta_model.attach()
    shifted = run(model, "gpt2")
    del delta_model  # the backbone still carries the prefixes, and their positions with them
    assert gap(run(model, "gpt2"), shifted) == 0


def test_an_encoder_decoder_is_refused_by_name(tmp_path):
    with pytest.raises(DeltaConfigError, match="peft_positions"):
        PrefixModel(tiny_model("t5", "T5ForConditionalGeneration"), TOKENS, peft_positions=True)
    config = peft.PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=TOKENS)
    peft.get_peft_model(tiny_model("t5", "T5ForConditionalGeneration"), config).save_pretrained(tmp_path / "t5")
    model = tiny_model("t5", "T5ForConditionalGeneration")
    before = Pristine.of(model)
    with pytest.raises(CheckpointError, match="SEQ_2_SEQ_LM"):
        AutoDeltaModel.from_finetuned(tmp_path / "t5", backbone_model=model)
    before.assert_unchanged(model)


def _edit(folder, **fields):
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


@pytest.mark.parametrize(
    "fields, named",
    [
        ({"modules_to_save": ["nothing"]}, "modules_to_save"),
        ({"some_future_option": 3}, "some_future_option"),
        ({"num_virtual_tokens": 0}, "num_virtual_tokens"),
        ({"num_virtual_tokens": 5}, "num_virtual_tokens=5"),
        ({"task_type": "SEQ_2_SEQ_LM"}, "task_type"),
    ],
)
def test_folders_it_cannot_load_faithfully_are_refused_by_name_and_change_nothing(fields, named, tmp_path):
    peft_prefix("bert").save_pretrained(tmp_path / "peft")
    _edit(tmp_path / "peft", **fields)
    model = fresh("bert")
    before = Pristine.of(model)
    with pytest.raises(CheckpointError, match=named):
        AutoDeltaModel.from_finetuned(tmp_path / "peft", backbone_model=model)
    before.assert_unchanged(model)


def test_an_unchecked_architecture_is_refused_and_save_peft_needs_peft_positions(tmp_path):
    config = peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=TOKENS)
    peft.get_peft_model(tiny_model("roberta"), config).save_pretrained(tmp_path / "roberta")
    with pytest.raises(CheckpointError, match="'roberta'"):
        AutoDeltaModel.from_finetuned(tmp_path / "roberta", backbone_model=tiny_model("roberta"))
    with pytest.raises(CheckpointError, match="peft_positions=True"):
        PrefixModel(fresh("gpt2"), TOKENS).save_peft(tmp_path / "plain")
