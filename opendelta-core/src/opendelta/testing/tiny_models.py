"""Tiny, randomly initialised transformers models for tests.

Tests of delta methods and of common-structure mappings need real
transformers models of every supported architecture, but they must never
download weights and must run in seconds on a CPU. This module builds such
models from configs alone: every dimension is tiny, the feed-forward size is
an odd number different from the hidden size (so a swapped ``in``/``out``
dimension fails loudly instead of silently broadcasting), and every dropout
is zero so two forward passes give the same output.

The module deliberately imports nothing from the rest of ``opendelta``: it is
loaded by path from standalone tests (for example the common-structure
mapping tests) that must run without the library installed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import transformers
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

__all__ = [
    "ARCHITECTURES",
    "CACHE_DIFFERS_WITHOUT_DELTA",
    "EXPERT_FFN_SIZE",
    "FFN_SIZE",
    "FUSED_ARCHITECTURES",
    "GENERATION_HEADS",
    "HIDDEN_SIZE",
    "MAX_POSITIONS",
    "MODERN_ARCHITECTURES",
    "MOE_ARCHITECTURES",
    "NUM_HEADS",
    "NUM_LABELS",
    "NUM_LAYERS",
    "SHIPPED_ARCHITECTURES",
    "SPECIAL_TOKEN_IDS",
    "TASK_HEADS",
    "VISION_SPEECH_ARCHITECTURES",
    "VOCAB_SIZE",
    "generation_inputs",
    "model_output_tensor",
    "register_architecture",
    "registered_architectures",
    "tiny_config",
    "tiny_inputs",
    "tiny_model",
]

ARCHITECTURES: tuple[str, ...] = ("bert", "roberta", "t5", "gpt2", "bart", "deberta-v2", "opt")
"""HF ``model_type`` strings of the seven classic architectures, which every plugin's conformance battery covers."""

# --- Mixture-of-Experts decoders (issue 16) ----------------------------------------------------------------------
MOE_ARCHITECTURES: tuple[str, ...] = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
"""The sparse mixture-of-experts decoders: a router picks the top 2 of 4 experts per token in every block. Part of
:data:`MODERN_ARCHITECTURES`; named apart for the tests of what only they have (experts, routing)."""
# --- end of the Mixture-of-Experts block -------------------------------------------------------------------------

MODERN_ARCHITECTURES: tuple[str, ...] = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3_text",
    "olmo",
    "olmo2",
    "gptj",
    "mt5",
    *MOE_ARCHITECTURES,
)
"""The decoders (and mT5) people fine-tune today, mapped in ``common_structures`` too; the installed-plugin battery
covers them (``tests/test_modern_architectures.py``), a plugin's own battery may narrow to :data:`ARCHITECTURES`."""

# ---- fused projections (issue 16): Phi-3, GPT-NeoX, Falcon, ModernBERT, T5Gemma. Kept in blocks of their own
# ---- (here, after _ARCH_KWARGS, after GENERATION_HEADS) so concurrent additions to this file merge cleanly.
FUSED_ARCHITECTURES: tuple[str, ...] = ("phi3", "gpt_neox", "falcon", "modernbert", "t5gemma")
"""Architectures whose projections are fused in ways GPT-2's equal ``c_attn`` thirds do not describe: Phi-3's
unequal ``qkv_proj`` and fused ``gate_up_proj``, GPT-NeoX's per-head interleaved ``query_key_value``, Falcon's
grouped one, ModernBERT's ``Wqkv`` and ``Wi`` (an encoder); T5Gemma (Gemma 2 layers in an encoder-decoder) with
them. Part of :data:`MODERN_ARCHITECTURES`."""
MODERN_ARCHITECTURES += FUSED_ARCHITECTURES
# ---- end of the fused-projections block

# --- Vision and speech (issue 16): models that read images or audio instead of tokens, and CLIP's text tower. ---
VISION_SPEECH_ARCHITECTURES: tuple[str, ...] = ("vit", "clip", "clip_text_model", "clip_vision_model", "whisper")
"""ViT, CLIP (both towers together, and each alone: its text and vision models have model types of their own) and
Whisper, mapped in ``common_structures``; the installed-plugin battery covers them too
(``tests/test_modern_architectures.py``). Their inputs are pixels or log-mel features (see :func:`tiny_inputs`)."""
# --- end of vision and speech ---

SHIPPED_ARCHITECTURES: tuple[str, ...] = ARCHITECTURES + MODERN_ARCHITECTURES + VISION_SPEECH_ARCHITECTURES
"""Every architecture ``common_structures`` ships a mapping for."""

HIDDEN_SIZE = 32
"""Model width; divisible by :data:`NUM_HEADS` as every attention needs."""

FFN_SIZE = 37
"""Feed-forward width: odd and unlike :data:`HIDDEN_SIZE` so shape bugs show."""

NUM_LAYERS = 2
"""Layers per stack (encoder and decoder alike): two, so layer indices vary."""

NUM_HEADS = 4
"""Attention heads; head dimension is ``HIDDEN_SIZE // NUM_HEADS``."""

VOCAB_SIZE = 99
"""Vocabulary size; every special token id below lies inside it."""

MAX_POSITIONS = 128
"""Maximum sequence length for architectures with learned positions (room for the default 100 soft-prompt tokens)."""

NUM_LABELS = 3
"""Classes of the sequence-classification heads (not 2, the HF default)."""

SPECIAL_TOKEN_IDS: dict[str, dict[str, int]] = {
    # BERT and DeBERTa-v2 use [PAD]=0; bos/eos are set so generation helpers
    # and code that reads them never see ``None``.
    "bert": {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
    # RoBERTa, BART and OPT keep the fairseq ids of their real checkpoints;
    # RoBERTa derives position ids from ``pad_token_id``, so it must stay 1.
    "roberta": {"pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2},
    # T5 starts decoding with the pad token; the config does not set
    # ``decoder_start_token_id`` by default, which breaks label shifting.
    "t5": {"pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 1, "decoder_start_token_id": 0},
    # GPT-2's defaults (50256) lie outside a 99-token vocabulary and it has
    # no pad token, without which sequence classification of a batch fails.
    "gpt2": {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
    "bart": {"pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2, "decoder_start_token_id": 2},
    "deberta-v2": {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
    "opt": {"pad_token_id": 1, "bos_token_id": 2, "eos_token_id": 2},
    # The modern decoders' real ids (32000, 50279, 151643...) lie outside the tiny vocabulary; most have no pad token.
    **{arch: {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2} for arch in MODERN_ARCHITECTURES},
    "mt5": {"pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 1, "decoder_start_token_id": 0},
}
"""Special token ids per architecture, all inside :data:`VOCAB_SIZE`."""

_FIRST_ORDINARY_TOKEN = 4
"""Random tokens are drawn from ``[4, VOCAB_SIZE)`` so none is a special id."""

_ARCH_KWARGS: dict[str, dict[str, Any]] = {
    "bert": {
        "hidden_size": HIDDEN_SIZE,
        "num_hidden_layers": NUM_LAYERS,
        "num_attention_heads": NUM_HEADS,
        "intermediate_size": FFN_SIZE,
        "max_position_embeddings": MAX_POSITIONS,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "classifier_dropout": 0.0,
    },
    "roberta": {
        "hidden_size": HIDDEN_SIZE,
        "num_hidden_layers": NUM_LAYERS,
        "num_attention_heads": NUM_HEADS,
        "intermediate_size": FFN_SIZE,
        "max_position_embeddings": MAX_POSITIONS,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "classifier_dropout": 0.0,
    },
    "t5": {
        "d_model": HIDDEN_SIZE,
        "d_kv": HIDDEN_SIZE // NUM_HEADS,
        "d_ff": FFN_SIZE,
        "num_layers": NUM_LAYERS,
        "num_decoder_layers": NUM_LAYERS,
        "num_heads": NUM_HEADS,
        "dropout_rate": 0.0,
        "classifier_dropout": 0.0,
    },
    "gpt2": {
        "n_embd": HIDDEN_SIZE,
        "n_layer": NUM_LAYERS,
        "n_head": NUM_HEADS,
        "n_inner": FFN_SIZE,
        "n_positions": MAX_POSITIONS,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "summary_first_dropout": 0.0,
    },
    "bart": {
        "d_model": HIDDEN_SIZE,
        "encoder_layers": NUM_LAYERS,
        "decoder_layers": NUM_LAYERS,
        "encoder_attention_heads": NUM_HEADS,
        "decoder_attention_heads": NUM_HEADS,
        "encoder_ffn_dim": FFN_SIZE,
        "decoder_ffn_dim": FFN_SIZE,
        "max_position_embeddings": MAX_POSITIONS,
        "dropout": 0.0,
        "attention_dropout": 0.0,
        "activation_dropout": 0.0,
        "classifier_dropout": 0.0,
        # The default forces eos id 2 during generation; keep it consistent.
        "forced_eos_token_id": SPECIAL_TOKEN_IDS["bart"]["eos_token_id"],
    },
    "deberta-v2": {
        "hidden_size": HIDDEN_SIZE,
        "num_hidden_layers": NUM_LAYERS,
        "num_attention_heads": NUM_HEADS,
        "intermediate_size": FFN_SIZE,
        "max_position_embeddings": MAX_POSITIONS,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "pooler_dropout": 0.0,
        # Defaults to the *default* hidden size (1536) in some versions.
        "pooler_hidden_size": HIDDEN_SIZE,
        # DeBERTa-v3's disentangled attention (the default config has none): relative positions in buckets,
        # content-to-position and position-to-content terms, no absolute positions at the input.
        "relative_attention": True,
        "pos_att_type": ["p2c", "c2p"],
        "position_buckets": 16,
        "max_relative_positions": -1,
        "share_att_key": True,
        "norm_rel_ebd": "layer_norm",
        "position_biased_input": False,
    },
    "opt": {
        "hidden_size": HIDDEN_SIZE,
        # Equal to the hidden size so OPT has no project_in/project_out,
        # like every OPT size except 350m.
        "word_embed_proj_dim": HIDDEN_SIZE,
        "num_hidden_layers": NUM_LAYERS,
        "num_attention_heads": NUM_HEADS,
        "ffn_dim": FFN_SIZE,
        "max_position_embeddings": MAX_POSITIONS,
        "dropout": 0.0,
        "attention_dropout": 0.0,
        "layerdrop": 0.0,
    },
}

_DECODER_KWARGS: dict[str, Any] = {
    "hidden_size": HIDDEN_SIZE,
    "intermediate_size": FFN_SIZE,
    "num_hidden_layers": NUM_LAYERS,
    "num_attention_heads": NUM_HEADS,
    # Grouped-query attention: k_proj/v_proj are half as wide as q_proj, so a method assuming square projections fails.
    "num_key_value_heads": NUM_HEADS // 2,
    "head_dim": HIDDEN_SIZE // NUM_HEADS,
    "max_position_embeddings": MAX_POSITIONS,
    "attention_dropout": 0.0,
    "tie_word_embeddings": False,
}
"""The LLaMA-family decoders' tiny config; the entries below add what each one has of its own."""

_ARCH_KWARGS.update(
    {
        "llama": dict(_DECODER_KWARGS),
        # A window shorter than the tiny inputs plus a prompt, so the sliding-window path really runs.
        "mistral": {**_DECODER_KWARGS, "sliding_window": 5},
        "qwen2": dict(_DECODER_KWARGS),
        "qwen3": dict(_DECODER_KWARGS),
        "gemma": dict(_DECODER_KWARGS),
        # Alternating sliding (window 5) and global layers, attention-logit and final-logit soft-capping.
        "gemma2": {**_DECODER_KWARGS, "sliding_window": 5, "attn_logit_softcapping": 50.0, "query_pre_attn_scalar": 8},
        "gemma3_text": {**_DECODER_KWARGS, "sliding_window": 5, "query_pre_attn_scalar": 8},
        "olmo": dict(_DECODER_KWARGS),
        "olmo2": dict(_DECODER_KWARGS),
        "gptj": {
            "n_embd": HIDDEN_SIZE,
            "n_layer": NUM_LAYERS,
            "n_head": NUM_HEADS,
            "n_inner": FFN_SIZE,
            "n_positions": MAX_POSITIONS,
            "rotary_dim": 4,  # rotary on half of each 8-wide head (the default 64 is wider than the head)
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "tie_word_embeddings": False,
        },
        # T5's tiny config with mT5's gated-GELU feed-forward (wi_0, wi_1, wo).
        "mt5": {**_ARCH_KWARGS["t5"], "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False},
    }
)

# ---- fused projections (issue 16): the tiny configs of FUSED_ARCHITECTURES
SPECIAL_TOKEN_IDS.update(
    {
        # ModernBERT's [CLS]/[SEP] (50281, 50282) lie outside the tiny vocabulary like the rest.
        "modernbert": {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "cls_token_id": 1, "sep_token_id": 2},
        # T5Gemma keeps Gemma's ids (pad 0, eos 1, bos 2); decoding starts from the pad token, as T5's does.
        "t5gemma": dict(SPECIAL_TOKEN_IDS["t5"]),
    }
)
_T5GEMMA_STACK: dict[str, Any] = {
    **_DECODER_KWARGS,
    "vocab_size": VOCAB_SIZE,
    "sliding_window": 5,
    "query_pre_attn_scalar": 8,
    **{key: value for key, value in SPECIAL_TOKEN_IDS["t5"].items() if key != "decoder_start_token_id"},
}
"""One stack of T5Gemma (encoder or decoder): Gemma 2's layers, sliding windows and soft-capping, tiny."""
_ARCH_KWARGS.update(
    {
        # Grouped-query attention makes qkv_proj's parts unequal: q is 32 features wide, k and v 16 each.
        "phi3": {**_DECODER_KWARGS, "resid_pdrop": 0.0, "embd_pdrop": 0.0},
        # query_key_value is [heads, 3, head_dim]: q, k and v interleaved per head.
        "gpt_neox": {
            "hidden_size": HIDDEN_SIZE,
            "intermediate_size": FFN_SIZE,
            "num_hidden_layers": NUM_LAYERS,
            "num_attention_heads": NUM_HEADS,
            "max_position_embeddings": MAX_POSITIONS,
            "hidden_dropout": 0.0,
            "attention_dropout": 0.0,
            "classifier_dropout": 0.0,
            "tie_word_embeddings": False,
        },
        # Falcon-40B's layout: the new decoder architecture with grouped key/value heads (query_key_value is, per
        # key/value group, the group's query heads, then one key and one value head) and two layer norms per block.
        "falcon": {
            "hidden_size": HIDDEN_SIZE,
            "ffn_hidden_size": FFN_SIZE,
            "num_hidden_layers": NUM_LAYERS,
            "num_attention_heads": NUM_HEADS,
            "num_kv_heads": NUM_HEADS // 2,
            "new_decoder_architecture": True,
            "max_position_embeddings": MAX_POSITIONS,
            "hidden_dropout": 0.0,
            "attention_dropout": 0.0,
            "tie_word_embeddings": False,
        },
        # Layer 0 global, layer 1 local attention with a window shorter than the tiny inputs plus a prompt; no
        # torch.compile of the MLP (4.57's reference_compile), no biases (ModernBERT's default).
        "modernbert": {
            "hidden_size": HIDDEN_SIZE,
            "intermediate_size": FFN_SIZE,
            "num_hidden_layers": NUM_LAYERS,
            "num_attention_heads": NUM_HEADS,
            "max_position_embeddings": MAX_POSITIONS,
            "global_attn_every_n_layers": 2,
            "local_attention": 4,
            "embedding_dropout": 0.0,
            "mlp_dropout": 0.0,
            "attention_dropout": 0.0,
            "classifier_dropout": 0.0,
            "reference_compile": False,
        },
        "t5gemma": {
            "encoder": dict(_T5GEMMA_STACK),
            "decoder": dict(_T5GEMMA_STACK),
            "dropout_rate": 0.0,
            "attention_dropout": 0.0,
            "tie_word_embeddings": False,
        },
    }
)
# ---- end of the fused-projections block
# --- Mixture-of-Experts decoders (issue 16) ----------------------------------------------------------------------
EXPERT_FFN_SIZE = 20
"""Each expert's feed-forward width: unlike :data:`HIDDEN_SIZE`, and a multiple of 4 floats because transformers 5
runs the experts with ``grouped_mm`` by default, whose strides must be multiples of 16 bytes (an odd width makes the
bare model fail, which tests nothing of ours)."""

_MOE_KWARGS: dict[str, Any] = {
    **_DECODER_KWARGS,
    "intermediate_size": EXPERT_FFN_SIZE,
    "num_experts_per_tok": 2,
    "router_jitter_noise": 0.0,  # Mixtral's: multiplicative noise on the router input while training
    "output_router_logits": False,
}
"""The tiny decoder with a sparse feed-forward: 4 experts of width :data:`EXPERT_FFN_SIZE`, 2 per token. The
number of experts is ``num_local_experts`` on Mixtral and ``num_experts`` on the others; every block is sparse
(``decoder_sparse_step`` 1, no ``mlp_only_layers``), so every block has the same modules and the mappings' ``$``
fits them all."""

_ARCH_KWARGS.update(
    {
        "mixtral": {**_MOE_KWARGS, "num_local_experts": 4},
        # Qwen2-MoE's shared expert beside the routed ones, narrower than them so a swapped size shows.
        "qwen2_moe": {
            **_MOE_KWARGS,
            "num_experts": 4,
            "moe_intermediate_size": EXPERT_FFN_SIZE,
            "shared_expert_intermediate_size": 19,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
        },
        "qwen3_moe": {
            **_MOE_KWARGS,
            "num_experts": 4,
            "moe_intermediate_size": EXPERT_FFN_SIZE,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
        },
        "olmoe": {**_MOE_KWARGS, "num_experts": 4},
    }
)
# --- end of the Mixture-of-Experts block -------------------------------------------------------------------------

TASK_HEADS: dict[str, list[str]] = {
    "bert": ["BertModel", "BertForSequenceClassification", "BertForMaskedLM"],
    "roberta": ["RobertaModel", "RobertaForSequenceClassification", "RobertaForMaskedLM"],
    "t5": ["T5Model", "T5ForConditionalGeneration"],
    "gpt2": ["GPT2Model", "GPT2LMHeadModel", "GPT2ForSequenceClassification"],
    "bart": ["BartModel", "BartForConditionalGeneration", "BartForSequenceClassification"],
    "deberta-v2": ["DebertaV2Model", "DebertaV2ForSequenceClassification", "DebertaV2ForMaskedLM"],
    "opt": ["OPTModel", "OPTForCausalLM", "OPTForSequenceClassification"],
    **{
        arch: [f"{prefix}Model", f"{prefix}ForCausalLM", f"{prefix}ForSequenceClassification"]
        for arch, prefix in [
            ("llama", "Llama"),
            ("mistral", "Mistral"),
            ("qwen2", "Qwen2"),
            ("qwen3", "Qwen3"),
            ("gemma", "Gemma"),
            ("gemma2", "Gemma2"),
            ("gptj", "GPTJ"),
        ]
    },
    "gemma3_text": ["Gemma3TextModel", "Gemma3ForCausalLM", "Gemma3TextForSequenceClassification"],
    # Their sequence-classification classes exist on transformers 5 only.
    "olmo": ["OlmoModel", "OlmoForCausalLM"],
    "olmo2": ["Olmo2Model", "Olmo2ForCausalLM"],
    "mt5": ["MT5Model", "MT5ForConditionalGeneration"],
}
"""Model classes per architecture that tests treat as derivative models.

Names, not classes, so importing this module stays cheap and does not fail
on a transformers version that lacks one class; resolve a name with
``getattr(transformers, name)``.
"""

# ---- fused projections (issue 16): the task heads of FUSED_ARCHITECTURES, on transformers 4.57 and 5 alike
TASK_HEADS.update(
    {
        **{
            arch: [f"{prefix}Model", f"{prefix}ForCausalLM", f"{prefix}ForSequenceClassification"]
            for arch, prefix in [("phi3", "Phi3"), ("gpt_neox", "GPTNeoX"), ("falcon", "Falcon")]
        },
        "modernbert": ["ModernBertModel", "ModernBertForMaskedLM", "ModernBertForSequenceClassification"],
        "t5gemma": ["T5GemmaModel", "T5GemmaForConditionalGeneration", "T5GemmaForSequenceClassification"],
    }
)
# ---- end of the fused-projections block
# --- Mixture-of-Experts decoders (issue 16) ----------------------------------------------------------------------
TASK_HEADS.update(
    {
        "mixtral": ["MixtralModel", "MixtralForCausalLM", "MixtralForSequenceClassification"],
        "qwen2_moe": ["Qwen2MoeModel", "Qwen2MoeForCausalLM", "Qwen2MoeForSequenceClassification"],
        "qwen3_moe": ["Qwen3MoeModel", "Qwen3MoeForCausalLM", "Qwen3MoeForSequenceClassification"],
        # OLMoE has no sequence-classification class on either transformers line.
        "olmoe": ["OlmoeModel", "OlmoeForCausalLM"],
    }
)
# --- end of the Mixture-of-Experts block -------------------------------------------------------------------------

GENERATION_HEADS: dict[str, str] = {
    "gpt2": "GPT2LMHeadModel",
    "opt": "OPTForCausalLM",
    "t5": "T5ForConditionalGeneration",
    "bart": "BartForConditionalGeneration",
    **{arch: TASK_HEADS[arch][1] for arch in MODERN_ARCHITECTURES},
}
"""The class that ``generate()`` runs on, per architecture that generates text (decoders and encoder-decoders)."""

# ---- fused projections (issue 16): generation
del GENERATION_HEADS["modernbert"]  # an encoder, nothing to generate
CACHE_DIFFERS_WITHOUT_DELTA: dict[str, str] = {
    "t5gemma": "transformers' own T5Gemma generates differently with and without the key/value cache with no delta "
    "attached (scores differ by ~5e-3 on transformers 5, tokens on 4.57), so a delta's cache == no-cache cannot hold"
}
"""Architectures whose bare model already fails ``generate(use_cache=True) == generate(use_cache=False)``, with the
reason: tests that compare the two with a delta skip them saying so (``tests/test_fused_projections.py`` checks the
bare model still differs, so an entry goes when transformers is fixed)."""
# ---- end of the fused-projections block

_ENCODER_DECODERS = {"t5", "bart", "mt5"}
_ENCODER_DECODERS.add("t5gemma")  # fused projections (issue 16)
_LM_SUFFIXES = ("ForConditionalGeneration", "LMHeadModel", "ForCausalLM", "ForMaskedLM")

# --- Vision and speech (issue 16): tiny configs, heads and the inputs each architecture reads. ---

IMAGE_SIZE = 8
"""Image side in pixels: with :data:`PATCH_SIZE` 4, four patches (and ViT's and CLIP's class token: five positions)."""

PATCH_SIZE = 4
"""Side of one image patch; also ViT's ``encoder_stride``, so its masked-image-modelling decoder rebuilds 8 pixels."""

NUM_MEL_BINS = 8
"""Whisper's log-mel channels (80 or 128 in real checkpoints)."""

AUDIO_POSITIONS = 8
"""Whisper's encoder positions (``max_source_positions``, 1500 in real checkpoints): its input is twice as many
frames, since the second convolution of its front end has stride 2; Whisper accepts no other input length."""

_FAIRSEQ_SIZES_AND_DROPOUTS = (
    *("d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads", "decoder_attention_heads"),
    *("encoder_ffn_dim", "decoder_ffn_dim", "dropout", "attention_dropout", "activation_dropout"),
)
"""The config names Whisper shares with BART (fairseq's): its tiny sizes and dropouts are BART's."""

_IMAGE_ENCODER: dict[str, Any] = {
    "hidden_size": HIDDEN_SIZE,
    "num_hidden_layers": NUM_LAYERS,
    "num_attention_heads": NUM_HEADS,
    "intermediate_size": FFN_SIZE,
    "image_size": IMAGE_SIZE,
    "patch_size": PATCH_SIZE,
    "num_channels": 3,
}
"""The sizes ViT and CLIP's vision tower share (their dropout settings have different names)."""

_VISION_TOWER: dict[str, Any] = {**_IMAGE_ENCODER, "attention_dropout": 0.0}
"""CLIP's vision tower (a ``CLIPVisionConfig``), alone or inside ``CLIPConfig``."""

_TEXT_TOWER: dict[str, Any] = {
    "hidden_size": HIDDEN_SIZE,
    "num_hidden_layers": NUM_LAYERS,
    "num_attention_heads": NUM_HEADS,
    "intermediate_size": FFN_SIZE,
    "max_position_embeddings": MAX_POSITIONS,
    "vocab_size": VOCAB_SIZE,
    "attention_dropout": 0.0,
    # Not 2: with eos id 2 CLIP pools on the largest token id (its configs before transformers PR #24773), while real
    # checkpoints pool on the first eos token, which tiny_inputs puts at the end of every row.
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 3,
}
"""CLIP's text tower (a ``CLIPTextConfig``), alone or inside ``CLIPConfig``."""

SPECIAL_TOKEN_IDS.update(
    {
        # ViT reads no tokens: no special ids (tiny_config passes none to its config).
        "vit": {},
        "clip": {k: _TEXT_TOWER[k] for k in ("pad_token_id", "bos_token_id", "eos_token_id")},
        "clip_text_model": {k: _TEXT_TOWER[k] for k in ("pad_token_id", "bos_token_id", "eos_token_id")},
        "clip_vision_model": {},
        # Whisper's decoder starts from <|startoftranscript|> (50258 in real checkpoints).
        "whisper": {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 3},
    }
)

_ARCH_KWARGS.update(
    {
        "vit": {
            **_IMAGE_ENCODER,
            "encoder_stride": PATCH_SIZE,
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
        },
        "clip": {"text_config": _TEXT_TOWER, "vision_config": _VISION_TOWER, "projection_dim": 16},
        "clip_text_model": dict(_TEXT_TOWER),
        "clip_vision_model": dict(_VISION_TOWER),
        "whisper": {
            **{key: _ARCH_KWARGS["bart"][key] for key in _FAIRSEQ_SIZES_AND_DROPOUTS},
            "num_mel_bins": NUM_MEL_BINS,
            "max_source_positions": AUDIO_POSITIONS,
            "max_target_positions": MAX_POSITIONS,
            "encoder_layerdrop": 0.0,
            "decoder_layerdrop": 0.0,
            # The defaults suppress ids 220 and 50256 during generation, outside the 99-token vocabulary.
            "suppress_tokens": [],
            "begin_suppress_tokens": [],
        },
    }
)

TASK_HEADS.update(
    {
        "vit": ["ViTModel", "ViTForImageClassification", "ViTForMaskedImageModeling"],
        # CLIPForImageClassification (the vision tower alone under a CLIPConfig) is left out: it has no text tower
        # for the clip mapping to name, and reads no input_ids.
        "clip": ["CLIPModel"],
        "clip_text_model": ["CLIPTextModel", "CLIPTextModelWithProjection"],
        "clip_vision_model": ["CLIPVisionModel", "CLIPVisionModelWithProjection"],
        # WhisperForAudioClassification (the encoder alone) is left out: it reads no decoder_input_ids.
        "whisper": ["WhisperModel", "WhisperForConditionalGeneration"],
    }
)

GENERATION_HEADS["whisper"] = "WhisperForConditionalGeneration"


def _pixel_inputs(batch: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
    """Random RGB images of :data:`IMAGE_SIZE` pixels (``seq`` does not apply: the patches make the sequence)."""
    generator = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)}


def _clip_text_inputs(batch: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
    """Token rows that each end with CLIP's eos token, on which CLIP pools the text."""
    inputs = _token_inputs("clip_text_model", batch, seq, seed)
    lengths = inputs["attention_mask"].sum(1)
    inputs["input_ids"][torch.arange(batch), lengths - 1] = SPECIAL_TOKEN_IDS["clip_text_model"]["eos_token_id"]
    return inputs


def _clip_inputs(batch: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
    """Both towers' inputs: eos-terminated token rows and images."""
    return {**_clip_text_inputs(batch, seq, seed), **_pixel_inputs(batch, seq, seed)}


def _whisper_inputs(batch: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
    """Log-mel features of the one length Whisper reads, and ``seq`` decoder tokens from the start token."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, NUM_MEL_BINS, 2 * AUDIO_POSITIONS, generator=generator)
    decoder_input_ids = torch.randint(_FIRST_ORDINARY_TOKEN, VOCAB_SIZE, (batch, seq), generator=generator)
    decoder_input_ids[:, 0] = SPECIAL_TOKEN_IDS["whisper"]["decoder_start_token_id"]
    return {"input_features": features, "decoder_input_ids": decoder_input_ids}


_INPUT_BUILDERS: dict[str, Callable[[int, int, int], dict[str, torch.Tensor]]] = {
    "vit": _pixel_inputs,
    "clip": _clip_inputs,
    "clip_text_model": _clip_text_inputs,
    "clip_vision_model": _pixel_inputs,
    "whisper": _whisper_inputs,
}
"""``builder(batch, seq, seed)`` for the architectures whose inputs are not (only) ``input_ids`` and a mask."""

# --- end of vision and speech ---


def _check_arch(arch: str) -> None:
    """Raise a helpful error for an architecture the module does not cover.

    Args:
        arch: HF ``model_type`` string.

    Raises:
        ValueError: If ``arch`` is neither built in nor registered.
    """
    if arch not in _ARCH_KWARGS:
        known = ", ".join(registered_architectures())
        raise ValueError(
            f"unknown architecture {arch!r}; expected one of {known} (a third-party mapping package adds its own "
            f"with opendelta.testing.tiny_models.register_architecture)"
        )


def registered_architectures() -> tuple[str, ...]:
    """The architectures :func:`tiny_model` can build: :data:`SHIPPED_ARCHITECTURES`, then registered ones."""
    return SHIPPED_ARCHITECTURES + tuple(sorted(set(_ARCH_KWARGS) - set(SHIPPED_ARCHITECTURES)))


def register_architecture(
    arch: str,
    config_kwargs: dict[str, Any],
    heads: list[str] | tuple[str, ...],
    special_token_ids: dict[str, int],
    *,
    encoder_decoder: bool = False,
) -> None:
    """Teach :func:`tiny_model` and :func:`tiny_inputs` an architecture core does not list.

    A distribution that maps a new architecture (say LLaMA) calls this in its tests, then runs the conformance
    battery there with ``architectures = ("llama",)``; core needs no change, and :data:`ARCHITECTURES` (what the
    battery covers by default) stays the seven classic ones. Registering an architecture again replaces it.

    Args:
        arch: the HF ``model_type`` (``AutoConfig.for_model(arch)`` must know it).
        config_kwargs: config values that make the model tiny (width :data:`HIDDEN_SIZE`, :data:`NUM_LAYERS`
            layers, :data:`NUM_HEADS` heads, feed-forward :data:`FFN_SIZE`, no dropout), as in ``_ARCH_KWARGS``;
            ``vocab_size`` and ``num_labels`` are added.
        heads: names of transformers model classes of ``arch``, base model first (``TASK_HEADS[arch]``).
        special_token_ids: ``pad_token_id`` (and ``decoder_start_token_id`` for an encoder-decoder) and any other
            special ids, each below 4 so that random input tokens are never special.
        encoder_decoder: whether the model needs ``decoder_input_ids``.

    Raises:
        ValueError: ``arch`` is built in (:data:`SHIPPED_ARCHITECTURES`), or a required id is missing or out of range.
    """
    if arch in SHIPPED_ARCHITECTURES:
        raise ValueError(f"{arch!r} is built in; its tiny model cannot be replaced (pick another model_type)")
    if not heads or not all(isinstance(h, str) for h in heads):
        raise ValueError(f"heads for {arch!r} must be a non-empty list of transformers class names, got {heads!r}")
    required = ["pad_token_id"] + (["decoder_start_token_id"] if encoder_decoder else [])
    missing = [key for key in required if key not in special_token_ids]
    if missing:
        raise ValueError(f"special_token_ids for {arch!r} must set {missing}; got {special_token_ids!r}")
    wrong = {k: v for k, v in special_token_ids.items() if not (isinstance(v, int) and 0 <= v < _FIRST_ORDINARY_TOKEN)}
    if wrong:
        raise ValueError(
            f"special_token_ids for {arch!r} must lie in [0, {_FIRST_ORDINARY_TOKEN}) so random input tokens are "
            f"never special; got {wrong}"
        )
    _ARCH_KWARGS[arch] = dict(config_kwargs)
    SPECIAL_TOKEN_IDS[arch] = dict(special_token_ids)
    TASK_HEADS[arch] = list(heads)
    if encoder_decoder:
        _ENCODER_DECODERS.add(arch)
    else:
        _ENCODER_DECODERS.discard(arch)


def tiny_config(arch: str, **overrides: Any) -> PretrainedConfig:
    """Build a tiny config for ``arch`` without touching the network.

    The config is built with ``AutoConfig.for_model`` from explicit values
    only, so it is identical across transformers 4.x and 5.x even where the
    two versions' defaults differ.

    Args:
        arch: HF ``model_type`` string (see :func:`registered_architectures`).
        **overrides: Config attributes that replace the tiny defaults, e.g.
            ``num_labels=2`` or ``hidden_size=64``.

    Returns:
        The config: width 32, 2 layers per stack, 4 heads, feed-forward 37,
        99 tokens, 64 positions, no dropout, 3 labels and in-vocabulary
        special token ids.

    Raises:
        ValueError: If ``arch`` is neither built in nor registered.
    """
    _check_arch(arch)
    kwargs: dict[str, Any] = {
        "vocab_size": VOCAB_SIZE,
        "num_labels": NUM_LABELS,
        **SPECIAL_TOKEN_IDS[arch],
        **_ARCH_KWARGS[arch],
    }
    kwargs.update(overrides)
    return AutoConfig.for_model(arch, **kwargs)


def _default_head(arch: str) -> str:
    """Pick the class :func:`tiny_model` builds when no head is given.

    Sequence (or image) classification is preferred because its output shape
    does not depend on the vocabulary, then a language-modelling head.

    Args:
        arch: HF ``model_type`` string (see :func:`registered_architectures`).

    Returns:
        A class name from ``TASK_HEADS[arch]``.
    """
    heads = TASK_HEADS[arch]
    for name in heads:
        if name.endswith(("ForSequenceClassification", "ForImageClassification")):
            return name
    for name in heads:
        if name.endswith(_LM_SUFFIXES):
            return name
    return heads[0]


def tiny_model(arch: str, head: str | None = None, seed: int = 0) -> PreTrainedModel:
    """Build a tiny, randomly initialised model in eval mode.

    Weights depend only on ``seed`` (the global torch RNG is seeded right
    before construction), so two calls with the same arguments give models
    with identical weights; tests rely on that to compare a model with and
    without a delta.

    Args:
        arch: HF ``model_type`` string (see :func:`registered_architectures`).
        head: Name of a transformers model class for ``arch``, normally one
            of ``TASK_HEADS[arch]``. ``None`` picks the sequence
            classification class if the arch lists one, else its LM class.
        seed: Seed for the weight initialisation.

    Returns:
        The model, in ``eval()`` mode.

    Raises:
        ValueError: If ``arch`` is unknown or transformers has no ``head``.
        TypeError: If ``head`` names something other than a model class.
    """
    _check_arch(arch)
    name = head if head is not None else _default_head(arch)
    cls = getattr(transformers, name, None)
    if cls is None:
        raise ValueError(f"transformers has no class {name!r}")
    if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)):
        raise TypeError(f"transformers.{name} is not a model class")
    config = tiny_config(arch)
    torch.manual_seed(seed)
    model = cls(config)
    model.eval()
    return model


def tiny_inputs(arch: str, batch: int = 2, seq: int = 7, seed: int = 0) -> dict[str, torch.Tensor]:
    """Build inputs that every class in ``TASK_HEADS[arch]`` accepts.

    Tokens are drawn from ordinary (non-special) ids with a private
    generator, so the global RNG is untouched and the inputs depend only on
    the arguments. The last row is right-padded (its final two positions, or
    one when ``seq`` is 2) so tests exercise attention masks. BART rows end
    with exactly one eos token, which ``BartForSequenceClassification``
    pools on; GPT-2 and OPT find the last real token through
    ``pad_token_id``, which :func:`tiny_config` sets.

    Args:
        arch: HF ``model_type`` string (see :func:`registered_architectures`).
        batch: Number of rows.
        seq: Tokens per row (encoder and decoder alike); at least 2.
        seed: Seed for the token ids.

    Returns:
        ``input_ids`` and ``attention_mask`` of shape ``(batch, seq)``, plus
        ``decoder_input_ids`` for T5 and BART. Models that read images get
        ``pixel_values`` (``batch, 3,`` :data:`IMAGE_SIZE` ``,`` :data:`IMAGE_SIZE`),
        CLIP both those and token rows ending with its eos token, Whisper
        ``input_features`` of the length it requires and ``decoder_input_ids``.

    Raises:
        ValueError: If ``arch`` is unknown or the sizes are too small.
    """
    _check_arch(arch)
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    if not 2 <= seq <= MAX_POSITIONS - 2:
        # RoBERTa offsets positions by pad_token_id + 1, hence the "- 2".
        raise ValueError(f"seq must be in [2, {MAX_POSITIONS - 2}], got {seq}")
    build = _INPUT_BUILDERS.get(arch)
    return build(batch, seq, seed) if build is not None else _token_inputs(arch, batch, seq, seed)


def _token_inputs(arch: str, batch: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
    """:func:`tiny_inputs` of a model that reads tokens (arguments already checked)."""
    ids = SPECIAL_TOKEN_IDS[arch]
    generator = torch.Generator().manual_seed(seed)

    input_ids = torch.randint(_FIRST_ORDINARY_TOKEN, VOCAB_SIZE, (batch, seq), generator=generator)
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    lengths = torch.full((batch,), seq, dtype=torch.long)
    lengths[-1] = seq - min(2, seq - 1)
    for row, length in enumerate(lengths.tolist()):
        attention_mask[row, length:] = 0
        input_ids[row, length:] = ids["pad_token_id"]
        if arch == "bart":
            input_ids[row, length - 1] = ids["eos_token_id"]

    inputs: dict[str, torch.Tensor] = {"input_ids": input_ids, "attention_mask": attention_mask}
    if arch in _ENCODER_DECODERS:
        decoder_input_ids = torch.randint(_FIRST_ORDINARY_TOKEN, VOCAB_SIZE, (batch, seq), generator=generator)
        decoder_input_ids[:, 0] = ids["decoder_start_token_id"]
        inputs["decoder_input_ids"] = decoder_input_ids
    return inputs


def generation_inputs(arch: str, model: PreTrainedModel, padding: str = "left") -> dict[str, torch.Tensor]:
    """:func:`tiny_inputs` as ``generate()`` takes them: no decoder inputs, and decoder-only rows left-padded.

    Decoder-only models continue each row from its last position, so their tokenizers pad on the left for
    generation; encoder-decoders keep the right-padded encoder input. ``padding="none"`` gives rows of one length
    with an all-ones mask instead (every row cut to the shortest), the case where transformers 5's ``generate()``
    drops the mask and counts positions itself.
    """
    if padding not in ("left", "none"):
        raise ValueError(f"padding must be 'left' or 'none', not {padding!r}")
    inputs = tiny_inputs(arch)
    inputs.pop("decoder_input_ids", None)
    if "input_ids" not in inputs:  # audio or images: rows of one length, nothing to pad
        return inputs
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    if padding == "none":
        shortest = int(mask.sum(1).min())
        return {"input_ids": ids[:, :shortest].clone(), "attention_mask": torch.ones_like(mask[:, :shortest])}
    if model.config.is_encoder_decoder:
        return inputs
    left_ids, left_mask = torch.full_like(ids, model.config.pad_token_id), torch.zeros_like(mask)
    for row, length in enumerate(mask.sum(1).tolist()):
        left_ids[row, -length:], left_mask[row, -length:] = ids[row, :length], 1
    return {"input_ids": left_ids, "attention_mask": left_mask}


def model_output_tensor(output: Any) -> torch.Tensor:
    """Return the main tensor of a model output, for comparisons.

    Different heads return different output classes; tests that check a
    delta changes (or does not change) the output only need one tensor.

    Args:
        output: What a transformers model's forward returned: a
            ``ModelOutput``, a tuple, or a tensor.

    Returns:
        ``logits`` if the output has them, else ``last_hidden_state``, else
        the first tensor of the output (CLIP's ``logits_per_image``, a masked
        image model's ``reconstruction``, a tuple's first element), or the
        tensor itself.

    Raises:
        TypeError: If no tensor can be found.
    """
    if isinstance(output, torch.Tensor):
        return output
    for attr in ("logits", "last_hidden_state"):
        value = getattr(output, attr, None)
        if isinstance(value, torch.Tensor):
            return value
    if hasattr(output, "to_tuple"):  # a ModelOutput without either: its first field that is set
        output = output.to_tuple()
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"no logits or last_hidden_state in {type(output).__name__}")
