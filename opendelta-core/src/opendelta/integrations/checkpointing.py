"""Gradient (activation) checkpointing for a delta-tuned transformers model.

Deltas live in hooks and child modules of the layers transformers checkpoints, so recomputation reruns them and
their gradients equal those computed without checkpointing. One thing breaks: with the *reentrant* implementation
(``torch.utils.checkpoint(..., use_reentrant=True)``, transformers 4.x's default), a checkpointed layer whose input
does not require grad returns an output that does not either, so nothing inside it gets a gradient. After
``freeze_module`` the frozen input embeddings produce exactly such inputs: backward then fails ("element 0 of
tensors does not require grad") or, when a trainable task head sits above, silently leaves every delta inside the
layers without a gradient. The fix is to make the embeddings' output require grad (transformers'
``enable_input_require_grads``; transformers 5 does it in ``activation_checkpointing_enable``, 4.57 only for PEFT
models). The non-reentrant implementation (transformers 5's default) needs nothing.
"""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["checkpointing_enabled", "enable_gradient_checkpointing", "ensure_input_grads"]


def checkpointing_enabled(model: nn.Module) -> bool:
    """Whether some layer of a transformers ``model`` has gradient checkpointing switched on."""
    return any(getattr(module, "gradient_checkpointing", False) is True for module in model.modules())


def _has_input_grad_hook(model: nn.Module) -> bool:
    # transformers 4.57 stores one handle as _require_grads_hook; 5.x also keeps the list _require_grads_hooks
    return bool(getattr(model, "_require_grads_hooks", None)) or getattr(model, "_require_grads_hook", None) is not None


def ensure_input_grads(model: nn.Module) -> bool:
    """Make the output of ``model``'s frozen input embeddings require grad, so reentrant checkpointing trains deltas.

    Does nothing when transformers already installed its hook, or when the embeddings are trainable (their output
    then requires grad anyway).

    Args:
        model: a transformers ``PreTrainedModel`` (it provides ``get_input_embeddings`` and
            ``enable_input_require_grads``).

    Returns:
        Whether a hook was added.

    Raises:
        TypeError: ``model`` is not a transformers model with those two methods.
    """
    get_embeddings = getattr(model, "get_input_embeddings", None)
    enable = getattr(model, "enable_input_require_grads", None)
    if get_embeddings is None or enable is None:
        raise TypeError(
            f"{type(model).__name__} has no get_input_embeddings()/enable_input_require_grads(); pass the "
            f"transformers PreTrainedModel itself (not a wrapper such as DistributedDataParallel or the delta model)"
        )
    if _has_input_grad_hook(model):
        return False
    embeddings = get_embeddings()
    if embeddings is None or any(p.requires_grad for p in embeddings.parameters()):
        return False
    enable()
    return True


def enable_gradient_checkpointing(model: nn.Module, use_reentrant: bool = False, **checkpoint_kwargs: Any) -> None:
    """Switch on gradient checkpointing the same way under transformers 4.57 and 5.x, ready for delta training.

    Calls ``activation_checkpointing_enable`` (transformers 5; its ``gradient_checkpointing_enable`` alias emits a
    FutureWarning) or ``gradient_checkpointing_enable`` (4.57) with an explicit ``use_reentrant``, the two versions
    having different defaults, then :func:`ensure_input_grads`. Checkpointing only acts in ``train()`` mode.

    Args:
        model: the transformers model (the backbone the deltas are attached to).
        use_reentrant: which ``torch.utils.checkpoint`` implementation to use; both give the same gradients here.
        checkpoint_kwargs: further keyword arguments for ``torch.utils.checkpoint.checkpoint``.

    Raises:
        TypeError: ``model`` does not support gradient checkpointing (not a transformers model).
    """
    kwargs = {**checkpoint_kwargs, "use_reentrant": use_reentrant}
    activation = getattr(model, "activation_checkpointing_enable", None)
    gradient = getattr(model, "gradient_checkpointing_enable", None)
    if activation is not None:
        activation(activation_checkpointing_kwargs=kwargs)
    elif gradient is not None:
        gradient(gradient_checkpointing_kwargs=kwargs)
    else:
        raise TypeError(
            f"{type(model).__name__} has no gradient_checkpointing_enable(); gradient checkpointing needs a "
            f"transformers PreTrainedModel (pass the backbone, not the delta model or a DDP wrapper)"
        )
    ensure_input_grads(model)
