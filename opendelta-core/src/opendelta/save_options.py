"""``save_finetuned``'s keyword arguments: each checked by name, and each of OpenDelta 0.3.2's honoured or answered.

A misspelt keyword (``finetuned_dela_path=``) used to vanish into ``**kwargs`` and the delta went to
``./delta_checkpoints/``; now anything not listed here is refused, naming the accepted ones, before a file is written.

OpenDelta 0.3.2's own arguments, argument by argument:

===================== ===================================================================================
``save_config``       ``False`` warns: the config is written anyway, since ``from_finetuned`` needs it to
                      rebuild the delta and to check its backbone (0.3.2 wrote the weights alone).
``save_function``     ``torch.save`` (0.3.2's default) warns: the tensors are written as safetensors, which load
                      without running pickled code. Another function is refused (it would be silently
                      skipped); save to a folder, then move it where it should go.
``push_to_dc``        ``True`` warns: DeltaCenter no longer exists and nothing is uploaded; ``push_to_hub=True,
                      repo_id=...`` uploads to the Hugging Face Hub.
``center_args``,      DeltaCenter's metadata (and its "push later" switch): given, they warn that they are
``center_args_pool``, ignored; tags and results go in the model card (below), a later upload is
``delay_push``        ``huggingface_hub.upload_folder`` (or ``huggingface-cli upload``) on the saved folder.
``list_tags``         Added to the model card's Hub metadata ``tags`` (0.3.2 wrote them in DeltaCenter's
                      ``config.yml``; our ``config.json`` holds only what loading reads).
``dict_tags``         A "Tags" table in the model card.
``test_result``       A "Results" section in the model card.
``usage``             A "Notes" section in the model card (0.3.2 accepted it and wrote it nowhere).
===================== ===================================================================================

Card entries are written only where the card is (not over a README of the user's own; a warning says so). 0.3.2's
positional order (``save_finetuned(path, True, None, torch.save, False)``) is read too: see :func:`positional_032`.
"""

from __future__ import annotations

import difflib
import json
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from opendelta.errors import DeltaConfigError, OpenDeltaCompatibilityWarning, UnknownArgumentError

__all__ = ["HUB_OPTIONS", "LEGACY_OPTIONS", "CardExtras", "check_save_options", "positional_032"]

HUB_OPTIONS = ("private", "token", "commit_message")
"""Options of the Hub upload (``push_to_hub=True``)."""
LEGACY_OPTIONS = (
    "save_function",
    "push_to_dc",
    "center_args",
    "center_args_pool",
    "list_tags",
    "dict_tags",
    "delay_push",
    "test_result",
    "usage",
)
"""OpenDelta 0.3.2's ``save_finetuned`` options beyond the folder, ``save_config`` and ``state_dict``."""
_NAMED = ("finetuned_delta_path", "save_config", "state_dict", "push_to_hub", "repo_id")
_DELTA_CENTER = ("center_args", "center_args_pool", "delay_push")


@dataclass
class CardExtras:
    """What 0.3.2's tag and result arguments add to the model card."""

    tags: list[str] = field(default_factory=list)
    dict_tags: dict[str, Any] = field(default_factory=dict)
    test_result: Any = None
    usage: str = ""

    def __bool__(self) -> bool:
        return bool(self.tags or self.dict_tags or self.test_result is not None or self.usage)

    def apply(self, card_text: str) -> str:
        """``card_text`` (a model card with Hub metadata) with these tags and sections added."""
        from huggingface_hub import ModelCard

        card = ModelCard(card_text)
        tags = list(card.data.tags or [])
        card.data.tags = tags + [t for t in self.tags if t not in tags]
        sections = []
        if self.dict_tags:
            rows = "\n".join(f"| `{k}` | `{v!r}` |" for k, v in self.dict_tags.items())
            sections.append(f"## Tags\n\n| tag | value |\n| --- | --- |\n{rows}\n")
        if self.test_result is not None:
            sections.append(f"## Results\n\n```\n{_shown(self.test_result)}\n```\n")
        if self.usage:
            sections.append(f"## Notes\n\n{self.usage.strip()}\n")
        if sections:
            card.text = card.text.rstrip("\n") + "\n\n" + "\n".join(sections)
        return str(card)

    def warn_not_written(self, folder: Path) -> None:
        warnings.warn(
            f"save_finetuned: list_tags, dict_tags, test_result and usage go in the model card, but {folder}/README.md "
            f"is a README of your own (or our card, edited), which a save never overwrites: they were not written. "
            f"Add them to it by hand, or remove it to get a fresh card",
            OpenDeltaCompatibilityWarning,
            stacklevel=4,
        )


def _shown(value: Any) -> str:
    try:
        return json.dumps(value, indent=2, sort_keys=True, default=str)
    except (TypeError, ValueError):
        return repr(value)


def _warn(message: str) -> None:
    warnings.warn(message, OpenDeltaCompatibilityWarning, stacklevel=4)  # the user's save_finetuned() line


def _refuse_unknown(options: Mapping[str, Any]) -> None:
    known = (*_NAMED, *HUB_OPTIONS, *LEGACY_OPTIONS)
    unknown = [k for k in options if k not in known]
    if unknown:
        close = {k: difflib.get_close_matches(k, known, n=1) for k in unknown}
        hints = "; ".join(f"did you mean {c[0]!r} instead of {k!r}?" for k, c in close.items() if c)
        raise UnknownArgumentError(
            f"save_finetuned() got unexpected keyword argument(s) {unknown!r}{'; ' + hints if hints else ''} "
            f"Nothing was saved. Accepted: {', '.join(known)}"
        )


def _check_save_function(save_function: Callable[..., Any] | None) -> None:
    if save_function is None:
        return
    if save_function is torch.save:
        _warn(
            "save_finetuned(save_function=torch.save): the delta is written as safetensors "
            "(delta_model-<digest>.safetensors), not as torch.save's pickle, which runs code when loaded; "
            "from_finetuned reads it. Leave save_function out to silence this"
        )
        return
    raise DeltaConfigError(
        f"save_finetuned(save_function={getattr(save_function, '__name__', save_function)!r}) is not supported: "
        f"the checkpoint is written by opendelta itself, atomically and as safetensors, so your function would be "
        f"skipped. Save to a local folder and copy or upload it from there (push_to_hub=True, repo_id=... uploads "
        f"to the Hub). Nothing was saved"
    )


def positional_032(push_to_hub: Any, repo_id: Any, options: dict[str, Any]) -> tuple[bool, str | None]:
    """Read 0.3.2's positional order: its 4th and 5th parameters were ``save_function`` and ``push_to_dc``.

    Here they are ``push_to_hub`` and ``repo_id``; a callable 4th or a bool 5th can only be 0.3.2's, and is moved
    into ``options`` under its 0.3.2 name (then checked as if passed by name).
    """
    if callable(push_to_hub):
        options["save_function"], push_to_hub = push_to_hub, False
    if isinstance(repo_id, bool):
        options["push_to_dc"], repo_id = repo_id, None
    return bool(push_to_hub), repo_id


def check_save_options(save_config: bool, options: dict[str, Any]) -> tuple[dict[str, Any], CardExtras]:
    """Check ``save_finetuned``'s keyword arguments before anything is written; warn about those that do nothing.

    Returns:
        The Hub upload options (``private``, ``token``, ``commit_message``) and what goes in the model card.

    Raises:
        UnknownArgumentError: an argument ``save_finetuned`` does not know (named, with the accepted ones).
        DeltaConfigError: a ``save_function`` other than ``torch.save``.
    """
    _refuse_unknown(options)
    _check_save_function(options.get("save_function"))
    if not save_config:
        _warn(
            "save_finetuned(save_config=False): the config (config.json) is written anyway, since from_finetuned "
            "needs it to rebuild the delta and check its backbone; the weights are in delta_model-*.safetensors"
        )
    if options.get("push_to_dc"):
        _warn(
            "save_finetuned(push_to_dc=True): DeltaCenter no longer exists, so nothing was uploaded; the delta is "
            "saved locally. Upload it to the Hugging Face Hub with push_to_hub=True, repo_id='user/name'"
        )
    given = [k for k in _DELTA_CENTER if options.get(k)]
    if given:
        _warn(
            f"save_finetuned({', '.join(f'{k}=...' for k in given)}): DeltaCenter's options are ignored, as "
            f"DeltaCenter no longer exists. Tags and results go in the model card (list_tags, dict_tags, "
            f"test_result, usage); to upload later, run huggingface_hub.upload_folder on the saved folder"
        )
    tags = options.get("list_tags") or []
    dict_tags = options.get("dict_tags") or {}
    if isinstance(tags, str) or not isinstance(tags, Sequence):
        raise DeltaConfigError(f"save_finetuned(list_tags=...) must be a list of strings, got {tags!r}")
    if not isinstance(dict_tags, Mapping):
        raise DeltaConfigError(f"save_finetuned(dict_tags=...) must be a dict, got {dict_tags!r}")
    usage = options.get("usage") or ""
    extras = CardExtras([str(t) for t in tags], dict(dict_tags), options.get("test_result"), str(usage))
    return {k: options[k] for k in HUB_OPTIONS if k in options}, extras
