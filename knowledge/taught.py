"""Answers operators taught in chat: an operator's ``/correct`` of a reply to a question
becomes a question/answer entry of the knowledge base at once.

Why not wait for the nightly LoRA cycle: an adapter learns how to answer, not what — a
135M-parameter model does not reliably memorise one corrected fact from one example, and the
next user who asks should not get the same wrong answer for a day. An entry in the index is
found by the next user's question (the entry's question has its own vector, as FAQ pairs do),
quoted word for word, and cited as taught by an operator. The correction still goes to the
trainers too.

Each entry is one small JSON file under ``<knowledge directory>/taught/``, named by the
question, so that the same question corrected again replaces its answer (the file's checksum
changes and the ingest re-reads it), and so that an operator can list, read, edit or remove
taught answers as files or with ``chinwag knowledge list`` / ``remove 'taught/*'``.
The asker is recorded (``platform:user``) so that ``/forget`` removes the entries their
question started: the question text is theirs.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bot.files import atomic_write

FOLDER = "taught"
#: How a taught entry is named where a document would be (citations, ``Passage.where``).
SOURCE_LABEL = "taught by an operator"
#: Longest question and answer kept; longer ones are refused rather than cut (a cut answer
#: is a wrong answer).
MAX_QUESTION_CHARS = 500
MAX_ANSWER_CHARS = 2000

_SPACE = re.compile(r"\s+")
_SLUG = re.compile(r"[^a-z0-9]+")


class TeachError(ValueError):
    """The entry cannot be taught; the message says why, for the operator."""


@dataclass(slots=True)
class TaughtAnswer:
    question: str
    answer: str
    author: str  # "platform:user" of the operator
    asked_by: str | None  # "platform:user" of whoever asked the question
    reply_id: int | None  # the bot reply that was corrected
    taught_at: str
    path: Path


def normalise(question: str) -> str:
    """The question as its file is keyed: case, spacing and end punctuation ignored, so "How
    do I reset it?" and "how do i reset it" are one entry."""
    return _SPACE.sub(" ", question).strip().strip("?!. ").casefold()


def entry_path(folder: Path, question: str) -> Path:
    key = normalise(question)
    slug = _SLUG.sub("-", key)[:48].strip("-") or "question"
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    return folder / f"{slug}-{digest}.json"


def write(
    folder: Path,
    question: str,
    answer: str,
    *,
    author: str,
    asked_by: str | None = None,
    reply_id: int | None = None,
) -> TaughtAnswer:
    """Write (or replace) the entry for ``question``, atomically: a crash mid-write leaves the
    old entry or the new one, never half of one (which the next ingest would skip as invalid
    JSON and so lose the answer)."""
    question = _SPACE.sub(" ", question).strip()
    answer = answer.strip()
    if not question or not answer:
        raise TeachError("both the question and the answer must have text")
    if len(question) > MAX_QUESTION_CHARS:
        raise TeachError(f"the question is longer than {MAX_QUESTION_CHARS} characters")
    if len(answer) > MAX_ANSWER_CHARS:
        raise TeachError(
            f"the answer is longer than {MAX_ANSWER_CHARS} characters; add a document instead"
        )
    folder.mkdir(parents=True, exist_ok=True)
    path = entry_path(folder, question)
    taught_at = datetime.now(UTC).isoformat(timespec="seconds")
    record: dict[str, Any] = {
        "q": question,
        "a": answer,
        "author": author,
        "asked_by": asked_by,
        "reply_id": reply_id,
        "taught_at": taught_at,
    }
    atomic_write(path, json.dumps(record, ensure_ascii=False, indent=1))
    return TaughtAnswer(question, answer, author, asked_by, reply_id, taught_at, path)


def read(path: Path) -> TaughtAnswer | None:
    """One entry, or None when the file is not a taught entry (edited into something else)."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not record.get("q") or not record.get("a"):
        return None
    return TaughtAnswer(
        str(record["q"]),
        str(record["a"]),
        str(record.get("author") or ""),
        record.get("asked_by"),
        record.get("reply_id"),
        str(record.get("taught_at") or ""),
        path,
    )


def entries(folder: Path) -> list[TaughtAnswer]:
    """Every readable entry, oldest first."""
    if not folder.is_dir():
        return []
    found = [e for p in sorted(folder.glob("*.json")) if (e := read(p)) is not None]
    return sorted(found, key=lambda e: e.taught_at)


def asked_by(folder: Path, who: str) -> list[Path]:
    """The entries whose question ``who`` asked (``platform:user``)."""
    return [e.path for e in entries(folder) if e.asked_by == who]
