"""The conversation store: every inbound and outbound message, feedback and privacy requests.

Three layers: the records (:mod:`bot.store.rows`), the engine that opens and tends the
database (:mod:`bot.store.engine`) and the group-commit writer (:mod:`bot.store.writer`);
this module is the API the bot, the skills and the trainers call — what is written and read.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.ext.asyncio import AsyncEngine

from bot.messages import Message, Reply, utcnow
from bot.store import schema
from bot.store.engine import StoreEngine
from bot.store.ids import IdGenerator
from bot.store.rows import (
    Conversation,
    FeedbackRow,
    ForgetResult,
    StoredMessage,
    _aware,
    _row_to_feedback,
    _row_to_message,
)
from bot.store.writer import GroupCommitWriter

log = logging.getLogger(__name__)


class ConversationStore(StoreEngine, GroupCommitWriter):
    """Async access to the conversation log; SQLite by default, PostgreSQL by URL."""

    def __init__(
        self,
        url: str,
        *,
        synchronous: str = "NORMAL",
        batch_max: int = 512,
        echo: bool = False,
    ) -> None:
        self.url = url
        self._synchronous = synchronous
        self._batch_max = batch_max
        self._echo = echo
        self.engine: AsyncEngine | None = None
        self._sync_engine: Engine | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._sqlite_path: str | None = None
        self._checkpointer: asyncio.Task[None] | None = None
        #: Checkpoint when writes pause this long, or when the WAL passes the size bound.
        self.checkpoint_interval_s = 0.25
        self.checkpoint_idle_s = 0.5
        self.checkpoint_wal_bytes = 64 * 1024 * 1024
        self._last_write = 0.0
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._pending = 0
        self.ids = IdGenerator()
        self._writer: asyncio.Task[None] | None = None
        self._known_users: dict[tuple[str, str], str] = {}
        self._known_chats: dict[tuple[str, str], tuple[str, str]] = {}
        self._insert: Callable[..., Any] = sa.insert

    # -- writes --------------------------------------------------------------------------------

    async def log_inbound(self, message: Message) -> bool:
        """Durably store an inbound message; ``False`` when it was already stored (a redelivery).

        Sets ``message.id`` when stored, leaves it ``None`` for a redelivery.
        """
        message.id = self.ids.next()
        stored = bool(await self._submit("in", message))
        if not stored:
            message.id = None
        return stored

    async def log_outbound(
        self, message: Message, replies: Sequence[Reply], latency_ms: float
    ) -> list[int]:
        """Store the bot's replies to ``message`` and wait until they are committed."""
        ids, fut = self._outbound(message, replies, latency_ms)
        if fut is not None:
            await fut
        return ids

    def log_outbound_nowait(
        self, message: Message, replies: Sequence[Reply], latency_ms: float
    ) -> list[int]:
        """Queue the replies for the next commit and return their ids at once.

        The bot's reply does not wait for its own log row: the inbound message is already
        durable, and the row follows within one group commit (a crash in that window loses the
        outbound row, never the user's message). Failures are logged by the writer.
        """
        return self._outbound(message, replies, latency_ms)[0]

    def _outbound(
        self, message: Message, replies: Sequence[Reply], latency_ms: float
    ) -> tuple[list[int], asyncio.Future[Any] | None]:
        now = utcnow()
        rows = []
        for r in replies:
            r.id = self.ids.next()
            rows.append(
                {
                    "id": r.id,
                    "direction": "out",
                    "platform": message.platform,
                    "chat_id": message.chat_id,
                    "user_id": None,
                    "platform_message_id": r.metadata.get("platform_message_id"),
                    "dedup_key": None,
                    "reply_to_id": message.id,
                    "text": r.text,
                    "original_length": None,
                    "kind": r.kind,
                    "skill": r.skill,
                    "latency_ms": latency_ms,
                    "model": r.model,
                    "adapter": r.adapter,
                    "adapter_version": r.adapter_version,
                    "meta": self.reply_meta(r),
                    "created_at": now,
                }
            )
        if not rows:
            return [], None
        return [int(cast(int, row["id"])) for row in rows], self._enqueue("out", rows)

    @staticmethod
    def reply_meta(r: Reply) -> dict[str, Any] | None:
        meta = dict(r.metadata)
        if r.sources:
            meta["sources"] = [
                {"title": s.title, "location": s.location, "score": s.score, "url": s.url}
                for s in r.sources
            ]
        if r.rateable:
            meta["rateable"] = True
        return meta or None

    async def update_metadata(
        self, message_id: int, meta: dict[str, Any], platform_message_id: str | None = None
    ) -> None:
        """Persist observer annotations, or a reply's delivery outcome, on a logged message."""
        await self._submit("meta", (message_id, meta, platform_message_id))

    def update_metadata_nowait(
        self, message_id: int, meta: dict[str, Any], platform_message_id: str | None = None
    ) -> None:
        """Like :meth:`update_metadata`, without waiting for the commit."""
        self._enqueue("meta", (message_id, meta, platform_message_id))

    async def find_by_platform_id(
        self, platform: str, chat_id: str, platform_message_id: str
    ) -> StoredMessage | None:
        """The logged message a platform id refers to (reactions and buttons point at these)."""
        m = schema.messages
        q = (
            sa.select(m)
            .where(
                m.c.platform == platform,
                m.c.chat_id == chat_id,
                m.c.platform_message_id == platform_message_id,
            )
            .order_by(m.c.id.desc())
            .limit(1)
        )
        async with (await self._reader()).connect() as conn:
            row = (await conn.execute(q)).first()
        return _row_to_message(row) if row else None

    async def add_feedback(
        self,
        message_id: int,
        platform: str,
        user_id: str,
        rating: int,
        *,
        correction: str | None = None,
        source: str = "user",
    ) -> int:
        if rating not in (-1, 0, 1):
            raise ValueError("rating must be -1, 0 or 1")

        def write(conn: Connection) -> int:
            exists = conn.scalar(
                sa.select(schema.messages.c.id).where(schema.messages.c.id == message_id)
            )
            if exists is None:
                raise LookupError(f"no message {message_id}")
            res = conn.execute(
                sa.insert(schema.feedback).returning(schema.feedback.c.id),
                {
                    "message_id": message_id,
                    "platform": platform,
                    "user_id": user_id,
                    "rating": rating,
                    "correction": correction,
                    "source": source,
                    "created_at": utcnow(),
                },
            )
            return int(res.scalar_one())

        return int(await self.run_in_writer(write))

    async def forget_user(self, platform: str, user_id: str) -> ForgetResult:
        """Delete a user's messages, the bot's replies to them and their feedback; record it.

        The record (platform and user id, no content) is what lets the trainers refuse any
        dataset row derived from this user that was exported before the request.
        """
        m, f = schema.messages, schema.feedback

        def write(conn: Connection) -> ForgetResult:
            own = sa.select(m.c.id).where(
                m.c.platform == platform, m.c.user_id == user_id, m.c.direction == "in"
            )
            replies = sa.select(m.c.id).where(m.c.reply_to_id.in_(own))
            fb = conn.execute(
                sa.delete(f).where(
                    sa.or_(
                        sa.and_(f.c.platform == platform, f.c.user_id == user_id),
                        f.c.message_id.in_(replies),
                    )
                )
            )
            out = conn.execute(sa.delete(m).where(m.c.id.in_(replies)))
            inn = conn.execute(sa.delete(m).where(m.c.platform == platform, m.c.user_id == user_id))
            conn.execute(
                sa.delete(schema.users).where(
                    schema.users.c.platform == platform,
                    schema.users.c.platform_user_id == user_id,
                )
            )
            self._known_users.pop((platform, user_id), None)
            result = ForgetResult(
                messages_deleted=(out.rowcount or 0) + (inn.rowcount or 0),
                feedback_deleted=fb.rowcount or 0,
                replies_deleted=out.rowcount or 0,
            )
            conn.execute(
                sa.insert(schema.forget_requests),
                {
                    "platform": platform,
                    "user_id": user_id,
                    "requested_at": utcnow(),
                    "messages_deleted": result.messages_deleted,
                    "feedback_deleted": result.feedback_deleted,
                },
            )
            return result

        return await self.run_in_writer(write)

    async def set_chat_settings(
        self, platform: str, chat_id: str, settings: dict[str, Any]
    ) -> None:
        c = schema.chats

        def write(conn: Connection) -> None:
            res = conn.execute(
                sa.update(c)
                .where(c.c.platform == platform, c.c.platform_chat_id == chat_id)
                .values(settings=settings)
            )
            if not res.rowcount:
                conn.execute(
                    sa.insert(c),
                    {
                        "platform": platform,
                        "platform_chat_id": chat_id,
                        "settings": settings,
                        "first_seen": utcnow(),
                    },
                )

        await self.run_in_writer(write)

    async def chat_settings(self) -> dict[tuple[str, str], dict[str, Any]]:
        c = schema.chats
        async with (await self._reader()).connect() as conn:
            rows = await conn.execute(
                sa.select(c.c.platform, c.c.platform_chat_id, c.c.settings).where(
                    c.c.settings.is_not(None)
                )
            )
            return {(r.platform, r.platform_chat_id): r.settings or {} for r in rows}

    async def last_turns(
        self,
        platform: str,
        chat_id: str,
        limit: int = 10,
        *,
        before_id: int | None = None,
        after_id: int | None = None,
    ) -> list[StoredMessage]:
        """The last ``limit`` messages of a chat (both directions), oldest first.

        ``after_id`` excludes everything up to and including that message (``/reset``).
        """
        m = schema.messages
        q = sa.select(m).where(m.c.platform == platform, m.c.chat_id == chat_id)
        if before_id is not None:
            q = q.where(m.c.id < before_id)
        if after_id is not None:
            q = q.where(m.c.id > after_id)
        q = q.order_by(m.c.id.desc()).limit(limit)
        async with (await self._reader()).connect() as conn:
            rows = (await conn.execute(q)).all()
        return [_row_to_message(r) for r in reversed(rows)]

    async def recent_replies(
        self, skill: str, limit: int, *, since: datetime | None = None
    ) -> list[StoredMessage]:
        """The last ``limit`` replies ``skill`` sent (since ``since``), oldest first.

        Read newest first along the primary key (ids are time-ordered), so a skill that replies
        often is found in a few pages; ``since`` bounds the scan for one that rarely does.
        """
        m = schema.messages
        q = sa.select(m).where(m.c.direction == "out", m.c.skill == skill)
        if since is not None:
            q = q.where(m.c.id >= IdGenerator.lower_bound(since))
        q = q.order_by(m.c.id.desc()).limit(limit)
        async with (await self._reader()).connect() as conn:
            rows = (await conn.execute(q)).all()
        return [_row_to_message(r) for r in reversed(rows)]

    async def feedback_for(self, message_id: int) -> list[FeedbackRow]:
        """Every rating and correction of one bot reply, oldest first."""
        f = schema.feedback
        q = sa.select(f).where(f.c.message_id == message_id).order_by(f.c.id)
        async with (await self._reader()).connect() as conn:
            rows = (await conn.execute(q)).all()
        return [_row_to_feedback(r) for r in rows]

    async def get_message(self, message_id: int) -> StoredMessage | None:
        m = schema.messages
        async with (await self._reader()).connect() as conn:
            row = (await conn.execute(sa.select(m).where(m.c.id == message_id))).first()
        return _row_to_message(row) if row else None

    async def messages(
        self, *, direction: str | None = None, platform: str | None = None
    ) -> list[StoredMessage]:
        m = schema.messages
        q = sa.select(m).order_by(m.c.id)
        if direction:
            q = q.where(m.c.direction == direction)
        if platform:
            q = q.where(m.c.platform == platform)
        async with (await self._reader()).connect() as conn:
            return [_row_to_message(r) for r in (await conn.execute(q)).all()]

    async def count_messages(self, direction: str | None = None) -> int:
        m = schema.messages
        q = sa.select(sa.func.count()).select_from(m)
        if direction:
            q = q.where(m.c.direction == direction)
        async with (await self._reader()).connect() as conn:
            return int(await conn.scalar(q) or 0)

    async def conversations(
        self, since: datetime, until: datetime | None = None
    ) -> list[Conversation]:
        """Chats with messages in ``[since, until)``, each with its messages and their feedback."""
        m, f = schema.messages, schema.feedback
        # Ids are time-ordered: the primary key finds the window; created_at makes it exact.
        q = sa.select(m).where(
            m.c.id >= IdGenerator.lower_bound(since - timedelta(seconds=5)),
            m.c.created_at >= since,
        )
        if until is not None:
            q = q.where(
                m.c.id < IdGenerator.lower_bound(until + timedelta(seconds=5)),
                m.c.created_at < until,
            )
        q = q.order_by(m.c.platform, m.c.chat_id, m.c.id)
        async with (await self._reader()).connect() as conn:
            rows = [_row_to_message(r) for r in (await conn.execute(q)).all()]
            ids = [row.id for row in rows]  # replies' ratings, and operators' labels on messages
            fb: dict[int, list[FeedbackRow]] = {}
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                found = (await conn.execute(sa.select(f).where(f.c.message_id.in_(chunk)))).all()
                for row in found:
                    fb.setdefault(row.message_id, []).append(_row_to_feedback(row))
        convs: dict[tuple[str, str], Conversation] = {}
        for r in rows:
            conv = convs.get((r.platform, r.chat_id))
            if conv is None:
                conv = convs[(r.platform, r.chat_id)] = Conversation(r.platform, r.chat_id, [], {})
            conv.messages.append(r)
            if r.id in fb:
                conv.feedback[r.id] = fb[r.id]
        return list(convs.values())

    async def forgotten_users(self) -> dict[tuple[str, str], datetime]:
        fr = schema.forget_requests
        async with (await self._reader()).connect() as conn:
            rows = (
                await conn.execute(sa.select(fr.c.platform, fr.c.user_id, fr.c.requested_at))
            ).all()
        return {(r.platform, r.user_id): _aware(r.requested_at) for r in rows}  # type: ignore[misc]
