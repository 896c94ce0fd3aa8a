"""``OFTModel``: a block-diagonal orthogonal rotation of the input of each modified linear layer (Qiu et al., 2023).

Each delta is a sequential one placed before its layer (``x -> x R``), so core detaches, merges (``W' = W R^T``)
and routes it per row like any other sequential delta.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from opendelta.plugin_api import SHARED_POSITIONALS, DeltaModel, Target, factory_kwargs
from opendelta_oft.config import OFTConfig
from opendelta_oft.layer import OFTRotation
from opendelta_oft.targeting import WholeLinearTargets, check_block_size


class OFTModel(WholeLinearTargets, DeltaModel):
    """Orthogonal Finetuning on a backbone (PEFT 0.21.2's ``OFTModel`` semantics on linear layers).

    ``OFTModel(backbone_model=model)`` rotates the input of every self-attention's query and value projections
    (common names ``attn.q``, ``attn.v``; on GPT-2 the whole fused ``c_attn``) with blocks of ``oft_block_size``
    (32), starting at the identity. ``modified_modules=[...]`` chooses other linear layers.
    """

    config_class = OFTConfig
    default_modified_modules: ClassVar[tuple[str, ...]] = ("attn.q", "attn.v")
    insertion = "before"
    positional_args = SHARED_POSITIONALS
    identity_at_init = True
    config: OFTConfig

    def _build_delta(self, target: Target) -> nn.Module:
        config = self.config
        return OFTRotation(
            check_block_size(target, config.oft_block_size, "OFTModel"),
            config.oft_block_size,
            block_share=config.block_share,
            coft=config.coft,
            eps=config.eps,
            use_cayley_neumann=config.use_cayley_neumann,
            num_cayley_neumann_terms=config.num_cayley_neumann_terms,
            module_dropout=config.module_dropout,
            init_weights=config.init_weights,
            **factory_kwargs(target.module),  # a quantized layer's compute dtype, never its storage dtype
        )

    def save_peft(self, path: str | os.PathLike[str], **kwargs: Any) -> Path:
        """Export as a PEFT OFT adapter folder (see :func:`opendelta_oft.peft_oft.save_peft_oft`)."""
        from opendelta_oft.peft_oft import save_peft_oft

        return save_peft_oft(self, path, **kwargs)
