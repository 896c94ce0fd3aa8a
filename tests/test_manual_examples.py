"""The manual's composition and multitask-serving examples (sections 1.7 and 1.8), on the real base-size shapes.

The models are built from configs with the shapes of roberta-base and bart-base (random weights: no download), so
the parameter counts, and therefore the ratios ``log()`` prints, must equal the manual's printouts to the digit.
"""

import re

import pytest
import torch
from transformers import BartConfig, BartForSequenceClassification, RobertaConfig, RobertaForSequenceClassification

from opendelta import AdapterModel, LoraModel, LowRankAdapterModel
from opendelta.visualization import count_parameters


@pytest.fixture(scope="module")
def roberta_base():
    config = RobertaConfig(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, num_labels=2)
    torch.manual_seed(0)
    return RobertaForSequenceClassification(config).eval()


def bart_base():
    config = BartConfig(
        vocab_size=50265,
        d_model=768,
        encoder_layers=6,
        decoder_layers=6,
        encoder_attention_heads=12,
        decoder_attention_heads=12,
        encoder_ffn_dim=3072,
        decoder_ffn_dim=3072,
        max_position_embeddings=1024,
        num_labels=3,
    )
    torch.manual_seed(0)
    return BartForSequenceClassification(config).eval()


def logged(delta_model, capsys):
    """What ``log()`` printed, and the two ratios read back from it."""
    delta_model.log()
    out = capsys.readouterr().out
    trainable = re.search(r"Trainable Ratio: \d+/\d+=([\d.]+)%", out)
    delta = re.search(r"Delta Parameter Ratio: \d+/\d+=([\d.]+)%", out)
    assert trainable and delta, out[-500:]
    return out, trainable.group(1), delta.group(1)


def test_1_7_1_lora_and_adapter_on_roberta_base(roberta_base, capsys):
    delta_model = LoraModel(backbone_model=roberta_base, modified_modules=["key"], lora_r=1)
    delta_model2 = AdapterModel(backbone_model=roberta_base, modified_modules=["output"], bottleneck_dim=12)
    out, trainable, delta = logged(delta_model, capsys)
    assert (trainable, delta) == ("100.000000", "0.383228")
    assert "lora_A:[1, 768] lora_B:[768, 1]" in out
    assert (
        "down_proj (Linear) weight:[12, 768] bias:[12]" in out and "up_proj (Linear) weight:[768, 12] bias:[768]" in out
    )
    assert count_parameters(roberta_base).delta == sum(
        p.numel() for d in (delta_model, delta_model2) for p in d.parameters()
    )
    delta_model2.detach()
    delta_model.detach()


def test_1_7_2_three_deltas_on_one_layer_of_bart_base(capsys):
    model = bart_base()
    fc2 = model.model.encoder.layers[0].fc2
    x = torch.randn(1, 3, 3072)
    with torch.no_grad():
        inner = torch.nn.functional.linear(x, fc2.weight, fc2.bias)
    delta_model = AdapterModel(backbone_model=model, modified_modules=["fc2"])
    delta_model2 = AdapterModel(backbone_model=model, modified_modules=["fc2"], bottleneck_dim=12)
    delta_model3 = LowRankAdapterModel(backbone_model=model, modified_modules=["fc2"], reduction_factor=12)
    out, _, delta = logged(delta_model, capsys)
    assert delta == "0.506210"
    assert "W_left:[768, 1] W_right:[1, 64] b:[64]" in out and "W_left:[64, 1] W_right:[1, 768] b:[768]" in out
    with torch.no_grad():  # "Order of Insertion": adapter, then adapter_1, then the low-rank adapter
        expected = fc2.low_rank_adapter(fc2.adapter_1(fc2.adapter(inner)))
        assert torch.equal(fc2(x), expected)
    delta_model.detach()  # detaching the first-added one first leaves the others working
    with torch.no_grad():
        assert torch.equal(fc2(x), fc2.low_rank_adapter(fc2.adapter_1(inner)))
    delta_model3.detach()
    delta_model2.detach()
    with torch.no_grad():
        assert torch.equal(fc2(x), inner)


def test_1_8_multitask_serving_on_bart_base(capsys):
    model = bart_base()
    inputs = {"input_ids": torch.tensor([[0, 31414, 232, 328, 2]])}
    with torch.no_grad():
        bare = model(**inputs).logits
    delta_model = LoraModel(backbone_model=model, modified_modules=["fc2"])
    with torch.no_grad():
        for layer in delta_model.deltas:
            layer.lora_B.normal_(std=0.05)
        with_lora = model(**inputs).logits
    out, _, delta = logged(delta_model, capsys)
    assert delta == "0.262598" and "lora_A:[8, 3072] lora_B:[768, 8]" in out

    delta_model.detach()
    out, _, delta = logged(delta_model, capsys)
    assert delta == "0.000000" and "lora" not in out
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, bare)

    delta_model.attach()
    assert logged(delta_model, capsys)[2] == "0.262598"
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, with_lora)

    delta_model2 = AdapterModel(backbone_model=model, modified_modules=["fc1"])  # independent of the LoRA
    out, _, delta = logged(delta_model2, capsys)
    assert delta == "1.529844" and "down_proj (Linear) weight:[24, 3072] bias:[24]" in out

    delta_model.detach()  # detach the lora delta
    assert logged(delta_model, capsys)[2] == "1.273886"

    delta_model2.detach()  # detach the adapter delta and reattach the lora delta
    delta_model.attach()
    assert logged(delta_model, capsys)[2] == "0.262598"
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, with_lora)
