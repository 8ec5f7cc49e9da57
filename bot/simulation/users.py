"""Simulated users for load and quality runs: replayed humans and scripted personas.

- ``replay``: a real human's side of a conversation from the ``chitchat-dataset`` package
  (7,168 casual chats), opener first, follow-ups in order — realistic small talk, typos
  included.
- ``asker``: asks questions (from ``--questions FILE``, one per line, or the dataset's prompts)
  and rates every answer.
- ``complainer``: grows unhappy over a few messages — what should trigger sentiment
  escalation.

Every persona rates the bot's replies by one scripted, documented rule (:func:`rate`), and the
ratings go into the feedback table exactly as a user's 👍/👎 would, so a simulated run can
rehearse a training cycle end to end. Users talk to the bot in-process or through the HTTP API
(``--url``), which also makes them a load generator.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

PERSONAS = ("replay", "asker", "complainer")
COMPLAINTS = [
    "this is not what I asked for",
    "that answer was useless, honestly",
    "I'm getting really annoyed, nothing works",
    "this is terrible, I want to talk to a human",
    "worst support ever, I'm so angry",
]
_WORDS = re.compile(r"[a-z']{3,}")
_STOP = frozenset(
    "the and you for are was this that with have what your not but can how they there about "
    "from just like its it's i'm don't dont".split()
)


@dataclass
class Exchange:
    user: str
    persona: str
    said: str
    replies: list[dict[str, Any]]
    seconds: float
    rating: int | None = None


@dataclass
class LoadReport:
    exchanges: list[Exchange] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        lat = sorted(e.seconds * 1000 for e in self.exchanges)
        skills: dict[str, int] = {}
        for e in self.exchanges:
            for r in e.replies:
                skills[r.get("skill") or "?"] = skills.get(r.get("skill") or "?", 0) + 1
        ratings = [e.rating for e in self.exchanges if e.rating is not None]

        def pct(p: float) -> float | None:
            return round(lat[min(len(lat) - 1, int(p * len(lat)))], 1) if lat else None

        return {
            "users": len({e.user for e in self.exchanges}),
            "turns": len(self.exchanges),
            "replies": sum(len(e.replies) for e in self.exchanges),
            "unanswered": sum(not e.replies for e in self.exchanges),
            "errors": len(self.errors),
            "skills": dict(sorted(skills.items())),
            "thumbs_up": ratings.count(1),
            "thumbs_down": ratings.count(-1),
            "latency_ms_p50": pct(0.5),
            "latency_ms_p95": pct(0.95),
            "turns_per_s": round(len(self.exchanges) / self.seconds, 2) if self.seconds else None,
        }


def rate(said: str, replies: Sequence[dict[str, Any]]) -> int:
    """The scripted rating rule: 👎 for no reply, an error or a notice, a reply that only
    repeats the user, or one that repeats itself; 👍 otherwise."""
    if not replies:
        return -1
    text = " ".join(r.get("text", "") for r in replies).strip()
    if any(r.get("kind") in ("error", "notice") for r in replies) or not text:
        return -1
    if text.casefold() == said.strip().casefold():
        return -1
    words = [w for w in _WORDS.findall(text.casefold()) if w not in _STOP]
    if len(words) >= 8 and len(set(words)) / len(words) < 0.4:
        return -1  # a loop of the same few words
    return 1


@cache
def _dataset() -> dict[str, Any]:
    """chitchat-dataset's 40 MB of JSON, parsed once per process."""
    import chitchat_dataset

    return dict(chitchat_dataset.Dataset())


@cache
def chitchat_conversations() -> list[list[tuple[str, str]]]:
    """Every chitchat-dataset conversation, in the package's order, as ``(sender, text)`` turns
    (one speaker's consecutive lines joined); empty conversations included, as ``[]``."""
    return [
        [
            (block[0].get("sender", ""), " ".join(u["text"] for u in block))
            for block in messages
            if block
        ]
        for messages in (conv.get("messages") or [] for conv in _dataset().values())
    ]


@cache
def _chitchat() -> list[list[str]]:
    """The human turns of each chitchat-dataset conversation, by its first speaker."""
    conversations = []
    for conv in chitchat_conversations():
        if not conv:
            continue
        first = conv[0][0]
        turns = [text for sender, text in conv if sender == first]
        if len(turns) >= 2:
            conversations.append([t.strip() for t in turns if t.strip()])
    return conversations


@cache
def _prompts() -> list[str]:
    return sorted({c["prompt"] for c in _dataset().values() if c.get("prompt")})


def script(
    persona: str, turns: int, rng: random.Random, questions: Sequence[str] = ()
) -> list[str]:
    """What one simulated user will say, ``turns`` messages."""
    if persona == "replay":
        conv = rng.choice(_chitchat())
        return (conv * (turns // len(conv) + 1))[:turns]
    if persona == "asker":
        pool = list(questions) or _prompts()
        return [rng.choice(pool) for _ in range(turns)]
    if persona == "complainer":
        return [COMPLAINTS[min(i, len(COMPLAINTS) - 1)] for i in range(turns)]
    raise ValueError(f"unknown persona {persona!r}; choose from {', '.join(PERSONAS)}")


#: ``send(chat_id, user_id, text) -> replies as dicts`` (in-process or over HTTP).
Send = Callable[[str, str, str], Awaitable[list[dict[str, Any]]]]
#: ``feedback(reply_id, user_id, rating)``.
Feedback = Callable[[int, str, int], Awaitable[Any]]


async def run_users(
    send: Send,
    feedback: Feedback | None,
    *,
    users: int,
    turns: int,
    persona: str = "mixed",
    questions: Sequence[str] = (),
    seed: int = 0,
    concurrency: int = 32,
    on_turn: Callable[[Exchange], None] | None = None,
) -> LoadReport:
    """``users`` simulated users, each in its own chat, ``turns`` messages each, concurrently."""
    rng = random.Random(seed)
    run = uuid.uuid4().hex[:6]
    plans = []
    for i in range(users):
        kind = PERSONAS[i % len(PERSONAS)] if persona == "mixed" else persona
        plans.append((f"sim-{run}-{i}", kind, script(kind, turns, rng, questions)))
    report = LoadReport()
    gate = asyncio.Semaphore(max(1, concurrency))

    async def user(user_id: str, kind: str, lines: list[str]) -> None:
        async with gate:
            for text in lines:
                started = time.perf_counter()
                try:
                    replies = await send(f"chat-{user_id}", user_id, text)
                except Exception as exc:
                    report.errors.append(f"{user_id}: {type(exc).__name__}: {exc}")
                    return
                exchange = Exchange(user_id, kind, text, replies, time.perf_counter() - started)
                rateable = [r for r in replies if r.get("rateable") and r.get("id")]
                if feedback is not None and rateable:
                    exchange.rating = rate(text, replies)
                    for r in rateable:
                        await feedback(int(r["id"]), user_id, exchange.rating)
                report.exchanges.append(exchange)
                if on_turn is not None:
                    on_turn(exchange)

    started = time.perf_counter()
    await asyncio.gather(*(user(*p) for p in plans))
    report.seconds = time.perf_counter() - started
    return report


def in_process(bot: Any, platform: str = "simulated") -> tuple[Send, Feedback]:
    """Send and feedback functions talking to a running :class:`bot.core.Bot` directly."""
    from bot.messages import Message

    ids = iter(range(1, 1 << 62))

    async def send(chat_id: str, user_id: str, text: str) -> list[dict[str, Any]]:
        message = Message(platform, chat_id, user_id, text, message_id=str(next(ids)))
        return [_reply_dict(r) for r in await bot.handle(message)]

    async def feedback(reply_id: int, user_id: str, rating: int) -> None:
        await bot.store.add_feedback(reply_id, platform, user_id, rating, source="simulated")

    return send, feedback


def over_http(session: Any, url: str, token: str) -> tuple[Send, Feedback]:
    """Send and feedback functions for a bot serving the HTTP API at ``url``."""
    headers = {"Authorization": f"Bearer {token}"}
    base = url.rstrip("/")

    async def send(chat_id: str, user_id: str, text: str) -> list[dict[str, Any]]:
        body = {"chat_id": chat_id, "user_id": user_id, "text": text}
        async with session.post(f"{base}/v1/messages", json=body, headers=headers) as resp:
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}: {(await resp.text())[:200]}")
            return list((await resp.json())["replies"])

    async def feedback(reply_id: int, user_id: str, rating: int) -> None:
        body = {"reply_id": reply_id, "user_id": user_id, "rating": rating}
        async with session.post(f"{base}/v1/feedback", json=body, headers=headers) as resp:
            if resp.status not in (200, 201):
                raise RuntimeError(f"feedback: HTTP {resp.status}")

    return send, feedback


def _reply_dict(r: Any) -> dict[str, Any]:
    return {
        "id": r.id,
        "text": r.text,
        "skill": r.skill,
        "kind": r.kind,
        "rateable": r.rateable,
        "latency_ms": r.latency_ms,
    }


def read_questions(path: Path | None) -> list[str]:
    if path is None:
        return []
    return [q.strip() for q in path.read_text(encoding="utf-8").splitlines() if q.strip()]
