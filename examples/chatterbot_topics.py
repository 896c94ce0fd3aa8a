"""A small real instruction-tuning task that ships offline: answer a question in a fixed JSON format, with its topic.

The questions and replies are the English conversations of ``chatterbot-corpus==1.2.0`` (one YAML file per topic:
``chatterbot_corpus/data/english/<topic>.yml``, each conversation a list whose first line is the question and second
the reply). We keep the twelve files that are about a subject (AI, computers, emotion, food, history, literature,
money, movies, politics, psychology, science, sports; not greetings, gossip, humor, trivia or the bot's profile), the
first reply of each distinct question, and replies short enough to generate quickly. The target a model must learn
is ``{"topic": "<file name>", "answer": "<reply>"}``: a format and a label set it is never told.

Questions are split by a hash of their text, so a question asked twice in the corpus never sits in both splits. The
corpus is found through ``importlib.metadata`` (``pip install --no-deps chatterbot-corpus==1.2.0``: data only) and
read with ``yaml.safe_load`` (no code in the files is ever run).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from packaged_files import locate_in_distribution

DATA_DIST = "chatterbot-corpus"
DATA_FOLDER = "chatterbot_corpus/data/english/"
TOPICS = (
    "ai",
    "computers",
    "emotion",
    "food",
    "history",
    "literature",
    "money",
    "movies",
    "politics",
    "psychology",
    "science",
    "sports",
)
MAX_ANSWER_CHARS = 90
"""Longer replies are left out: they would dominate the training tokens and the generation time."""
SYSTEM_PROMPT = 'Reply in JSON with the keys "topic" and "answer".'


@dataclass(frozen=True)
class Example:
    """One question with its topic and the corpus's reply."""

    topic: str
    question: str
    answer: str

    def target(self) -> str:
        """What the tuned model should answer: one line of JSON."""
        return json.dumps({"topic": self.topic, "answer": self.answer}, ensure_ascii=False)


def _corpus_folder() -> Path:
    return locate_in_distribution(DATA_DIST, ".yml", pin="==1.2.0", prefix=DATA_FOLDER).parent


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _is_test_question(question: str, test_fraction: float) -> bool:
    digest = hashlib.sha256(question.lower().encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < test_fraction


def load_topic_examples(split: str, test_fraction: float = 0.2) -> list[Example]:
    """The examples of one split (``"train"`` or ``"test"``), in corpus order."""
    import yaml

    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = _corpus_folder()
    examples, seen = [], set()
    for topic in TOPICS:
        with open(folder / f"{topic}.yml", encoding="utf-8") as file:
            conversations = yaml.safe_load(file).get("conversations") or []
        for conversation in conversations:
            if not (isinstance(conversation, list) and len(conversation) >= 2):
                continue
            question, answer = (_clean(str(line)) for line in conversation[:2])
            if not question or not answer or len(answer) > MAX_ANSWER_CHARS or question.lower() in seen:
                continue
            seen.add(question.lower())
            if _is_test_question(question, test_fraction) == (split == "test"):
                examples.append(Example(topic, question, answer))
    return examples


def parse_reply(text: str) -> dict | None:
    """The reply as ``{"topic", "answer"}`` when it is exactly that JSON object with string values, else None."""
    try:
        reply = json.loads(text.strip())
    except ValueError:
        return None
    if not isinstance(reply, dict) or set(reply) != {"topic", "answer"}:
        return None
    return reply if all(isinstance(value, str) for value in reply.values()) else None
