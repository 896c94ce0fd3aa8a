"""What the PEFT oracle tests share: PEFT's p-tuning on a copy of a tiny model, and the rows to compare."""

import copy

import torch

from opendelta.testing import tiny_inputs, tiny_model

HEADS = {
    # arch: (transformers class, PEFT task type); the hidden states on the real positions are compared
    "bert": ("BertForSequenceClassification", "SEQ_CLS"),
    "t5": ("T5ForConditionalGeneration", "SEQ_2_SEQ_LM"),
    "gpt2": ("GPT2LMHeadModel", "CAUSAL_LM"),
    "llama": ("LlamaForCausalLM", "CAUSAL_LM"),
}
TOKENS = 3
HIDDEN = 16
ENCODER_PREFIX = "prompt_encoder.default."


def fresh(arch):
    return tiny_model(arch, HEADS[arch][0]).eval()


def inputs(arch):
    """The tiny inputs; BERT's with mixed token type ids (PEFT's SEQ_CLS prepends zeros for the prompt, as we do)."""
    found = tiny_inputs(arch)
    if arch == "bert":
        found["token_type_ids"] = (torch.arange(found["input_ids"].shape[1]) >= 3).long().expand_as(found["input_ids"])
    return found


def peft_p_tuning(model, arch, kind="MLP", seed=0):
    """PEFT's p-tuning on a copy of ``model`` (its own random initialisation, drawn from ``seed``), in eval mode."""
    peft = __import__("peft")
    config = peft.PromptEncoderConfig(
        task_type=HEADS[arch][1],
        num_virtual_tokens=TOKENS,
        encoder_hidden_size=HIDDEN,
        encoder_reparameterization_type=kind,
    )
    torch.manual_seed(seed)
    return peft.get_peft_model(copy.deepcopy(model), config).eval()


def encoder_state(peft_model):
    """The PEFT prompt encoder's tensors under its own names (``embedding.weight``, ``mlp_head.0.weight``...)."""
    state = peft_model.state_dict()
    return {k[len(ENCODER_PREFIX) :]: v for k, v in state.items() if k.startswith(ENCODER_PREFIX)}


def real_rows(output, arch, virtual=TOKENS):
    """The last hidden states on the real positions, behind ``virtual`` prompt rows.

    PEFT's keep the prompt rows in front; so do ours in the hidden-state tuple and an encoder-decoder's encoder
    output (core cuts them from the base model's main output only, which the heads read).
    """
    if arch == "t5":
        return output.encoder_last_hidden_state[:, virtual:]
    return output.hidden_states[-1][:, virtual:]


def run(model, arch):
    with torch.no_grad():
        return model(**inputs(arch), output_hidden_states=True)
