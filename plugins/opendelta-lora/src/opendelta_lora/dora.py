"""DoRA: the LoRA branch with a learned magnitude per output feature, ``m * (W + s B A) x / ||W + s B A||_c``.

Liu et al., 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation" (https://arxiv.org/abs/2402.09353), with PEFT's
semantics (``LoraConfig(use_dora=True)``, PEFT 0.21.2 as the oracle):

* ``||V||_c`` is the L2 norm of each output row of ``V = W + s B A`` (``[out]``). It is treated as a constant in
  backward (section 4.3 of the paper): no gradient flows through it.
* ``m`` (``lora_magnitude_vector``, ``[out]``) starts at ``||W + s B A||_c`` of the initial weights, so a fresh DoRA
  (``B = 0``) leaves the outputs unchanged.
* The branch is placed in parallel to the linear layer, whose output is ``W x + b``; it returns what is added:
  ``(m / ||V||_c - 1) * W x + (m / ||V||_c) * s B A x``, with ``W x`` the host's own output minus its bias (core
  hands it to :meth:`DoraLayer.add_to`), so ``W x`` is not computed twice. The bias is not scaled. With dropout in
  training, PEFT computes the base term on the dropped-out input: so does this layer (``W dropout(x)``).
* PiSSA/OLoRA (a residual base ``W - s B0 A0``) compose: ``V = W - s B0 A0 + s B A`` and the base term is the
  residual's.

The layer reads the host's weight in its forward (the norm changes with ``B`` and ``A``), so it keeps a reference
to its host (a plain attribute, not a submodule: ``state_dict`` and ``parameters()`` do not see it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from opendelta.plugin_api import backend_of, is_quantized, stored_update
from opendelta_lora.layer import LoraLayer


def host_weight(host: nn.Module) -> torch.Tensor:
    """The host's weight as a float ``[out, in]`` tensor: dequantized for a quantized layer, untransposed for Conv1D."""
    if is_quantized(host):
        backend = backend_of(host)
        assert backend is not None
        return backend.dequantize(host)
    return stored_update(host, host.weight)


class DoraLayer(LoraLayer):
    """A LoRA branch with DoRA's magnitude (see the module docstring).

    The arguments are :class:`LoraLayer`'s plus the host, whose weight the norm is computed from.

    Its parameters are ``lora_A``, ``lora_B`` and ``lora_magnitude_vector`` (``[rows]``: the output features the
    update writes to, all of them but on a fused layer's slices).
    """

    def __init__(self, *args: object, host: nn.Module, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        object.__setattr__(self, "_host", host)  # not registered: the host is the delta's parent, not its child
        self._merged_norm: torch.Tensor | None = None
        with torch.no_grad():
            norm = self.weight_norm()
        self.lora_magnitude_vector = nn.Parameter(norm.to(self.lora_B.dtype))

    # --------------------------------------------------------------------------------------------- pieces
    def _rows(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        """The rows (output features) of ``tensor`` along ``dim`` that the update writes to."""
        if self.out_index is None:
            return tensor
        return tensor.index_select(dim, self.out_index.to(tensor.device))

    def _base_weight(self) -> torch.Tensor:
        """``W`` (stored, float, ``[rows, in]``), detached."""
        return self._rows(host_weight(self._host).detach(), 0)

    def _dense_rows(self) -> torch.Tensor:
        """``s (B A - B0 A0)`` as ``[rows, in]``: what turns ``W`` into ``V``."""
        dense = self.lora_B @ self.lora_A * self.scaling
        if self.lora_A0 is not None and self.lora_B0 is not None:
            dense = dense - self.lora_B0 @ self.lora_A0 * self.scaling
        return dense

    def weight_norm(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """``||W + s (B A - B0 A0)||_c``, one L2 norm per output row (``[rows]``), detached (a constant in backward)."""
        weight = self._base_weight() if weight is None else weight
        dense = self._dense_rows().detach().to(weight.dtype)
        return torch.linalg.norm(weight + dense, dim=1).to(weight.dtype).detach()

    def _bias_rows(self) -> torch.Tensor | None:
        bias = getattr(self._host, "bias", None)
        return None if bias is None else self._rows(bias, 0)

    def low_rank_factors(self) -> None:
        """Never: DoRA rescales the layer's output by its weight norms, which no low-rank product alone expresses."""
        return None

    # -------------------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """What the branch adds to the layer's output ``hidden`` (``W x + b``; computed from ``x`` when not given)."""
        weight = self._base_weight().to(x.dtype)
        scale = (self.lora_magnitude_vector / self.weight_norm(weight)).to(x.dtype)  # [rows]
        if self.training and not isinstance(self.lora_dropout, nn.Identity):
            return self._dropped_forward(x, weight, scale)  # PEFT: the base term on the dropped-out input
        low, up = self._low_rank(x)  # [s B A x | -s B0 A0 x], before scaling
        lora = (low @ up * self.scaling).view(*x.shape[:-1], -1)  # (..., rows)
        if hidden is not None and self._sole_delta():
            base = self._rows(hidden, -1)
            bias = self._bias_rows()
            base = base if bias is None else base - bias.to(base.dtype)
        else:
            base = F.linear(x, weight)
        update = (scale - 1) * base + scale * lora
        return self._full(update)

    def _dropped_forward(self, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Training with dropout: ``r(x) + (scale - 1) (W - s B0 A0) x_d + scale s B A x_d``, one mask ``x_d``.

        ``r(x) = -s B0 A0 x`` is the residual's own change (zero without PiSSA/OLoRA), on the undropped input, as
        PEFT's base layer sees it.
        """
        flat = x.reshape(-1, self.in_features)
        dropped = self.lora_dropout(flat)
        base = dropped @ weight.t()
        lora = dropped @ self.lora_A.t() @ self.lora_B.t() * self.scaling
        update = (scale - 1) * base + scale * lora
        if self.lora_A0 is not None and self.lora_B0 is not None:
            initial = self.lora_B0 @ self.lora_A0 * self.scaling  # (rows, in)
            update = update - flat @ initial.t() - (scale - 1) * (dropped @ initial.t())
        return self._full(update.view(*x.shape[:-1], -1))

    def _full(self, update: torch.Tensor) -> torch.Tensor:
        if self.out_index is None:
            return update
        full = update.new_zeros(*update.shape[:-1], self.out_features)
        return full.index_copy(-1, self.out_index, update)

    def _sole_delta(self) -> bool:
        """Whether ``hidden`` is the host's own ``W x + b``: no other module (another delta) hangs on the host.

        Another delta on the same layer may have added its output to ``hidden`` first; ``W x`` is then recomputed.
        """
        return all(child is self for child in self._host._modules.values())

    def add_to(self, hidden: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``hidden + forward(x)``, reading ``W x`` from ``hidden`` (the host's output) instead of recomputing it.

        Not in place: the magnitude's gradient needs ``W x``.
        """
        return hidden + self.forward(x, hidden)

    # ---------------------------------------------------------------------------------------------- merge
    def _attached(self) -> bool:
        return any(child is self for child in self._host._modules.values())

    def merged_weight_change(self) -> torch.Tensor:
        """``m / ||V||_c * V - W`` as ``[out, in]`` (zero outside the slices): what merging adds to the weight.

        Core calls ``merge_update`` twice: at merge, with the delta attached and the host holding ``W``; at unmerge,
        with the delta detached and the host holding the merged ``W'``. ``||V||_c`` cannot be recovered from ``W'``
        (its row norms are ``|m|``), so the merge keeps it (a ``[rows]`` vector), as PEFT does, and the unmerge
        recovers ``W = (||V||_c / m) W' - s (B A - B0 A0)`` from it.
        """
        current = self._base_weight()
        dense = self._dense_rows().detach().to(current.dtype)
        magnitude = self.lora_magnitude_vector.detach().to(current.dtype)
        if self._attached() or self._merged_norm is None:  # merging: the host holds W
            norm = self.weight_norm(current)
            self._merged_norm = norm
            factor = (magnitude / norm)[:, None]
            change = factor * (current + dense) - current
        else:  # unmerging: the host holds W' = factor (W + dense)
            factor = (magnitude / self._merged_norm.to(current.dtype))[:, None]
            change = current - (current / factor - dense)
        if self.out_index is None:
            return change
        full = change.new_zeros(self.out_features, self.in_features)
        return full.index_copy(0, self.out_index.to(change.device), change)

    def merge_update(self, host: nn.Module) -> dict[str, torch.Tensor]:
        """``W' - W`` in ``host``'s storage layout (``[in, out]`` for Conv1D); see :meth:`merged_weight_change`."""
        if host is not self._host:
            raise ValueError("a DoRA layer merges into the layer it was built for")
        return {"weight": stored_update(host, self.merged_weight_change())}

    def extra_repr(self) -> str:
        return super().extra_repr() + ", dora"
