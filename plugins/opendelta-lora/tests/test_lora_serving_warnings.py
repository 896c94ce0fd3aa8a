"""save_peft warns when it writes an adapter vLLM or TGI will refuse; its files follow the umask; the card says how
to install the plugin before it is published."""

from __future__ import annotations

import os
import stat
import warnings

import pytest

from opendelta import OpenDeltaServingWarning
from opendelta.testing import tiny_model
from opendelta_lora import LoraModel


def served_warnings(call):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    return [str(w.message) for w in caught if issubclass(w.category, OpenDeltaServingWarning)]


def test_modules_to_save_warns_that_vllm_refuses_it(tmp_path):
    delta_model = LoraModel(tiny_model("gpt2", head="GPT2LMHeadModel"), lora_r=2)
    messages = served_warnings(lambda: delta_model.save_peft(tmp_path / "a", modules_to_save=["lm_head"]))
    assert len(messages) == 1 and "modules_to_save=['lm_head']" in messages[0] and "vLLM refuses" in messages[0]
    assert "not a decoder-only" not in messages[0]  # GPT2LMHeadModel itself is servable


@pytest.mark.parametrize(
    ("arch", "head"), [("bert", "BertForSequenceClassification"), ("t5", "T5ForConditionalGeneration")]
)
def test_an_encoder_or_encoder_decoder_backbone_warns_with_its_class(arch, head, tmp_path):
    delta_model = LoraModel(tiny_model(arch, head=head), lora_r=2)
    messages = served_warnings(lambda: delta_model.save_peft(tmp_path / "a"))
    assert len(messages) == 1 and f"{head} is not a decoder-only causal LM" in messages[0]
    assert (tmp_path / "a" / "adapter_config.json").is_file()  # written all the same: PEFT loads it


@pytest.mark.parametrize(("arch", "head"), [("gpt2", "GPT2LMHeadModel"), ("opt", "OPTForCausalLM")])
def test_a_plain_lora_on_a_causal_lm_is_silent(arch, head, tmp_path):
    delta_model = LoraModel(tiny_model(arch, head=head), lora_r=2)
    assert served_warnings(lambda: delta_model.save_peft(tmp_path / "a")) == []


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_saved_files_follow_the_umask_like_transformers(umask, tmp_path):
    model = tiny_model("bert")
    delta_model = LoraModel(model, lora_r=2)
    delta_model.freeze_module(exclude=["deltas"])
    old = os.umask(umask)
    try:
        delta_model.save_peft(tmp_path / "peft")
        delta_model.save_finetuned(tmp_path / "ckpt")
        model.config.save_pretrained(tmp_path / "hf")  # what transformers does, for comparison
    finally:
        os.umask(old)
    expected = 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / "hf" / "config.json").stat().st_mode) == expected
    files = [*(tmp_path / "peft").iterdir(), *(tmp_path / "ckpt").iterdir()]
    assert {f.name: stat.S_IMODE(f.stat().st_mode) for f in files} == {f.name: expected for f in files}


def test_the_model_card_names_the_published_and_the_wheelhouse_install(tmp_path):
    delta_model = LoraModel(tiny_model("bert"), lora_r=2)
    delta_model.freeze_module(exclude=["deltas"])
    delta_model.save_finetuned(tmp_path / "ckpt")
    card = (tmp_path / "ckpt" / "README.md").read_text()
    assert "pip install opendelta-core opendelta-lora\n" in card
    assert "`nox -s wheels`, then `pip install --find-links wheelhouse opendelta-core opendelta-lora`" in card
