"""``combine_deltas``: one new delta model from a weighted combination of several (PEFT's ``add_weighted_adapter``).

Several delta models of one method, trained for different tasks on one backbone, become one more delta model of
that method on the same targets, attached to the same backbone. The inputs are left exactly as they were (their
tensors, attached or detached): the user typically detaches them afterwards (``delta.detach()``), or keeps them
and serves each per row with :func:`opendelta.route_rows`.

Which combinations a method offers is what its ``DeltaModel`` class declares, never its name:

* ``low_rank_fields`` (LoRA): every combination of PEFT 0.21.2's LoRA ``add_weighted_adapter``, with its rules.
  The new delta's rank is the common rank (``linear``, ``ties``, ``dare_linear``, ``dare_ties``,
  ``magnitude_prune``, which refuse mixed ranks), the sum of the ranks (``cat``) or ``svd_rank`` (default the
  largest rank) for the ``svd`` kinds; its alpha is its rank. The factor-wise kinds combine ``A`` with weights
  ``sign(w s) sqrt(|w s|)`` and ``B`` with ``sqrt(|w s|)`` (``s`` each input's scale); ``cat`` stacks ``w s A`` and
  ``B``; the ``svd`` kinds combine the dense updates ``s B A`` and keep the truncated SVD ``(U S) Vh``. As in PEFT,
  one input is always combined ``linear``, and the factors are written for a scale of ``alpha / r = 1`` (with
  ``use_rslora`` the combined delta's scale is ``sqrt(r)``, which PEFT does not correct either);
* ``combines_linearly`` (BitFit, IA3): ``linear`` only, the weighted sum of each delta parameter (for IA3, PEFT's
  IA3 ``add_weighted_adapter``).

The tensor arithmetic is :mod:`opendelta.merge_arithmetic`. On a slice of a fused projection (GPT-2's ``c_attn``),
where PEFT's LoRA covers the whole layer, pruning, DARE and ``svd_clamp`` count the entries of the slice.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Literal, NamedTuple

import torch
from torch import nn

from opendelta.base import DeltaModel
from opendelta.delta_protocols import LoadsLowRankFactors, LowRankBranch, LowRankFactors, class_implements
from opendelta.errors import DeltaConfigError, DeltaStateError
from opendelta.merge_arithmetic import BASE_KINDS, combine_tensors, svd_factors

__all__ = ["COMBINATION_TYPES", "combine_deltas"]

COMBINATION_TYPES = ("svd", "linear", "cat", *BASE_KINDS[1:], *(f"{k}_svd" for k in BASE_KINDS[1:]))
"""Every ``combination_type``, PEFT's LoRA set; a method declaring ``combines_linearly`` only offers ``linear``."""

_SAME_RANK = BASE_KINDS
"""The kinds that combine factors entry by entry, so every input needs the same rank (PEFT refuses others)."""

_PRUNING = tuple(t for t in COMBINATION_TYPES if t not in ("svd", "linear", "cat"))


class _Options(NamedTuple):
    """``combine_deltas``'s keyword options, checked, as one value passed down to each placement."""

    density: float | None
    svd_rank: int | None
    svd_clamp: float | None
    svd_full_matrices: bool
    majority_sign_method: Literal["total", "frequency"]
    generator: torch.Generator | None


def combine_deltas(
    deltas: Sequence[DeltaModel],
    weights: Sequence[float],
    combination_type: str = "svd",
    *,
    density: float | None = None,
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    majority_sign_method: Literal["total", "frequency"] = "total",
    generator: torch.Generator | None = None,
) -> DeltaModel:
    """A new delta model, attached to the inputs' backbone, combining ``deltas`` with ``weights``.

    Args:
        deltas: delta models of one method on one backbone, on the same modules, none merged.
        weights: one number per delta (negative subtracts); not normalised.
        combination_type: one of :data:`COMBINATION_TYPES` (PEFT's meanings, see the module docstring); ``"svd"``
            by default, as PEFT's. BitFit and IA3 combine ``"linear"`` only.
        density: the fraction of entries kept, in ``(0, 1]``, for the ``ties``, ``dare`` and ``magnitude_prune``
            kinds.
        svd_rank: the rank of an ``svd`` kind's result (default: the largest input rank).
        svd_clamp: clip an ``svd`` kind's factors to this quantile of their entries, in ``[0, 1]``.
        svd_full_matrices: ``torch.linalg.svd``'s ``full_matrices`` (the result's product does not depend on it).
        majority_sign_method: ``"total"`` or ``"frequency"``, how ``ties`` kinds elect each entry's sign.
        generator: where DARE's random draws come from (default: torch's global generator); on the deltas' device.

    Returns:
        The combined delta model: same class and config as ``deltas[0]`` (rank and alpha as the combination sets
        them), attached, its delta parameters as freshly built ones (trainable until frozen).

    Raises:
        DeltaConfigError: no delta, a weight count or value wrong, mixed methods, different modified modules, an
            unknown or (for this method) unsupported ``combination_type``, a missing or out-of-range option, mixed
            ranks for a kind that needs one rank. Nothing is built.
        DeltaStateError: deltas on different backbones, merged (or unloaded) ones, or deltas that are no plain
            low-rank product now (DoRA, PiSSA, dropout in training mode). Nothing is built.
    """
    models, weights = _checked_inputs(deltas, weights)
    method = type(models[0])
    options = _Options(density, svd_rank, svd_clamp, svd_full_matrices, majority_sign_method, generator)
    _check_options(method, combination_type, options)
    if method.low_rank_fields is not None:
        return _combine_low_rank(models, weights, combination_type, options)
    return _combine_linearly(models, weights)


def _checked_inputs(deltas: Sequence[DeltaModel], weights: Sequence[float]) -> tuple[list[DeltaModel], list[float]]:
    """The deltas and weights as lists, refused unless they can be combined at all (see ``combine_deltas``)."""
    models, weights = _as_list(deltas, "deltas"), _as_list(weights, "weights")
    if not models:
        raise DeltaConfigError("combine_deltas needs at least one delta model in deltas=; got none")
    strangers = [type(m).__name__ for m in models if not isinstance(m, DeltaModel)]
    if strangers:
        raise DeltaConfigError(f"combine_deltas combines delta models, got {', '.join(strangers)} in deltas=")
    if len(weights) != len(models):
        raise DeltaConfigError(
            f"combine_deltas got {len(models)} delta models but {len(weights)} weights; pass one weight per delta"
        )
    if not all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in weights):
        raise DeltaConfigError(f"combine_deltas weights must be finite numbers, got {weights!r}")
    first = models[0]
    methods = sorted({type(m).__name__ for m in models})
    if len({type(m) for m in models}) > 1:
        raise DeltaConfigError(
            f"combine_deltas combines delta models of one method, got {', '.join(methods)}; combine each method's "
            f"deltas separately"
        )
    for m in models:
        if m.backbone_model is not first.backbone_model:
            raise DeltaStateError(
                "combine_deltas combines delta models on one backbone, but they sit on different models; load them "
                "onto one backbone (save_finetuned, then from_finetuned onto it) first"
            )
        if m.__dict__.get("_unloaded", False):
            raise DeltaStateError(
                f"a {type(m).__name__} given to combine_deltas was merge_and_unload()ed: its deltas are part of the "
                f"backbone's weights for good; combine deltas that are still their own (from_finetuned a saved one)"
            )
        if m.merged:
            raise DeltaStateError(
                f"a {type(m).__name__} given to combine_deltas is merged: its update is already in the backbone's "
                f"weights, so the combined delta would add it a second time; unmerge() it first"
            )
    targets = _target_names(first)
    for m in models[1:]:
        if _target_names(m) != targets:
            own, other = set(targets), set(_target_names(m))
            differ = sorted(own ^ other) or ["the same modules in another order"]
            raise DeltaConfigError(
                f"combine_deltas combines deltas on the same modules, but these {type(m).__name__}s modify "
                f"different ones ({', '.join(map(str, differ[:4]))}{'...' if len(differ) > 4 else ''}); build "
                f"every delta with the same modified_modules"
            )
    return models, [float(w) for w in weights]


def _as_list(values: Iterable[object], name: str) -> list:
    if isinstance(values, (str, bytes, nn.Module)) or not isinstance(values, Iterable):
        raise DeltaConfigError(f"combine_deltas {name}= must be a list, got {type(values).__name__}")
    return list(values)


def _target_names(model: DeltaModel) -> list[tuple[str, tuple[int, ...] | None, str | None]]:
    """What each placed delta modifies, in placement order: the module, the fused parts, the stacked parameter."""
    return [(p.target.name, p.target.parts, p.target.parameter) for p in model.placements()]


def _check_options(method: type[DeltaModel], combination_type: str, options: _Options) -> None:
    """Refuse a combination the method does not offer and options out of range, before anything is built."""
    name = method.__name__
    density, svd_rank, svd_clamp, _, majority_sign_method, generator = options
    if combination_type not in COMBINATION_TYPES:
        raise DeltaConfigError(
            f"combine_deltas combination_type={combination_type!r} is unknown; use one of "
            f"{', '.join(map(repr, COMBINATION_TYPES))}"
        )
    if method.low_rank_fields is None and not method.combines_linearly:
        raise DeltaConfigError(
            f"{name} deltas cannot be combined: combine_deltas combines methods whose class declares low_rank_fields "
            f"(LoRA) or combines_linearly (BitFit, IA3)"
        )
    if method.low_rank_fields is None and combination_type != "linear":
        raise DeltaConfigError(
            f"{name} deltas combine as a weighted sum only: pass combination_type='linear' (not "
            f"{combination_type!r}, which needs low-rank deltas such as LoRA's)"
        )
    if combination_type in _PRUNING and (
        not isinstance(density, (int, float)) or isinstance(density, bool) or not 0 < density <= 1
    ):
        given = "no density" if density is None else f"density={density!r}"
        raise DeltaConfigError(
            f"combine_deltas combination_type={combination_type!r} prunes each delta, and got {given}; pass "
            f"density= the fraction of entries kept, in (0, 1] (0.5 keeps half)"
        )
    if svd_rank is not None and (not isinstance(svd_rank, int) or isinstance(svd_rank, bool) or svd_rank < 1):
        raise DeltaConfigError(f"combine_deltas svd_rank must be None or a whole number >= 1, got {svd_rank!r}")
    if svd_clamp is not None and (
        not isinstance(svd_clamp, (int, float)) or isinstance(svd_clamp, bool) or not 0 <= svd_clamp <= 1
    ):
        raise DeltaConfigError(f"combine_deltas svd_clamp must be None or a quantile in [0, 1], got {svd_clamp!r}")
    if majority_sign_method not in ("total", "frequency"):
        raise DeltaConfigError(
            f"combine_deltas majority_sign_method must be 'total' or 'frequency', got {majority_sign_method!r}"
        )
    if generator is not None and not isinstance(generator, torch.Generator):
        raise DeltaConfigError(f"combine_deltas generator must be a torch.Generator, got {type(generator).__name__}")


def _combine_low_rank(
    models: list[DeltaModel], weights: list[float], combination_type: str, options: _Options
) -> DeltaModel:
    """PEFT's LoRA ``add_weighted_adapter`` (see the module docstring), placement by placement."""
    rank_field, alpha_field = type(models[0]).low_rank_fields or ("", "")
    kind = "linear" if len(models) == 1 else combination_type  # PEFT: one adapter is combined linearly
    ranks = [getattr(m.config, rank_field) for m in models]
    if kind in _SAME_RANK and len(set(ranks)) > 1:
        raise DeltaConfigError(
            f"combine_deltas combination_type={kind!r} combines the factors entry by entry, so every delta needs the "
            f"same {rank_field}, got {ranks}; use 'cat' or an svd kind ('svd', 'ties_svd'...), which take any ranks"
        )
    factors = [_low_rank_factors(m) for m in models]  # [model][placement]
    rank = sum(ranks) if kind == "cat" else (options.svd_rank or max(ranks)) if kind.endswith("svd") else ranks[0]
    with torch.no_grad():
        combined = [
            _combine_factors(kind, [f[j] for f in factors], weights, rank, options) for j in range(len(factors[0]))
        ]
    new = _build_like(models[0], {rank_field: rank, alpha_field: rank})
    _fill(new, lambda j, delta: delta.load_low_rank_factors(*combined[j]))  # type: ignore[attr-defined]
    return new


def _low_rank_factors(model: DeltaModel) -> list[LowRankFactors]:
    """Each placed delta's factors, refused unless every one is a plain low-rank product whose factors load."""
    found = []
    for placement in model.placements():
        delta, where = placement.insertion.delta, f"the {type(model).__name__} delta on {placement.target.name}"
        if not (class_implements(delta, LowRankBranch) and class_implements(delta, LoadsLowRankFactors)):
            raise DeltaStateError(
                f"{where}{'.' + placement.target.parameter if placement.target.parameter else ''} has no low-rank "
                f"factors to combine (a {type(delta).__name__}; PEFT's add_weighted_adapter refuses stacked expert "
                f"weights too); combine deltas on linear layers"
            )
        factors = delta.low_rank_factors()
        if factors is None:
            raise DeltaStateError(
                f"{where} is not a plain low-rank product now (DoRA's rescaling, PiSSA's or OLoRA's residual base, "
                f"or dropout in training mode), so combine_deltas cannot combine its factors; call backbone.eval() "
                f"for dropout, or combine plain LoRA deltas"
            )
        found.append(factors)
    return found


def _combine_factors(
    kind: str, factors: list[LowRankFactors], weights: list[float], rank: int, options: _Options
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(down, up)`` of one combined placement, for a scale of one (see the module docstring)."""
    dtype, device = factors[0].down.dtype, factors[0].down.device
    pruning = (options.density, options.majority_sign_method, options.generator)
    shapes = {(f.down.shape[1], f.up.shape[0]) for f in factors}
    if len(shapes) > 1:
        raise DeltaConfigError(
            f"combine_deltas got factors of different sizes (in, out) {sorted(shapes)} on one module"
        )
    if kind == "cat":
        down = torch.cat([f.down * w * f.scale for f, w in zip(factors, weights, strict=True)], dim=0)
        return down, torch.cat([f.up for f in factors], dim=1)
    if kind.endswith("svd"):
        base = "linear" if kind == "svd" else kind.removesuffix("_svd")
        dense = [f.up @ f.down * f.scale for f in factors]
        total = combine_tensors(base, dense, torch.tensor(weights, device=device), *pruning)
        return svd_factors(total, rank, options.svd_clamp, options.svd_full_matrices)
    scaled = [w * f.scale for f, w in zip(factors, weights, strict=True)]
    root = [math.sqrt(abs(s)) for s in scaled]
    signed = torch.tensor([r if s >= 0 else -r for r, s in zip(root, scaled, strict=True)], device=device)
    down = combine_tensors(kind, [f.down for f in factors], signed, *pruning)  # the sign on one side only
    up = combine_tensors(kind, [f.up for f in factors], torch.tensor(root, device=device), *pruning)
    return down.to(dtype), up.to(dtype)


def _combine_linearly(models: list[DeltaModel], weights: list[float]) -> DeltaModel:
    """The weighted sum of each delta parameter, placement by placement (``combines_linearly`` methods)."""
    sources = [[dict(p.insertion.delta.named_parameters()) for p in m.placements()] for m in models]
    for j in range(len(sources[0])):
        shapes = [{n: tuple(t.shape) for n, t in s[j].items()} for s in sources]
        if any(s != shapes[0] for s in shapes):
            raise DeltaConfigError(
                f"combine_deltas got deltas of different parameters or shapes on one module ({shapes}); build every "
                f"delta with the same config"
            )
    with torch.no_grad():
        summed = [
            {
                name: combine_tensors("linear", [s[j][name] for s in sources], torch.tensor(weights, device=t.device))
                for name, t in own.items()
            }
            for j, own in enumerate(sources[0])
        ]
    new = _build_like(models[0], {})

    def load(j: int, delta: nn.Module) -> None:
        for name, param in delta.named_parameters():
            param.copy_(summed[j][name])

    _fill(new, load)
    return new


def _build_like(model: DeltaModel, overrides: dict[str, int]) -> DeltaModel:
    """A new delta model of ``model``'s class and config (``overrides`` set) on its backbone, on the same modules.

    Its initial values are overwritten, so building draws from a forked random state: the caller's stream (DARE's
    draws, the user's own) is not advanced by it.
    """
    config = model.config_class.from_dict(model.config.to_dict(), **overrides)
    config.copy_marks(model.config, overridden=overrides)
    cuda = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):
        new = type(model)(model.backbone_model, config=config)
    if _target_names(new) != _target_names(model):
        new.detach()
        raise DeltaStateError(
            f"the combined {type(model).__name__} resolves other modules than its inputs (the backbone changed since "
            f"they were built?); build the inputs again on this backbone"
        )
    return new


def _fill(new: DeltaModel, load: Callable[[int, nn.Module], None]) -> None:
    """Write each placement's combined tensors with ``load(j, delta)``; on any failure the new model comes out."""
    try:
        with torch.no_grad():
            for j, placement in enumerate(new.placements()):
                load(j, placement.insertion.delta)
    except BaseException:
        new.detach()
        raise
