"""The original OpenDelta quick start, unchanged, on a BERT built from a config, trained with a plain torch loop."""

import torch
from transformers import BertConfig, BertForSequenceClassification

from opendelta import AutoDeltaModel, LoraModel


def make_model(seed=0):
    torch.manual_seed(seed)
    config = BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, vocab_size=99, num_labels=2
    )
    return BertForSequenceClassification(config)


def test_quickstart_trains_saves_and_reloads(tmp_path, capsys):
    model = make_model()
    delta_model = LoraModel(backbone_model=model, modified_modules=["key"], lora_r=1)
    delta_model.freeze_module(exclude=["deltas", "classifier"], set_state_dict=True)
    delta_model.log()
    printed = capsys.readouterr().out
    assert "lora" in printed and "Trainable Ratio" in printed and "Delta Parameter Ratio" in printed

    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(model.state_dict())
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randint(1, 99, (16, 9), generator=generator)
    labels = (inputs[:, 0] > 50).long()
    frozen_before = model.bert.embeddings.word_embeddings.weight.clone()
    model.train()
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(inputs).logits, labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert torch.equal(model.bert.embeddings.word_embeddings.weight, frozen_before)

    model.eval()
    with torch.no_grad():
        tuned = model(inputs).logits
    delta_model.save_finetuned(tmp_path / "finetuned_delta")
    fresh_model = make_model()
    AutoDeltaModel.from_finetuned(tmp_path / "finetuned_delta", backbone_model=fresh_model)
    with torch.no_grad():
        assert torch.equal(fresh_model(inputs).logits, tuned)
