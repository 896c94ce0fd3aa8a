"""PEFT 0.21.2 as the oracle: with PEFT's prompt encoder weights, our hidden states on the real positions are PEFT's."""

import pytest
import torch
from p_tuning_helpers import HEADS, HIDDEN, TOKENS, encoder_state, fresh, peft_p_tuning, real_rows, run

from opendelta_p_tuning import PTuningModel

pytest.importorskip("peft")


def ours_with_peft_weights(arch, kind, peft_model):
    model = fresh(arch)
    delta_model = PTuningModel(
        backbone_model=model,
        num_virtual_tokens=TOKENS,
        encoder_hidden_size=HIDDEN,
        encoder_reparameterization_type=kind,
    )
    delta_model.deltas[0].load_state_dict(encoder_state(peft_model))  # PEFT's names: embedding, mlp_head, lstm_head
    return model, delta_model


@pytest.mark.parametrize("kind", ["MLP", "LSTM"])
@pytest.mark.parametrize("arch", tuple(HEADS))
def test_the_hidden_states_on_the_real_positions_are_peft_s(arch, kind):
    peft_model = peft_p_tuning(fresh(arch), arch, kind, seed=1)
    model, _ = ours_with_peft_weights(arch, kind, peft_model)
    expected, ours = run(peft_model, arch), run(model, arch)
    error = (real_rows(expected, arch) - real_rows(ours, arch)).abs().max()
    assert error.item() <= 1e-5
    moved = (real_rows(run(fresh(arch), arch), arch, 0) - real_rows(ours, arch)).abs().max()
    assert moved.item() > 1e-3  # the prompt changes the real positions: the comparison is not of two bare models
    if arch == "t5":  # the decoder, which attends to the prompt through the extended mask, too
        assert (expected.logits - ours.logits).abs().max().item() <= 1e-5
    elif arch != "bert":  # LM logits: PEFT's keep the prompt rows, ours are the bare model's shape
        assert (expected.logits[:, TOKENS:] - ours.logits).abs().max().item() <= 1e-5


@pytest.mark.parametrize("arch", ["t5", "gpt2"])
def test_the_encoder_runs_over_peft_s_number_of_virtual_tokens(arch):
    """A seq2seq LM's encoder reads 2 P embeddings (PEFT's num_transformer_submodules=2), a causal LM's P."""
    peft_model = peft_p_tuning(fresh(arch), arch, "LSTM")
    _, delta_model = ours_with_peft_weights(arch, "LSTM", peft_model)
    expected = peft_model.prompt_encoder["default"].embedding.weight.shape[0]
    assert delta_model.deltas[0].embedding.weight.shape[0] == expected == TOKENS * (2 if arch == "t5" else 1)
    with torch.no_grad():
        assert torch.allclose(delta_model.deltas[0].prompt(), peft_model.get_prompt(1)[0, :TOKENS], atol=1e-6)
