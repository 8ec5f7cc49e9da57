"""Platform-neutral message types.

Every adapter turns its platform's events into a :class:`Message` and every skill answers with
:class:`Reply` objects, so no skill ever needs to know which platform it serves. They are plain
slotted dataclasses rather than pydantic models because one of each is built per chat message
and the router's throughput target leaves no room for validation on the hot path; adapters
validate at the platform edge instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

ChatKind = Literal["private", "group", "channel"]
ReplyFormat = Literal["plain", "markdown"]
#: ``busy``: the bot could not answer in time and says so (with when to try again).
ReplyKind = Literal["answer", "notice", "error", "busy"]


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(slots=True)
class Attachment:
    """A file, sticker, voice note… described but never downloaded by the core."""

    kind: str
    mime_type: str | None = None
    size: int | None = None
    name: str | None = None
    url: str | None = None


@dataclass(slots=True)
class Message:
    """One inbound message as the core sees it.

    ``message_id`` is the platform's own id; together with platform and chat it is the key that
    de-duplicates redelivered updates. ``metadata`` is the one mutable bag: observers (sentiment,
    language detection…) annotate it and it is stored with the message.
    """

    platform: str
    chat_id: str
    user_id: str
    text: str
    message_id: str | None = None
    user_name: str = ""
    chat_kind: ChatKind = "private"
    chat_title: str = ""
    reply_to: str | None = None
    reply_to_bot: bool = False
    mentions_bot: bool = False
    edited: bool = False
    sent_at: datetime | None = None
    received_at: datetime = field(default_factory=utcnow)
    attachments: list[Attachment] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    #: Row id in the conversation store, set once the message is logged.
    id: int | None = None

    @property
    def chat_key(self) -> str:
        return f"{self.platform}:{self.chat_id}"

    @property
    def user_key(self) -> str:
        return f"{self.platform}:{self.user_id}"

    @property
    def dedup_key(self) -> str | None:
        if self.message_id is None:
            return None
        return f"{self.platform}:{self.chat_id}:{self.message_id}"


@dataclass(slots=True)
class Source:
    """Where a grounded answer came from, shown under the answer and logged with it."""

    title: str
    location: str = ""
    score: float | None = None
    #: A link to the section where the operator published the documents (knowledge.links).
    url: str | None = None


@dataclass(slots=True)
class Reply:
    """One message the bot sends back.

    Skills fill ``text`` (and optionally ``sources`` and model provenance); the core fills
    ``skill`` and ``reply_to`` and the store fills ``id``. ``rateable`` asks adapters to offer
    👍/👎 feedback, which is what the trainers learn from.
    """

    text: str
    format: ReplyFormat = "plain"
    kind: ReplyKind = "answer"
    rateable: bool = False
    sources: list[Source] = field(default_factory=list)
    model: str | None = None
    adapter: str | None = None
    adapter_version: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    skill: str | None = None
    reply_to: str | None = None
    #: Milliseconds from receipt to the reply being ready, set by the core.
    latency_ms: float | None = None
    id: int | None = None
    #: The operator's text a generated reply was written from (the passages in its prompt):
    #: a phone number the model repeats from a cited FAQ answer is the operator's to publish,
    #: not a leak, so the safety filter leaves what it finds here. Not logged (the passages
    #: are, by id, in ``metadata``).
    grounded_in: list[str] = field(default_factory=list)


@dataclass(slots=True)
class Escalation:
    """A conversation that needs a human: handed to every ``escalate`` hook."""

    platform: str
    chat_id: str
    user_id: str
    user_name: str
    reason: str
    #: The messages that triggered it, oldest first.
    messages: list[str] = field(default_factory=list)
    chat_title: str = ""
    at: datetime = field(default_factory=utcnow)
