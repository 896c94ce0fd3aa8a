"""Every installed method's conformance battery on architectures no mapping covers: core infers their mappings.

Phi (parallel attention and MLP, the attention output called ``dense``), Starcoder2 (grouped-query attention,
``c_fc``/``c_proj``) and ELECTRA (BERT's layout under another name) are built from configs; nothing in
``common_structures`` names them, so every default below goes through ``opendelta.structure_inference``.
"""

from opendelta.registry import get_structure
from opendelta.testing import DeltaMethodSuite
from opendelta.testing.tiny_models import (
    FFN_SIZE,
    HIDDEN_SIZE,
    MAX_POSITIONS,
    NUM_HEADS,
    NUM_LAYERS,
    register_architecture,
)

_DECODER = {
    "hidden_size": HIDDEN_SIZE,
    "intermediate_size": FFN_SIZE,
    "num_hidden_layers": NUM_LAYERS,
    "num_attention_heads": NUM_HEADS,
    "max_position_embeddings": MAX_POSITIONS,
    "attention_dropout": 0.0,
    "tie_word_embeddings": False,
}
_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}

register_architecture(
    "phi",
    {**_DECODER, "resid_pdrop": 0.0, "embd_pdrop": 0.0},
    ["PhiModel", "PhiForCausalLM", "PhiForSequenceClassification"],
    _IDS,
)
register_architecture(
    "starcoder2",
    {**_DECODER, "num_key_value_heads": NUM_HEADS // 2, "residual_dropout": 0.0, "embedding_dropout": 0.0},
    ["Starcoder2Model", "Starcoder2ForCausalLM", "Starcoder2ForSequenceClassification"],
    _IDS,
)
register_architecture(
    "electra",
    {
        "hidden_size": HIDDEN_SIZE,
        "embedding_size": HIDDEN_SIZE,
        "intermediate_size": FFN_SIZE,
        "num_hidden_layers": NUM_LAYERS,
        "num_attention_heads": NUM_HEADS,
        "max_position_embeddings": MAX_POSITIONS,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
    },
    ["ElectraModel", "ElectraForSequenceClassification", "ElectraForMaskedLM"],
    _IDS,
)

INFERRED = ("phi", "starcoder2", "electra")


def test_none_of_them_is_mapped():
    assert not any(get_structure(arch) for arch in INFERRED)


class TestEveryMethodOnInferredArchitectures(DeltaMethodSuite):
    method_name = None  # parametrized over list_methods() by opendelta.testing.fixtures
    architectures = INFERRED
