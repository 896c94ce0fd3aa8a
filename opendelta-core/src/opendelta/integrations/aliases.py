"""One name per shared tensor in ``state_dict()``, for savers that refuse aliased tensors.

Some deltas share a parameter between layers: prefix tuning's reparameterization network, Compacter's hypercomplex
rule. The same ``Parameter`` is then reachable under a name in every layer, and ``state_dict()`` lists it under each.
``save_pretrained``, and so every ``Trainer`` checkpoint, refuses shared tensors that are not declared tied
embeddings ("The weights trying to be saved contained shared tensors ...", transformers 4.57 and 5.x alike), so such
a delta fails at the Trainer's first save. Keeping only the first name loses nothing: loading that name fills the one
``Parameter`` every alias points to. The state dict then lacks the other names, so load it with ``strict=False``, as
the Trainer does when it resumes (accelerate drops the aliases by itself, with a warning).
"""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["first_names_only"]

_HANDLE = "_opendelta_first_names_handle"


class _FirstNamesOnly:
    """``state_dict`` post-hook that drops every later name of a parameter listed under several (picklable)."""

    def __call__(self, module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
        first: dict[int, str] = {}
        for name, param in module.named_parameters(remove_duplicate=False):
            key = prefix + name
            kept = first.setdefault(id(param), key)
            if kept != key and kept in state_dict:
                state_dict.pop(key, None)


def first_names_only(module: nn.Module, enable: bool = True) -> None:
    """Make ``module.state_dict()`` list each shared parameter once (``enable=False`` lists every name again).

    Calling it twice is harmless. The hook is evaluated at each ``state_dict()`` call, so it stays right when deltas
    are added later.
    """
    handle = getattr(module, _HANDLE, None)
    if enable and handle is None:
        setattr(module, _HANDLE, module.register_state_dict_post_hook(_FirstNamesOnly()))
    elif not enable and handle is not None:
        handle.remove()
        delattr(module, _HANDLE)
