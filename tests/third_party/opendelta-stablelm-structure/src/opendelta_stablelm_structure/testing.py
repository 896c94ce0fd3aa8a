"""A tiny StableLM for tests: lets the conformance battery of any delta method run on StableLM.

Core's ``opendelta.testing.tiny_models`` builds the architectures ``common_structures`` ships mappings for; a
mapping package teaches it its own with ``register_architecture``. Grouped-query attention (2 key/value heads for 4
query heads) makes ``k_proj``/``v_proj`` narrower than ``q_proj``, so a method that assumes square attention
projections fails.
"""

from __future__ import annotations

from opendelta.testing.tiny_models import FFN_SIZE, HIDDEN_SIZE, MAX_POSITIONS, NUM_HEADS, NUM_LAYERS

__all__ = ["TINY_STABLELM", "register_tiny_stablelm"]

TINY_STABLELM = {
    "hidden_size": HIDDEN_SIZE,
    "intermediate_size": FFN_SIZE,
    "num_hidden_layers": NUM_LAYERS,
    "num_attention_heads": NUM_HEADS,
    "num_key_value_heads": NUM_HEADS // 2,
    "max_position_embeddings": MAX_POSITIONS,
    "attention_dropout": 0.0,
    "tie_word_embeddings": False,
}
"""Config values of the tiny StableLM (``vocab_size`` and ``num_labels`` come from core)."""


def register_tiny_stablelm() -> None:
    """Make ``tiny_model("stablelm")`` and ``tiny_inputs("stablelm")`` work (idempotent)."""
    from opendelta.testing.tiny_models import register_architecture

    register_architecture(
        "stablelm",
        TINY_STABLELM,
        heads=["StableLmModel", "StableLmForCausalLM", "StableLmForSequenceClassification"],
        # StableLM has no pad token of its own; sequence classification of a padded batch needs one.
        special_token_ids={"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
    )
