"""What inference servers refuse in a PEFT LoRA folder, said when ``save_peft`` writes it rather than at serve time.

PEFT loads everything ``save_peft_adapter`` writes, but vLLM rejects an adapter whose ``modules_to_save`` is set
("vLLM only supports modules_to_save being None") and, like TGI, serves LoRA only on decoder-only causal language
models; an encoder (BERT), an encoder-decoder (T5, BART) or a task head is not served by either. The check is by
the backbone's class and config, as those servers choose the model implementation: it cannot know whether a given
server version implements LoRA for this particular decoder architecture.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from torch import nn

from opendelta.plugin_api import OpenDeltaServingWarning

CAUSAL_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel")
"""Class-name endings of the decoder-only language models that vLLM and TGI load (``LlamaForCausalLM``, GPT-2's
``GPT2LMHeadModel``); ``...DoubleHeadsModel`` and task heads are not among them."""


def serving_problems(backbone: nn.Module, modules_to_save: Sequence[str]) -> list[str]:
    """The reasons vLLM or TGI would refuse an adapter for ``backbone`` that ships ``modules_to_save``."""
    problems = []
    if modules_to_save:
        problems.append(
            f"modules_to_save={list(modules_to_save)}: vLLM refuses any adapter with modules_to_save and TGI does "
            "not load them (save without modules_to_save to serve the LoRA weights alone)"
        )
    name = type(backbone).__name__
    config = getattr(backbone, "config", None)
    if getattr(config, "is_encoder_decoder", False) or not name.endswith(CAUSAL_LM_SUFFIXES):
        problems.append(
            f"{name} is not a decoder-only causal LM (a ...ForCausalLM class): vLLM and TGI serve LoRA only on those"
        )
    return problems


def warn_if_unservable(backbone: nn.Module, modules_to_save: Sequence[str], folder: object) -> None:
    """Warn once, with every reason, when the adapter written to ``folder`` is one those servers refuse."""
    problems = serving_problems(backbone, modules_to_save)
    if problems:
        warnings.warn(
            f"{folder}: PEFT loads this adapter, but inference servers will refuse it: " + "; ".join(problems),
            OpenDeltaServingWarning,
            stacklevel=3,
        )
