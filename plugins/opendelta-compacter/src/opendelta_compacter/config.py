"""Compacter's hyper-parameters (names and defaults are the original OpenDelta's, so its configs load unchanged)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from opendelta.plugin_api import ACTIVATIONS, DeltaConfig, DeltaConfigError

RULE_INITIALISERS = ("normal", "uniform")
"""Accepted ``phm_c_init`` values: how the phm rule ``A`` starts (std / range 0.01, as in the original)."""

WEIGHT_INITIALISERS = ("glorot-uniform", "glorot-normal", "normal")
"""Accepted ``hypercomplex_nonlinearity`` values: how the weight blocks ``B`` start."""


@dataclass(kw_only=True)
class CompacterConfig(DeltaConfig):
    """Configuration of :class:`~opendelta_compacter.CompacterModel` (manual section 1.21.5).

    Each projection of the adapter has the weight ``W = sum_i kron(A_i, B_i)``: ``n`` small "rule" matrices
    ``A_i: [n, n]`` and ``n`` blocks ``B_i: [in/n, out/n]``, so it costs about ``1/n`` of a dense projection (far
    less when ``B`` is factorised).

    Attributes:
        reduction_factor: bottleneck size is ``hidden // reduction_factor``, rounded up to a multiple of
            ``hypercomplex_division`` (the blocks must tile it; the original crashed instead). 16 by default.
        non_linearity: activation between the projections (``gelu_new`` by default; see
            ``opendelta.layers.ACTIVATIONS``).
        phm_c_init: how the phm rule starts: ``"normal"`` (std 0.01, the default) or ``"uniform"`` (in
            ``[-0.01, 0.01]``), as in the original.
        hypercomplex_division: ``n``, the number of Kronecker terms and of blocks along each side of ``W``; it
            must divide the hidden size of every target. 4 by default.
        learn_phm: train the phm rule (default). ``False`` keeps the random rule fixed: it is then a buffer (saved
            with the delta, never trained), not a delta parameter.
        hypercomplex_nonlinearity: how the blocks ``B_i`` start: ``"glorot-uniform"`` (default) or
            ``"glorot-normal"`` (per block, gain ``sqrt(2)`` as in the original), or ``"normal"`` (std
            ``phm_init_range``).
        shared_phm_rule: one phm rule for every projection of this delta model instead of one per projection
            (the rule does not depend on sizes, so down and up projections share it too, as in rabeehk/compacter).
        factorized_phm: store each block as a rank-``phm_rank`` product ``B_i = W_left_i @ W_right_i`` (default:
            the "Compacter" of the paper; ``False`` gives "PHM-Adapter").
        shared_W_phm: one set of blocks for every down projection, and one for every up projection, of this
            delta model; needs every target to have the same hidden size.
        factorized_phm_rule: store the rule as ``A_i = phm_rule_left_i @ phm_rule_right_i`` (rank one).
        phm_rank: rank of the factorised blocks; 1 by default.
        phm_init_range: standard deviation of the blocks when ``hypercomplex_nonlinearity="normal"``.
        kronecker_prod: how the product is computed, not what: ``True`` builds the dense ``W`` from the
            Kronecker products, then multiplies; ``False`` contracts the input with the factors without forming
            ``W``; ``None`` (default) picks the cheaper, the structured path when the blocks are factorised (about
            ``n r (in + n out)`` products per row instead of ``in * out``), the dense weight otherwise.
        use_bias_up_sampler: give the up projection a bias (size ``hidden``); ``True`` by default.
        use_bias_down_sampler: give the down projection a bias (size ``bottleneck``); ``True`` by default.
    """

    delta_type: ClassVar[str] = "compacter"

    reduction_factor: int = 16
    non_linearity: str = "gelu_new"
    phm_c_init: str = "normal"
    hypercomplex_division: int = 4
    learn_phm: bool = True
    hypercomplex_nonlinearity: str = "glorot-uniform"
    shared_phm_rule: bool = False
    factorized_phm: bool = True
    shared_W_phm: bool = False
    factorized_phm_rule: bool = False
    phm_rank: int = 1
    phm_init_range: float = 0.0001
    kronecker_prod: bool | None = None
    use_bias_up_sampler: bool = True
    use_bias_down_sampler: bool = True

    def validate(self) -> None:
        """Refuse sizes below 1, a non-positive init range and unknown activation or initialiser names."""
        super().validate()
        for name in ("reduction_factor", "hypercomplex_division", "phm_rank"):
            if getattr(self, name) < 1:
                raise DeltaConfigError(f"CompacterConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not self.phm_init_range > 0:
            raise DeltaConfigError(f"CompacterConfig.phm_init_range must be > 0, got {self.phm_init_range}")
        if self.non_linearity.lower() not in ACTIVATIONS:
            raise DeltaConfigError(
                f"CompacterConfig.non_linearity {self.non_linearity!r} is unknown; choose one of {sorted(ACTIVATIONS)}"
            )
        if self.phm_c_init not in RULE_INITIALISERS:
            raise DeltaConfigError(
                f"CompacterConfig.phm_c_init {self.phm_c_init!r} is unknown; choose one of {list(RULE_INITIALISERS)}"
            )
        if self.hypercomplex_nonlinearity not in WEIGHT_INITIALISERS:
            raise DeltaConfigError(
                f"CompacterConfig.hypercomplex_nonlinearity {self.hypercomplex_nonlinearity!r} is unknown; choose "
                f"one of {list(WEIGHT_INITIALISERS)}"
            )
