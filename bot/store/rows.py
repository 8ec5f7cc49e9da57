"""The store's records (what a read returns) and the conversions between them and table rows.

Kept apart from the engine and the writer so that code that only reads the log — the
trainers' dataset builder, exports — depends on these plain dataclasses, not on a database.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.engine import Connection

from bot.store import schema


class StoreError(Exception):
    """The store cannot be opened or used; the message is meant for the operator."""


@dataclass(slots=True)
class StoredMessage:
    id: int
    direction: str
    platform: str
    chat_id: str
    user_id: str | None
    text: str
    created_at: datetime
    platform_message_id: str | None = None
    reply_to_id: int | None = None
    skill: str | None = None
    kind: str | None = None
    latency_ms: float | None = None
    model: str | None = None
    adapter: str | None = None
    adapter_version: str | None = None
    original_length: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class FeedbackRow:
    id: int
    message_id: int
    platform: str
    user_id: str
    rating: int
    correction: str | None
    source: str
    created_at: datetime


@dataclass(slots=True)
class Conversation:
    platform: str
    chat_id: str
    messages: list[StoredMessage]
    #: feedback keyed by the message id it is about (ratings on replies, labels on messages)
    feedback: dict[int, list[FeedbackRow]]


@dataclass(slots=True)
class ForgetResult:
    #: The user's own messages and the bot's replies to them, together.
    messages_deleted: int
    feedback_deleted: int
    replies_deleted: int = 0


def _aware(value: datetime | None) -> datetime | None:
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def _json_default(obj: Any) -> Any:
    if isinstance(obj, datetime):
        return obj.isoformat()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    return str(obj)


def _dumps(obj: Any) -> str:
    return json.dumps(obj, default=_json_default, ensure_ascii=False)


_MESSAGE_COLUMNS = [c.name for c in schema.messages.columns]
_SQLITE_CHUNK = 32766 // len(_MESSAGE_COLUMNS) // 2


def _sqlite_datetime(value: datetime) -> str:
    # The text SQLAlchemy's SQLite DateTime type writes (and parses back), in UTC.
    if value.tzinfo is not None and value.utcoffset():
        value = value.astimezone(UTC)
    return value.replace(tzinfo=None).isoformat(" ")


def _sqlite_insert_messages(
    conn: Connection, rows: list[dict[str, Any]], *, skip_duplicates: bool = False
) -> set[int]:
    """Insert message rows with one multi-row ``INSERT`` per chunk; returns the ids inserted.

    The hot path of the whole bot: SQLAlchemy's per-row parameter processing costs several
    times what SQLite itself does, so on SQLite the rows are bound directly. With
    ``skip_duplicates`` a row whose ``dedup_key`` is already stored (or repeated earlier in the
    batch) is skipped, and its id is missing from the result.
    """
    inserted: set[int] = set()
    cols = _MESSAGE_COLUMNS
    row_marks = "(" + ",".join("?" * len(cols)) + ")"
    tail = " ON CONFLICT(dedup_key) DO NOTHING RETURNING id" if skip_duplicates else ""
    cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
    try:
        for start in range(0, len(rows), _SQLITE_CHUNK):
            chunk = rows[start : start + _SQLITE_CHUNK]
            params: list[Any] = []
            for row in chunk:
                for col in cols:
                    value = row[col]
                    if col == "meta":
                        value = None if value is None else _dumps(value)
                    elif col == "created_at":
                        value = _sqlite_datetime(value)
                    params.append(value)
            sql = (
                f"INSERT INTO messages ({','.join(cols)}) VALUES "
                f"{','.join([row_marks] * len(chunk))}{tail}"
            )
            cursor.execute(sql, params)
            if skip_duplicates:
                inserted.update(r[0] for r in cursor.fetchall())
            else:
                inserted.update(row["id"] for row in chunk)
    finally:
        cursor.close()
    return inserted


def _row_to_feedback(r: Any) -> FeedbackRow:
    return FeedbackRow(
        r.id,
        r.message_id,
        r.platform,
        r.user_id,
        r.rating,
        r.correction,
        r.source,
        _aware(r.created_at),  # type: ignore[arg-type]
    )


def _row_to_message(row: Any) -> StoredMessage:
    return StoredMessage(
        id=row.id,
        direction=row.direction,
        platform=row.platform,
        chat_id=row.chat_id,
        user_id=row.user_id,
        text=row.text,
        created_at=_aware(row.created_at),  # type: ignore[arg-type]
        platform_message_id=row.platform_message_id,
        reply_to_id=row.reply_to_id,
        skill=row.skill,
        kind=row.kind,
        latency_ms=row.latency_ms,
        model=row.model,
        adapter=row.adapter,
        adapter_version=row.adapter_version,
        original_length=row.original_length,
        meta=row.meta or {},
    )
