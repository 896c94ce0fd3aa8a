"""Loading a transformers backbone from a local folder for the CLI: its config, its class, its weights (or none).

``show`` only needs the module tree, so it builds the model on PyTorch's ``meta`` device: no weights are read or
allocated, and a 7B-parameter architecture is shown in a fraction of a second. ``merge`` loads real weights.
"""

from __future__ import annotations

import difflib
import os
import shutil
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel

from opendelta.cli.common import CommandError, one_line

try:
    from huggingface_hub.errors import StrictDataclassError  # transformers 5 validates config fields' types
except ImportError:  # an older huggingface_hub: no such validation, nothing more to catch
    StrictDataclassError = ValueError  # type: ignore[assignment,misc]
from opendelta.cli.config_checks import check_config_sizes

__all__ = ["TOKENIZER_FILES", "build_skeleton", "copy_tokenizer_files", "load_config", "load_pretrained", "model_class"]

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "spm.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
    "chat_template.jinja",
    "preprocessor_config.json",
)
"""Files a model folder may hold beside the weights, that a merged model keeps (``save_pretrained`` skips them)."""


MAX_MODEL_CONFIG_BYTES = 16 * 2**20
"""A model's ``config.json`` is kilobytes (megabytes with a label map of thousands of classes); more is not one."""


def load_config(path: str | os.PathLike[str]) -> PretrainedConfig:
    """The transformers config of a model folder (or of a ``config.json`` file), its sizes checked.

    Every command that builds a model reads its config here, so none builds from a config whose sizes are
    negative or absurd (see :mod:`opendelta.cli.config_checks`).

    Raises:
        CommandError: no such path, no ``config.json``, transformers cannot read it, or a size is out of bounds.
    """
    location = Path(path)
    if not location.exists():
        raise CommandError(f"{location}: no such file or folder; give a model folder with a config.json, or the file")
    if location.is_dir() and not (location / "config.json").is_file():
        raise CommandError(f"{location} holds no config.json, so it is not a transformers model folder")
    file = location / "config.json" if location.is_dir() else location
    if file.stat().st_size > MAX_MODEL_CONFIG_BYTES:
        raise CommandError(
            f"{file} is {file.stat().st_size:,} bytes, more than a model config holds ({MAX_MODEL_CONFIG_BYTES:,}); "
            f"it was not read"
        )
    try:
        config: PretrainedConfig = AutoConfig.from_pretrained(str(location))
    except (OSError, ValueError, KeyError, TypeError, RecursionError, StrictDataclassError) as exc:
        raise CommandError(f"transformers cannot read the config in {location}: {one_line(str(exc))}") from exc
    check_config_sizes(config, str(location))
    return config


def _transformers_class(name: str) -> type[PreTrainedModel] | None:
    cls = getattr(transformers, name, None)
    return cls if isinstance(cls, type) and issubclass(cls, PreTrainedModel) else None


def model_class(
    config: PretrainedConfig, requested: str | None = None, recorded: str | None = None
) -> type[PreTrainedModel] | None:
    """The transformers class to build a backbone as; ``None`` means ``AutoModel`` (the base model).

    In order: ``requested`` (``--class``), else ``recorded`` (the ``backbone_class`` a delta checkpoint records), else
    the config's first ``architectures`` entry (the class the folder was saved from).

    Raises:
        CommandError: ``requested`` is not a transformers model class, or one for another kind of config.
    """
    if requested:
        cls = _transformers_class(requested)
        if cls is None:
            close = difflib.get_close_matches(requested, [n for n in dir(transformers) if n[:1].isupper()], n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise CommandError(f"--class {requested}: transformers has no model class of that name{hint}")
        if not isinstance(config, cls.config_class):
            raise CommandError(
                f"--class {requested} is built from a {cls.config_class.__name__}, but the folder's config is a "
                f"{type(config).__name__} (model_type {config.model_type!r})"
            )
        return cls
    for name in ([recorded] if recorded else []) + list(getattr(config, "architectures", None) or [])[:1]:
        cls = _transformers_class(name)
        if cls is not None and isinstance(config, cls.config_class):
            return cls
    return None


def build_skeleton(config: PretrainedConfig, cls: type[PreTrainedModel] | None) -> nn.Module:
    """The model's module tree with every tensor on the ``meta`` device: right names, types and shapes, no data."""
    try:
        with torch.device("meta"):
            model: nn.Module = cls(config) if cls is not None else AutoModel.from_config(config)
    except (ValueError, TypeError, RuntimeError, ArithmeticError, LookupError, AttributeError) as exc:  # clashes
        raise CommandError(
            f"transformers cannot build {(cls or AutoModel).__name__} from this config "
            f"({type(exc).__name__}: {one_line(str(exc))}); check the config's sizes and settings"
        ) from exc
    return model


def load_pretrained(
    folder: str | os.PathLike[str], cls: type[PreTrainedModel] | None
) -> tuple[PreTrainedModel, list[str]]:
    """The model in ``folder`` with its weights (``cls`` or ``AutoModel``), in eval mode, and the keys it lacked.

    transformers' own report (progress bars, "MISSING ... newly initialized") is silenced: the caller knows what
    fills those keys (a delta that carries the task head) and reports what actually happened.

    Raises:
        CommandError: the folder holds no weights, or they do not fit the class.
    """
    from transformers.utils import logging as hf_logging

    loader = cls if cls is not None else AutoModel
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        model, info = loader.from_pretrained(str(folder), output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise CommandError(f"cannot load {loader.__name__} from {folder}: {one_line(str(exc))}") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    model.eval()
    return model, sorted(info.get("missing_keys", ()))


def copy_tokenizer_files(source: str | os.PathLike[str], destination: str | os.PathLike[str]) -> list[str]:
    """Copy the :data:`TOKENIZER_FILES` that ``source`` holds and ``destination`` lacks; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        src, dst = Path(source) / name, Path(destination) / name
        if src.is_file() and not dst.exists():
            shutil.copyfile(src, dst)
            copied.append(name)
    return copied
