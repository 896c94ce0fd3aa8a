"""``PrefixModel``: learned keys and values in front of every self-attention, on any mapped architecture."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from opendelta.plugin_api import (
    SHARED_POSITIONALS,
    CheckpointError,
    DeltaConfigError,
    DeltaModel,
    DeltaStateError,
    Insertion,
    Target,
    attention_parts,
    factory_kwargs,
    input_stack,
)
from opendelta_prefix.config import PrefixConfig
from opendelta_prefix.layer import PrefixLayer, PrefixReparameterization
from opendelta_prefix.positions import shift_positions

LEGACY_PREFIX_ARCHITECTURES = frozenset({"gpt2"})
"""Where an OpenDelta 0.3.x prefix checkpoint gives the original's outputs here (checked against the original)."""


@dataclass
class _SharedNetwork:
    """The reparameterisation network every block's prefix reads (``None``: plain prefixes).

    Held in a plain object, so the network is a submodule of each :class:`PrefixLayer` (saved under each block's
    name) and not a second time of the delta model.
    """

    network: PrefixReparameterization | None


class PrefixModel(DeltaModel):
    """Prefix tuning on a backbone (manual section 1.21.6).

    ``PrefixModel(backbone_model=model)`` gives every self-attention block (common name ``attn``: the encoder's and
    the decoder's) ``prefix_token_num`` learned key/value positions. Unlike the original, which had a hand-written
    class per attention type and raised NotImplementedError elsewhere, the prefix is placed by one mechanism in core
    (``opendelta.prefix``) that only needs the common structure's ``attn.k``/``attn.v``: BERT, RoBERTa, T5, GPT-2, BART,
    DeBERTa-v2, OPT and their task heads, under transformers 4.57 and 5.x, ``generate()`` with the key/value cache
    included. With ``reparameterize=True`` the prefixes come from a network shared by all layers; :meth:`fold` turns
    them into plain parameters for saving and serving.
    """

    config_class = PrefixConfig
    default_modified_modules: ClassVar[tuple[str, ...]] = ("attn",)
    insertion = "prefix"
    positional_args = (
        "prefix_token_num",
        "reparameterize",
        "embed_dim",
        "mid_dim",
        *SHARED_POSITIONALS[:-1],  # the manual's signature has no backend
    )
    """The manual's positional order: ``PrefixModel(model, x)`` binds x to ``prefix_token_num``."""
    identity_at_init = False
    config: PrefixConfig

    def _prepare(self, targets: Sequence[Target]) -> None:
        """Read every attention's projections once; with ``reparameterize``, build the network all blocks share.

        Its output holds every block's keys and values side by side, so it is sized by all targets at once: each
        target's first column in it is its offset.
        """
        if self.config.peft_positions:
            self._check_peft_positions()
        self._parts = {t.name: attention_parts(self.backbone_model, t.name, type(self).__name__) for t in targets}
        self._offsets: dict[str, int] = {}
        total = 0
        for target in targets:
            self._offsets[target.name] = total
            total += self._parts[target.name].key_features + self._parts[target.name].value_features
        self._shared = _SharedNetwork(None)
        if self.config.reparameterize:
            config = self.config
            self._shared.network = PrefixReparameterization(
                config.prefix_token_num, config.embed_dim, config.mid_dim, total, **factory_kwargs(targets[0].module)
            )

    def _build_delta(self, target: Target) -> nn.Module:
        """The prefix of one self-attention block, sized from its key and value projections."""
        parts = self._parts[target.name]
        network = self._shared.network
        return PrefixLayer(
            self.config.prefix_token_num,
            parts.key_features,
            parts.value_features,
            None if network is None else (network, self._offsets[target.name]),
            **factory_kwargs(target.module),
        )

    def placement_options(self, target: Target) -> dict[str, Any]:
        """The attention's projections, read in :meth:`_prepare`, for core's prefix placer."""
        return {"parts": self._parts[target.name]}

    # ------------------------------------------------------------------------------------- PEFT's positions
    def _check_peft_positions(self) -> None:
        """Refuse ``peft_positions`` where PEFT's prefix is placed otherwise: encoder-decoders."""
        config = getattr(self.backbone_model, "config", None)
        if bool(getattr(config, "is_encoder_decoder", False)):
            raise DeltaConfigError(
                "PrefixConfig.peft_positions=True is for decoder-only and encoder models: on an encoder-decoder PEFT "
                "prefixes only the decoder's self-attention and gives its prefix keys the relative position bias, "
                "which this prefix (on every self-attention, prefix keys without position) does not compute"
            )
        self.__dict__["_stack"] = input_stack(self.backbone_model)[1]  # the backbone's: no submodule of ours
        self._shift = None

    def _place(self, target: Target, delta: nn.Module) -> Insertion:
        """Place the prefix; after the last one, with ``peft_positions``, move the real tokens' positions up."""
        insertion = super()._place(target, delta)
        if self.config.peft_positions and target is self.targets[-1]:
            self._shift = shift_positions(self._stack, self.config.prefix_token_num, self)
        return insertion

    def detach(self, module: nn.Module | None = None, reset_state_dict: bool = True) -> None:
        """Take the prefixes out (see :meth:`DeltaModel.detach`), and the position shift with them."""
        super().detach(module, reset_state_dict)
        shift = self.__dict__.get("_shift")
        if shift is not None and not self.attached:
            shift.remove()
            self._shift = None

    def attach(self, module: nn.Module | None = None, reset_state_dict: bool = True) -> None:
        """Put the prefixes back (see :meth:`DeltaModel.attach`), and the position shift with them."""
        super().attach(module, reset_state_dict)
        if self.config.peft_positions and self.__dict__.get("_shift") is None and self.attached:
            self._shift = shift_positions(self._stack, self.config.prefix_token_num, self)

    def save_peft(self, path: str | os.PathLike[str], **kwargs: Any) -> Path:
        """Export in PEFT's ``PREFIX_TUNING`` format (see ``peft_format.save_peft_prefix_tuning``)."""
        from opendelta_prefix.peft_format import save_peft_prefix_tuning

        return save_peft_prefix_tuning(self, path, **kwargs)

    def fold(self) -> None:
        """Turn the reparameterised prefixes into plain ones: identical outputs, only ``P`` keys/values to save.

        The config records ``reparameterize=False`` afterwards, so a checkpoint saved now loads as plain prefixes.

        Raises:
            DeltaStateError: the delta model is detached (fold it while it is attached).
        """
        if not self.attached:
            raise DeltaStateError("fold() needs the prefixes attached; call attach() first")
        for layer in self.deltas:
            layer.fold()
        self._shared.network = None
        self.config.reparameterize = False

    def translate_legacy_state_dict(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Read an OpenDelta 0.3.x checkpoint: its shared network was one ``reparams`` module on the first block.

        It computed every block's keys and values at once, ``[P, blocks * 2 * hidden]`` in the blocks' order, keys
        before values: the layout of :class:`PrefixReparameterization` here, which each block holds (so it is saved
        under each block's name). Its embedding was an ``nn.Embedding`` (``wte.weight``); here it is the
        parameter ``wte``.
        """
        legacy = f"{self.targets[0].name}.reparams."
        if not self.config.reparameterize or not any(n.startswith(legacy) for n in tensors):
            return tensors
        model_type = getattr(getattr(self.backbone_model, "config", None), "model_type", None)
        if model_type not in LEGACY_PREFIX_ARCHITECTURES:
            raise CheckpointError(
                f"OpenDelta 0.3.x prefix checkpoints load on {sorted(LEGACY_PREFIX_ARCHITECTURES)} only, where this "
                f"prefix computes what the original did; on {model_type!r} the original fed its prefixes through "
                f"attention internals of its time with other results (on T5 it dropped the relative position bias of "
                f"every block after the first; on BERT and RoBERTa it failed), so the trained outputs cannot be "
                f"reproduced: train the prefix again with PrefixModel"
            )
        out = {n: t for n, t in tensors.items() if not n.startswith(legacy)}
        for name, tensor in tensors.items():
            if name.startswith(legacy):
                rest = name[len(legacy) :]
                rest = "wte" if rest == "wte.weight" else rest
                for target in self.targets:
                    out[f"{target.name}.{self.delta_name}.reparameterization.{rest}"] = tensor
        return out
