"""PEFT 0.21.2's PROMPT_TUNING as the oracle: same prompt, same hidden states on the real positions; its folders load
through ``from_finetuned``, and ``save_peft`` writes folders PEFT loads."""

import json

import pytest
import torch

from opendelta import AutoDeltaModel, CheckpointError
from opendelta.testing import Pristine, tiny_inputs, tiny_model
from opendelta_soft_prompt import SoftPromptModel

peft = pytest.importorskip("peft")

HEADS = {
    "bert": ("BertForSequenceClassification", "SEQ_CLS"),
    "t5": ("T5ForConditionalGeneration", "SEQ_2_SEQ_LM"),
    "gpt2": ("GPT2LMHeadModel", "CAUSAL_LM"),
    "llama": ("LlamaForCausalLM", "CAUSAL_LM"),
}
TOKENS = 3


def fresh(arch):
    return tiny_model(arch, HEADS[arch][0]).eval()


def run(model, arch):
    inputs = tiny_inputs(arch)
    if arch == "bert":  # PEFT's SEQ_CLS extends the token type ids with zeros, as we do
        inputs["token_type_ids"] = (
            (torch.arange(inputs["input_ids"].shape[1]) >= 3).long().expand_as(inputs["input_ids"])
        )
    with torch.no_grad():
        return model(**inputs, output_hidden_states=True)


def real_rows(output, arch):
    """The last hidden states behind the prompt rows (kept in the hidden-state tuple and a T5 encoder output)."""
    hidden = output.encoder_last_hidden_state if arch == "t5" else output.hidden_states[-1]
    return hidden[:, TOKENS:]


def peft_prompt(arch, seed=0):
    config = peft.PromptTuningConfig(task_type=HEADS[arch][1], num_virtual_tokens=TOKENS)
    peft_model = peft.get_peft_model(fresh(arch), config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # RANDOM init copies vocabulary rows; draw a prompt of its own
        weight = peft_model.prompt_encoder["default"].embedding.weight
        weight.copy_(torch.randn(weight.shape, generator=generator))
    return peft_model


@pytest.mark.parametrize("arch", tuple(HEADS))
def test_the_hidden_states_on_the_real_positions_are_peft_s(arch):
    peft_model = peft_prompt(arch)
    model = fresh(arch)
    delta_model = SoftPromptModel(backbone_model=model, soft_token_num=TOKENS)
    with torch.no_grad():
        delta_model.deltas[0].soft_embeds.copy_(peft_model.prompt_encoder["default"].embedding.weight[:TOKENS])
    expected, ours = run(peft_model, arch), run(model, arch)
    assert (real_rows(expected, arch) - real_rows(ours, arch)).abs().max().item() <= 1e-5
    bare = run(fresh(arch), arch)
    assert (
        real_rows(ours, arch) - (bare.encoder_last_hidden_state if arch == "t5" else bare.hidden_states[-1])
    ).abs().max() > 1e-3


@pytest.mark.parametrize("arch", tuple(HEADS))
def test_a_peft_prompt_tuning_folder_loads_with_peft_outputs_and_save_peft_goes_back(arch, tmp_path):
    peft_prompt(arch, seed=4).save_pretrained(tmp_path / "peft")
    expected = run(peft.PeftModel.from_pretrained(fresh(arch), tmp_path / "peft").eval(), arch)
    model = fresh(arch)
    delta_model = AutoDeltaModel.from_finetuned(tmp_path / "peft", backbone_model=model)
    assert type(delta_model) is SoftPromptModel and delta_model.config.soft_token_num == TOKENS
    ours = run(model, arch)
    assert (real_rows(expected, arch) - real_rows(ours, arch)).abs().max().item() <= 1e-5
    folder = delta_model.save_peft(tmp_path / "exported")
    assert json.loads((folder / "adapter_config.json").read_text())["task_type"] == HEADS[arch][1]
    theirs = run(peft.PeftModel.from_pretrained(fresh(arch), folder).eval(), arch)
    assert (real_rows(theirs, arch) - real_rows(ours, arch)).abs().max().item() <= 1e-5


def test_a_trained_head_in_modules_to_save_loads_into_the_backbone(tmp_path):
    peft_model = peft_prompt("bert", seed=5)
    with torch.no_grad():
        peft_model.base_model.classifier.modules_to_save["default"].weight.normal_()
    peft_model.save_pretrained(tmp_path / "peft")
    expected = run(peft.PeftModel.from_pretrained(fresh("bert"), tmp_path / "peft").eval(), "bert")
    model = fresh("bert")
    AutoDeltaModel.from_finetuned(tmp_path / "peft", backbone_model=model)
    assert (expected.logits - run(model, "bert").logits).abs().max().item() <= 1e-5


def _edit(folder, **fields):
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


@pytest.mark.parametrize(
    "fields, named",
    [
        ({"modules_to_save": ["nothing"]}, "modules_to_save"),  # the classifier's tensors are no head's then
        ({"some_future_option": 3}, "some_future_option"),
        ({"num_virtual_tokens": 0}, "num_virtual_tokens"),
        ({"num_virtual_tokens": 5}, "num_virtual_tokens=5"),
        ({"task_type": "MASKED_LM"}, "task_type"),
    ],
)
def test_folders_it_cannot_load_faithfully_are_refused_by_name_and_change_nothing(fields, named, tmp_path):
    peft_prompt("bert").save_pretrained(tmp_path / "peft")
    _edit(tmp_path / "peft", **fields)
    model = fresh("bert")
    before = Pristine.of(model)
    with pytest.raises(CheckpointError, match=named):
        AutoDeltaModel.from_finetuned(tmp_path / "peft", backbone_model=model)
    before.assert_unchanged(model)


def test_save_peft_refuses_what_peft_would_compute_otherwise(tmp_path):
    odd = SoftPromptModel(fresh("gpt2"), 2, other_expand_ids={"attention_mask": 0})
    with pytest.raises(CheckpointError, match="other_expand_ids"):
        odd.save_peft(tmp_path / "a")
    with pytest.raises(CheckpointError, match="token embeddings"):
        SoftPromptModel(fresh("gpt2"), 2, modified_modules=["transformer"]).save_peft(tmp_path / "b")
    peft_prompt("gpt2").save_pretrained(tmp_path / "c")
    prefix = pytest.importorskip("opendelta_prefix")
    with pytest.raises(CheckpointError, match="PrefixModel cannot read it"):
        prefix.PrefixModel.from_finetuned(tmp_path / "c", backbone_model=fresh("gpt2"))
