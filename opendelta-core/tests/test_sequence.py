"""Extending a module call by leading positions, and taking them out of its output again."""

import pytest
import torch
from torch import nn

from opendelta.errors import DeltaStateError
from opendelta.sequence import align_with_cache, bound_arguments, extend_arguments, strip_positions, unbind


class Attention(nn.Module):
    def forward(self, hidden_states, attention_mask=None, position_bias=None, relative_pos=None, **kwargs):
        return hidden_states


def extended(**call):
    module = Attention()
    bound = bound_arguments(module, (), call)
    extend_arguments(bound, "hidden_states", 2, 3, relative_positions=("relative_pos",))
    args, kwargs = unbind(bound)
    return {
        **dict(zip(["hidden_states", "attention_mask", "position_bias", "relative_pos"], args, strict=False)),
        **kwargs,
    }


def test_masks_gain_attend_columns_and_rows_of_their_own_kind():
    additive = torch.tensor([[[[0.0, 0.0, -1e9]] * 3]])  # (1, 1, 3, 3)
    out = extended(hidden_states=torch.zeros(1, 3, 4), attention_mask=additive)["attention_mask"]
    assert out.shape == (1, 1, 5, 5) and torch.equal(out[..., 2:, 2:], additive) and out[..., :2].eq(0).all()
    boolean = extended(hidden_states=torch.zeros(1, 3, 4), attention_mask=torch.zeros(2, 1, 1, 3, dtype=torch.bool))
    assert boolean["attention_mask"].shape == (2, 1, 1, 5) and boolean["attention_mask"][..., :2].all()
    integer = extended(hidden_states=torch.zeros(1, 3, 4), attention_mask=torch.zeros(3, 3, dtype=torch.long))
    assert integer["attention_mask"].shape == (3, 5), (
        "a (batch, length) mask has no query rows, even when batch == length"
    )
    assert integer["attention_mask"][:, :2].eq(1).all()


def test_position_bias_gets_zeros_positions_move_up_and_relative_positions_are_rebuilt():
    bias = torch.randn(1, 2, 3, 3)
    out = extended(
        hidden_states=torch.zeros(1, 3, 4),
        position_bias=bias,
        relative_pos=torch.zeros(1, 3, 3, dtype=torch.long),
        cache_position=torch.arange(3),
    )
    assert torch.equal(out["position_bias"][..., 2:, 2:], bias) and out["position_bias"][..., :2].eq(0).all()
    assert out["relative_pos"] is None
    assert out["cache_position"].tolist() == [0, 1, 2, 3, 4]


def test_a_mask_that_fits_no_length_is_a_clear_error():
    with pytest.raises(DeltaStateError, match="attention_mask"):
        extended(hidden_states=torch.zeros(1, 3, 4), attention_mask=torch.zeros(1, 1, 1, 7))


def test_strip_cuts_the_hidden_state_and_square_tensors_only():
    hidden, bias, other = torch.randn(2, 5, 4), torch.randn(1, 2, 5, 5), torch.randn(2, 4)
    out_hidden, out_bias, out_other = strip_positions((hidden, bias, other), 2, 3)
    assert torch.equal(out_hidden, hidden[:, 2:]) and torch.equal(out_bias, bias[..., 2:, 2:]) and out_other is other


def test_strip_returns_a_contiguous_hidden_state_so_heads_run_the_bare_models_kernels():
    # a strided hidden state makes linear() pick mm or bmm by the head weight's requires_grad (see strip_positions)
    assert strip_positions(torch.randn(2, 5, 4), 2, 3).is_contiguous()


def test_align_with_cache_moves_positions_and_masks_by_what_the_cache_holds_extra():
    from transformers.cache_utils import DynamicCache

    cache = DynamicCache()
    cache.update(torch.zeros(1, 1, 6, 2), torch.zeros(1, 1, 6, 2), 0)  # 2 added + 4 counted tokens
    module = Attention()
    bound = bound_arguments(
        module, (), {"hidden_states": torch.zeros(1, 1, 4), "past": cache, "cache_position": torch.tensor([4])}
    )
    bound.arguments["kwargs"]["attention_mask"] = None
    assert align_with_cache(bound, 2, ("attention_mask",))
    assert bound.arguments["kwargs"]["cache_position"].tolist() == [6]
    again = bound_arguments(
        module, (), {"hidden_states": torch.zeros(1, 1, 4), "past": cache, "cache_position": torch.tensor([6])}
    )
    assert not align_with_cache(again, 2, ())
