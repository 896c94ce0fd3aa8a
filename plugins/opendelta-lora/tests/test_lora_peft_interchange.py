"""LoRA adapters move between PEFT and OpenDelta with identical outputs, checked against the REAL peft library.

PEFT-trained adapters (perturbed, so ``B`` is not zero) load into a ``LoraModel``; a ``LoraModel`` exported with
``save_peft_adapter`` loads in ``PeftModel.from_pretrained``; PEFT features ``LoraModel`` cannot compute are refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from opendelta import AutoDeltaModel, CheckpointError
from opendelta.insertion import delta_parameter_names
from opendelta.testing import model_output_tensor, perturb, tiny_inputs, tiny_model
from opendelta_lora import LoraModel, load_peft_adapter, save_peft_adapter

peft = pytest.importorskip("peft")

ATOL = 1e-5
"""PEFT computes ``lora_B(lora_A(x)) * s``, LoraLayer a fused ``addmm``: equal to float32 rounding."""

HEADS = {"t5": "T5ForConditionalGeneration", "bart": "BartForConditionalGeneration"}

PEFT_CASES = {
    # the classic: query/value plus the task head, with dropout (off in eval) recorded
    "bert-query-value-head": ("bert", {"target_modules": ["query", "value"], "modules_to_save": ["classifier"]}),
    # GPT-2's fused q|k|v Conv1D, stored [in, out]: PEFT's fan_in_fan_out
    "gpt2-c_attn": ("gpt2", {"target_modules": ["c_attn"], "fan_in_fan_out": True}),
    # a regular expression over full names: only the self-attention of encoder and decoder
    "t5-regex": ("t5", {"target_modules": r".*SelfAttention\.(q|v)"}),
    # rank-stabilised scale alpha / sqrt(r), and an exclusion
    "bart-rslora-exclude": (
        "bart",
        {"target_modules": ["q_proj", "v_proj", "fc1"], "use_rslora": True, "exclude_modules": ["encoder_attn.q_proj"]},
    ),
    # only the second layer
    "roberta-layers": ("roberta", {"target_modules": ["query", "value"], "layers_to_transform": [1]}),
    # every linear layer but the classification head (PEFT saves the resolved list of names)
    "bert-all-linear": ("bert", {"target_modules": "all-linear", "task_type": "SEQ_CLS"}),
}


def run(model, arch):
    with torch.no_grad():
        return model_output_tensor(model(**tiny_inputs(arch)))


def backbone(arch):
    return tiny_model(arch, head=HEADS.get(arch))


def train_with_peft(arch: str, options: dict, folder: Path, **save_options) -> torch.Tensor:
    """A PEFT LoRA on a tiny model, every trainable tensor moved (as training would), saved; returns its output."""
    model = peft.get_peft_model(backbone(arch), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, **options))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator))
    model.eval()
    model.save_pretrained(folder, **save_options)
    return run(model, arch)


@pytest.mark.parametrize("case", PEFT_CASES)
def test_a_peft_trained_adapter_loads_with_peft_outputs(case, tmp_path):
    arch, options = PEFT_CASES[case]
    expected = train_with_peft(arch, options, tmp_path / "adapter")
    model = backbone(arch)
    bare = run(model, arch)
    assert (expected - bare).abs().max() > 100 * ATOL  # the adapter changes the output well beyond the tolerance
    delta_model = load_peft_adapter(tmp_path / "adapter", model)
    torch.testing.assert_close(run(model, arch), expected, atol=ATOL, rtol=0)
    delta_model.detach()  # a task head (modules_to_save) is the delta model's own copy: it goes out too
    torch.testing.assert_close(run(model, arch), bare, atol=0, rtol=0)


def test_all_linear_is_read_as_peft_reads_it(tmp_path):
    # PEFT saves the names "all-linear" resolved to; a hand-written config may still say "all-linear"
    expected = train_with_peft("bert", {"target_modules": "all-linear", "task_type": "SEQ_CLS"}, tmp_path / "adapter")
    model = tiny_model("bert")
    delta_model = load_peft_adapter(_edit(tmp_path / "adapter", target_modules="all-linear"), model)
    assert "bert.pooler.dense" in [t.name for t in delta_model.targets] and "classifier" not in delta_model.targets
    torch.testing.assert_close(run(model, "bert"), expected, atol=ATOL, rtol=0)


def test_an_adapter_pickled_by_older_peft_loads_through_weights_only(tmp_path):
    expected = train_with_peft("bert", {"target_modules": ["key"]}, tmp_path / "adapter", safe_serialization=False)
    assert (tmp_path / "adapter" / "adapter_model.bin").is_file()
    fresh = tiny_model("bert")
    load_peft_adapter(tmp_path / "adapter", fresh)
    torch.testing.assert_close(run(fresh, "bert"), expected, atol=ATOL, rtol=0)


def test_the_config_reads_peft_fields():
    config = json.loads(
        '{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_rslora": true, "lora_dropout": 0.1, '
        '"target_modules": ["query", "value", "q_proj"]}'
    )
    from opendelta_lora.peft_format import lora_config_from_peft

    lora = lora_config_from_peft(config, tiny_model("bert"))
    assert (lora.lora_r, lora.lora_alpha, lora.lora_dropout) == (4, 16.0, 0.1)  # 8 / sqrt(4) == 16 / 4
    # "q_proj" matches nothing in BERT: PEFT ignores it, OpenDelta wants every pattern to match: exact names then
    assert lora.modified_modules == [
        f"bert.encoder.layer.{i}.attention.self.{p}" for i in range(2) for p in ("query", "value")
    ]


@pytest.mark.parametrize(
    ("arch", "kwargs", "head"),
    [
        ("bert", {"modified_modules": ["query", "value"]}, ["classifier"]),
        ("gpt2", {}, []),  # the default: the q and v slices of the fused c_attn only
        ("t5", {"modified_modules": ["SelfAttention.q", "EncDecAttention.v", "wo"], "lora_r": 2}, []),
        ("bart", {"lora_alpha": 32, "lora_dropout": 0.2}, []),
        ("opt", {"modified_modules": ["fc1"]}, ["score"]),
    ],
)
def test_an_exported_lora_model_loads_in_peft_with_identical_outputs(tmp_path, arch, kwargs, head):
    model = backbone(arch)
    delta_model = LoraModel(model, **kwargs)
    perturb(delta_model, scale=0.3)
    with torch.no_grad():
        for module in head:
            for param in model.get_submodule(module).parameters():  # a task head trained with the delta
                param.add_(0.5)
    expected = run(model, arch)
    task_type = "SEQ_CLS" if arch == "opt" else None  # PeftModelForSequenceClassification, which wraps the head too
    save_peft_adapter(delta_model, tmp_path / "adapter", modules_to_save=head, task_type=task_type)
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert all(
        k.startswith("base_model.model.") for k in load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    )
    peft_model = peft.PeftModel.from_pretrained(backbone(arch), tmp_path / "adapter")
    torch.testing.assert_close(run(peft_model.eval(), arch), expected, atol=ATOL, rtol=0)
    if not head:  # the adapter does change the output
        assert (expected - run(backbone(arch), arch)).abs().max() > 100 * ATOL


def test_export_uses_short_target_names_when_they_say_the_same(tmp_path):
    model = tiny_model("bert")
    save_peft_adapter(LoraModel(model, modified_modules=["query", "value"]), tmp_path / "short")
    assert json.loads((tmp_path / "short" / "adapter_config.json").read_text())["target_modules"] == ["query", "value"]
    model = tiny_model("bert")
    save_peft_adapter(LoraModel(model, modified_modules=["0.attention.self.query"]), tmp_path / "full")
    config = json.loads((tmp_path / "full" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["bert.encoder.layer.0.attention.self.query"]  # "query" would say layer 1 too
    assert config["fan_in_fan_out"] is False and config["r"] == 8 and config["lora_alpha"] == 16


def test_round_trip_through_the_peft_format(tmp_path):
    model = tiny_model("gpt2")
    delta_model = LoraModel(model, lora_r=3, lora_alpha=5)
    perturb(delta_model, scale=0.3)
    expected = run(model, "gpt2")
    save_peft_adapter(delta_model, tmp_path / "adapter")
    fresh = tiny_model("gpt2")
    again = load_peft_adapter(tmp_path / "adapter", fresh)
    torch.testing.assert_close(run(fresh, "gpt2"), expected, atol=ATOL, rtol=0)
    assert (again.config.lora_r, again.config.lora_alpha) == (3, 5)
    # the q/v slices became a LoRA on the whole c_attn whose k rows are zero
    assert [t.parts for t in again.targets] == [None, None]
    assert torch.count_nonzero(again.deltas[0].lora_B[32:64]) == 0


def _edit(folder: Path, **changes) -> Path:
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"use_dora": True}, "use_dora=True but the weights hold no lora_magnitude_vector for bert.encoder"),
        ({"rank_pattern": {"query": 2}}, "rank_pattern={'query': 2} is a PEFT option that changes"),
        ({"alpha_pattern": {"value": 4}}, "alpha_pattern="),
        ({"lora_bias": True}, "lora_bias=True"),
        ({"bias": "all"}, "bias='all', which also trains the backbone's own biases"),
        ({"some_future_option": 3}, "some_future_option=3 is a PEFT option unknown here"),
        ({"peft_type": "IA3"}, "holds a PEFT 'IA3' adapter \\(peft_type\\)"),
        ({"target_modules": ["q_proj"]}, "matches no module of this BertForSequenceClassification"),
        (
            {"target_modules": ["word_embeddings", "query"]},
            "word_embeddings \\(Embedding\\): LoraModel modifies linear",
        ),
        ({"target_modules": None}, "has no target_modules"),
    ],
)
def test_what_lora_model_cannot_compute_is_refused_naming_it(tmp_path, changes, message):
    train_with_peft("bert", {"target_modules": ["query", "value"]}, tmp_path / "adapter")
    model = tiny_model("bert")
    before = run(model, "bert")
    with pytest.raises(CheckpointError, match=message):
        load_peft_adapter(_edit(tmp_path / "adapter", **changes), model)
    assert not delta_parameter_names(model) and torch.equal(run(model, "bert"), before)


def test_weights_that_do_not_fit_are_refused_and_the_backbone_left_alone(tmp_path):
    train_with_peft("bert", {"target_modules": ["query", "value"]}, tmp_path / "adapter")
    _edit(tmp_path / "adapter", r=2)  # the tensors have rank 4
    model = tiny_model("bert")
    with pytest.raises(
        CheckpointError, match=r"shape mismatch \['bert\.encoder\.layer\.0\.attention\.self\.query\.lora"
    ):
        load_peft_adapter(tmp_path / "adapter", model)
    assert not delta_parameter_names(model)
    with pytest.raises(CheckpointError, match="not a PEFT adapter folder"):
        load_peft_adapter(tmp_path, model)


def test_modules_to_save_must_name_modules_outside_the_lora_targets(tmp_path):
    model = tiny_model("bert")
    delta_model = LoraModel(model, modified_modules=["query"])
    with pytest.raises(CheckpointError, match="'nonexistent' matches no module"):
        save_peft_adapter(delta_model, tmp_path / "a", modules_to_save=["nonexistent"])
    with pytest.raises(CheckpointError, match="'attention' contains LoRA targets"):
        save_peft_adapter(delta_model, tmp_path / "a", modules_to_save=["attention"])
    with pytest.raises(TypeError, match="exports a LoraModel"):
        save_peft_adapter(model, tmp_path / "a")


def test_from_finetuned_reads_a_peft_folder_and_save_peft_writes_one(tmp_path):
    expected = train_with_peft("bert", {"target_modules": ["query", "value"]}, tmp_path / "a")
    model = tiny_model("bert")
    delta_model = AutoDeltaModel.from_finetuned(tmp_path / "a", model)
    assert isinstance(delta_model, LoraModel)
    torch.testing.assert_close(run(model, "bert"), expected, atol=ATOL, rtol=0)
    delta_model.save_peft(tmp_path / "b")
    again = tiny_model("bert")
    LoraModel.from_finetuned(tmp_path / "b", again)
    torch.testing.assert_close(run(again, "bert"), expected, atol=ATOL, rtol=0)


def test_our_all_linear_is_peft_s_on_a_decoder_and_leaves_bert_s_pooler_and_head_out():
    """On a causal LM both take every linear layer but the LM head; on BERT PEFT also takes the pooler (and the
    classifier unless task_type is SEQ_CLS), which sit outside the blocks ours is limited to."""
    for arch, head in (("llama", "LlamaForCausalLM"), ("bert", None)):
        ours = {t.name for t in LoraModel(tiny_model(arch, head), modified_modules="all-linear").targets}
        wrapped = peft.get_peft_model(tiny_model(arch, head), peft.LoraConfig(r=2, target_modules="all-linear"))
        theirs = {n.removeprefix("base_model.model.") for n, m in wrapped.named_modules() if hasattr(m, "lora_A")}
        if arch == "llama":
            assert ours == theirs and len(ours) == 14
        else:
            assert ours < theirs and theirs - ours == {"bert.pooler.dense", "classifier"}
