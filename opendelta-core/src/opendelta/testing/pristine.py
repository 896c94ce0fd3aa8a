"""A snapshot of everything a failed operation must leave alone in a backbone, and the check that it did.

"Refused, and the backbone is exactly as it was" covers more than the weights: the module tree (no delta
submodule left behind), the hooks PyTorch calls (no stray forward hook still dispatching), ``requires_grad``,
train/eval mode, and the private attributes insertion adds. :class:`Pristine` records all of them;
:meth:`Pristine.assert_unchanged` names the first difference, which is what a failing test should say.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["Pristine"]

_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
)


def _hook_counts(module: nn.Module) -> tuple[int, ...]:
    return tuple(len(getattr(module, name, {})) for name in _HOOK_DICTS)


@dataclass
class Pristine:
    """What :meth:`of` saw in a model: weights and buffers (cloned), structure, hooks, flags, attributes."""

    state: dict[str, torch.Tensor]
    modules: list[tuple[str, str]]
    hooks: dict[str, tuple[int, ...]]
    requires_grad: dict[str, bool]
    training: dict[str, bool]
    attributes: dict[str, frozenset[str]]

    @classmethod
    def of(cls, model: nn.Module) -> Pristine:
        """Record ``model`` now."""
        named = list(model.named_modules())
        return cls(
            state={k: v.detach().clone() for k, v in model.state_dict().items()},
            modules=[(n, type(m).__name__) for n, m in named],
            hooks={n: _hook_counts(m) for n, m in named},
            requires_grad={n: p.requires_grad for n, p in model.named_parameters()},
            training={n: m.training for n, m in named},
            attributes={n: frozenset(vars(m)) for n, m in named},
        )

    def differences(self, model: nn.Module) -> list[str]:
        """Every way ``model`` differs from the snapshot (empty: unchanged)."""
        now = Pristine.of(model)
        found = []
        if now.modules != self.modules:
            added = sorted(set(now.modules) - set(self.modules))[:3]
            removed = sorted(set(self.modules) - set(now.modules))[:3]
            found.append(f"module tree changed (added {added}, removed {removed})")
        if list(now.state) != list(self.state):
            found.append(f"state_dict keys changed: {sorted(set(now.state) ^ set(self.state))[:5]}")
        else:
            changed = [
                k for k, v in self.state.items() if not torch.equal(v, now.state[k]) or v.dtype != now.state[k].dtype
            ]
            if changed:
                found.append(f"state_dict values changed: {changed[:5]}")
        for label, before, after in (
            ("hooks", self.hooks, now.hooks),
            ("requires_grad", self.requires_grad, now.requires_grad),
            ("train/eval mode", self.training, now.training),
            ("attributes", self.attributes, now.attributes),
        ):
            changed = [k for k in before if before[k] != after.get(k)]
            if changed:
                found.append(f"{label} changed on {changed[:5]}")
        return found

    def assert_unchanged(self, model: nn.Module) -> None:
        """Raise ``AssertionError`` naming what changed since the snapshot."""
        found = self.differences(model)
        assert not found, "the backbone changed: " + "; ".join(found)
