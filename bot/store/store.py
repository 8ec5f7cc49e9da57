"""The conversation store: every inbound and outbound message, feedback and privacy requests.

Writes go through one writer task that commits in groups ("group commit"): whatever arrived
while the previous transaction was committing goes into the next one. Each caller still awaits
its own commit, so ``log_inbound`` returns only once the row is durable — that is what lets the
core promise "logged before processed" — yet a burst from hundreds of chats costs a handful of
transactions instead of hundreds. A batch that fails is retried one operation at a time so a
single bad row fails only its own caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from bot.messages import Message, Reply, utcnow
from bot.store import schema
from bot.store.ids import IdGenerator
from bot.store.migrate import current_revision, head_revision, upgrade_sync

log = logging.getLogger(__name__)


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


@dataclass(slots=True)
class _Op:
    kind: str  # "in" | "out" | "meta" | "fn"
    payload: Any
    future: asyncio.Future[Any]


_STOP = object()


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


class ConversationStore:
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

    # -- lifecycle -----------------------------------------------------------------------------

    @property
    def dialect(self) -> str:
        return make_url(self.url).get_backend_name()

    def _preflight(self) -> None:
        """Turn the usual SQLite start-up failures into messages an operator can act on."""
        url = make_url(self.url)
        if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
            return
        if url.database.startswith("file:"):
            return
        path = Path(url.database)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(
                f"cannot create the database directory {path.parent}: {exc.strerror or exc}. "
                "Set data_dir (or CHINWAG_DATA_DIR) to a writable directory."
            ) from None
        if path.exists() and not os.access(path, os.W_OK):
            raise StoreError(
                f"the database file {path} is read-only; chinwag must write every message. "
                "Fix its permissions or point database.url elsewhere."
            )
        if not os.access(path.parent, os.W_OK):
            raise StoreError(
                f"the database directory {path.parent} is not writable (SQLite needs to create "
                "journal files beside the database)."
            )

    async def open(self, *, migrate: bool = True) -> None:
        self._preflight()
        backend = self.dialect
        kwargs: dict[str, Any] = {"echo": self._echo, "json_serializer": _dumps}
        if backend == "sqlite":
            from sqlalchemy.dialects.sqlite import insert as sqlite_insert

            self._insert = sqlite_insert
            kwargs["connect_args"] = {"timeout": 30}
        elif backend == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as pg_insert

            self._insert = pg_insert
            kwargs["pool_pre_ping"] = True
        try:
            self.engine = create_async_engine(self.url, **kwargs)
        except Exception as exc:
            raise StoreError(f"cannot use database URL {self._safe_url()}: {exc}") from None
        if backend == "sqlite":
            synchronous = self._synchronous

            def _pragmas(dbapi_conn: Any, _record: Any) -> None:
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute(f"PRAGMA synchronous={synchronous}")
                cur.execute("PRAGMA foreign_keys=ON")
                cur.execute("PRAGMA busy_timeout=30000")
                # Checkpoints run in their own thread (see _checkpoint_loop) so they never stall
                # a commit; this bound is only the backstop if that thread falls behind.
                cur.execute("PRAGMA wal_autocheckpoint=32768")
                cur.close()

            event.listen(self.engine.sync_engine, "connect", _pragmas)
            # The writer's own synchronous engine (see _transaction).
            self._sync_engine = sa.create_engine(
                make_url(self.url).set(drivername="sqlite"),
                echo=self._echo,
                json_serializer=_dumps,
                connect_args={"timeout": 30, "check_same_thread": False},
                poolclass=sa.pool.StaticPool,
            )
            event.listen(self._sync_engine, "connect", _pragmas)
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="chinwag-store-writer")
            self._sqlite_path = make_url(self.url).database

        try:
            async with self.engine.begin() as conn:
                if migrate:
                    await conn.run_sync(upgrade_sync)
                else:
                    current = await conn.run_sync(current_revision)
                    if current != head_revision():
                        raise StoreError(
                            f"the database schema is at {current or 'nothing'}, this chinwag "
                            f"needs {head_revision()}: run `chinwag db upgrade`."
                        )
            if self._sync_engine is not None:
                # Migrations at head write nothing, so prove the writer can write.
                await asyncio.get_running_loop().run_in_executor(self._executor, self._probe_write)
        except StoreError:
            await self._dispose()
            raise
        except Exception as exc:
            await self._dispose()
            text = str(exc)
            if "readonly" in text or "read-only" in text:
                raise StoreError(
                    f"the database {self._safe_url()} is read-only; chinwag must write every "
                    "message. Fix its permissions or point database.url elsewhere."
                ) from None
            raise StoreError(f"cannot open the database {self._safe_url()}: {text}") from None
        self._writer = asyncio.create_task(self._run_writer(), name="chinwag-store-writer")
        if self._sync_engine is not None and self._sqlite_path not in (None, "", ":memory:"):
            self._checkpointer = asyncio.create_task(
                self._checkpoint_loop(), name="chinwag-store-checkpoint"
            )

    def _probe_write(self) -> None:
        assert self._sync_engine is not None
        with self._sync_engine.connect() as conn:
            dbapi = conn.connection.driver_connection
            version = dbapi.execute("PRAGMA user_version").fetchone()[0]  # type: ignore[union-attr]
            dbapi.execute("BEGIN IMMEDIATE")  # type: ignore[union-attr]
            try:
                dbapi.execute(f"PRAGMA user_version = {int(version)}")  # type: ignore[union-attr]
            finally:
                dbapi.execute("ROLLBACK")  # type: ignore[union-attr]

    async def _checkpoint_loop(self) -> None:
        """Copy the WAL back into the database file in the background, once a second.

        SQLite's automatic checkpoint runs inside whichever commit crosses the threshold and
        stalls it for milliseconds — the biggest source of tail latency in the router
        benchmark. A PASSIVE checkpoint from another connection runs beside the writer instead.
        """
        import sqlite3

        loop = asyncio.get_running_loop()
        executor = ThreadPoolExecutor(1, thread_name_prefix="chinwag-store-checkpoint")
        conn: sqlite3.Connection | None = None

        def checkpoint(mode: str) -> None:
            nonlocal conn
            if conn is None:
                conn = sqlite3.connect(self._sqlite_path or "", timeout=30, check_same_thread=False)
            conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchall()

        try:
            wal = Path(f"{self._sqlite_path}-wal")
            while True:
                await asyncio.sleep(self.checkpoint_interval_s)
                try:
                    size = wal.stat().st_size  # noqa: ASYNC240 - one stat, microseconds
                except OSError:
                    continue
                idle = time.monotonic() - self._last_write >= self.checkpoint_idle_s
                if size and (idle or size >= self.checkpoint_wal_bytes):
                    try:
                        await loop.run_in_executor(executor, checkpoint, "PASSIVE")
                    except Exception:
                        log.warning("background WAL checkpoint failed", exc_info=True)
        except asyncio.CancelledError:
            try:
                await loop.run_in_executor(executor, checkpoint, "TRUNCATE")
            except Exception:
                log.debug("final WAL checkpoint skipped", exc_info=True)
            raise
        finally:
            if conn is not None:
                await loop.run_in_executor(executor, conn.close)
            executor.shutdown(wait=True)

    async def close(self) -> None:
        """Flush every pending write, then close the connections."""
        if self._writer is not None:
            await self._queue.put(_STOP)
            await self._writer
            self._writer = None
        if self._checkpointer is not None:
            self._checkpointer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checkpointer
            self._checkpointer = None
        await self._dispose()

    async def _dispose(self) -> None:
        if self._sync_engine is not None:
            self._sync_engine.dispose()
            self._sync_engine = None
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        if self.engine is not None:
            await self.engine.dispose()
            self.engine = None

    def _safe_url(self) -> str:
        try:
            return make_url(self.url).render_as_string(hide_password=True)
        except Exception:
            return "<unparseable URL>"

    # -- the writer ----------------------------------------------------------------------------

    def _enqueue(self, kind: str, payload: Any) -> asyncio.Future[Any]:
        if self._writer is None:
            raise StoreError("the store is not open")
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending += 1
        fut.add_done_callback(self._op_done)
        self._queue.put_nowait(_Op(kind, payload, fut))
        return fut

    def _op_done(self, fut: asyncio.Future[Any]) -> None:
        self._pending -= 1
        # Retrieve the exception so fire-and-forget writes never warn "never retrieved";
        # the writer has already logged it.
        if not fut.cancelled():
            fut.exception()

    async def _submit(self, kind: str, payload: Any) -> Any:
        return await self._enqueue(kind, payload)

    async def flush(self) -> None:
        """Wait until every write queued so far is committed."""
        if self._writer is not None and self._pending:
            await self._submit("fn", lambda conn: None)

    async def _run_writer(self) -> None:
        stopping = False
        while not stopping:
            first = await self._queue.get()
            if first is _STOP:
                break
            batch = [first]
            while len(batch) < self._batch_max:
                try:
                    nxt = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    break
                if nxt is _STOP:
                    stopping = True
                    break
                batch.append(nxt)
            await self._write_batch(batch)

    async def _write_batch(self, batch: list[_Op]) -> None:
        try:
            results = await self._transaction(batch)
        except Exception as exc:
            if len(batch) == 1:
                op = batch[0]
                if op.kind == "fn" and not isinstance(exc, sa.exc.SQLAlchemyError):
                    # The caller's own logic refused (e.g. LookupError): hand it back as is.
                    if not op.future.done():
                        op.future.set_exception(exc)
                    return
                log.exception("store write failed (%s)", op.kind)
                if not op.future.done():
                    op.future.set_exception(
                        StoreError(f"could not write to the conversation store: {exc}")
                    )
                return
            log.warning("store batch of %d failed; retrying one by one", len(batch), exc_info=True)
            for op in batch:
                await self._write_batch([op])
            return
        for op, result in zip(batch, results, strict=True):
            if not op.future.done():
                op.future.set_result(result)

    async def _transaction(self, batch: list[_Op]) -> list[Any]:
        """Apply a batch in one transaction.

        SQLite: on a plain (sync) connection in the writer's own thread — one thread hop per
        batch instead of one per statement, which is what aiosqlite would cost. Other databases:
        the same code on the async engine through ``run_sync``.
        """
        if self._sync_engine is not None:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._executor, self._transaction_sync, batch)
        assert self.engine is not None
        async with self.engine.begin() as conn:
            return await conn.run_sync(self._apply, batch)

    def _transaction_sync(self, batch: list[_Op]) -> list[Any]:
        assert self._sync_engine is not None
        self._last_write = time.monotonic()
        with self._sync_engine.begin() as conn:
            return self._apply(conn, batch)

    def _apply(self, conn: Connection, batch: list[_Op]) -> list[Any]:
        results: list[Any] = [None] * len(batch)
        inbound = [(i, op.payload) for i, op in enumerate(batch) if op.kind == "in"]
        if inbound:
            for i, res in zip(
                (i for i, _ in inbound),
                self._insert_inbound(conn, [m for _, m in inbound]),
                strict=True,
            ):
                results[i] = res
        outbound = [row for op in batch if op.kind == "out" for row in op.payload]
        if outbound:
            self._insert_rows(conn, outbound)
        metas = [op.payload for op in batch if op.kind == "meta"]
        plain = [{"_id": mid, "_meta": meta} for mid, meta, pmid in metas if pmid is None]
        sent = [
            {"_id": mid, "_meta": meta, "_pmid": pmid}
            for mid, meta, pmid in metas
            if pmid is not None
        ]
        m = schema.messages
        if plain:
            conn.execute(
                sa.update(m)
                .where(m.c.id == sa.bindparam("_id"))
                .values(meta=sa.bindparam("_meta")),
                plain,
            )
        if sent:
            conn.execute(
                sa.update(m)
                .where(m.c.id == sa.bindparam("_id"))
                .values(meta=sa.bindparam("_meta"), platform_message_id=sa.bindparam("_pmid")),
                sent,
            )
        for i, op in enumerate(batch):
            if op.kind == "fn":
                results[i] = op.payload(conn)
        return results

    def _insert_rows(
        self, conn: Connection, rows: list[dict[str, Any]], *, skip_duplicates: bool = False
    ) -> set[int]:
        """Insert message rows (ids already assigned); returns the ids actually inserted."""
        if not rows:
            return set()
        if self._sync_engine is not None:
            return _sqlite_insert_messages(conn, rows, skip_duplicates=skip_duplicates)
        stmt = self._insert(schema.messages)
        if skip_duplicates and hasattr(stmt, "on_conflict_do_nothing"):
            stmt = stmt.on_conflict_do_nothing(index_elements=["dedup_key"])
            return set(conn.execute(stmt.returning(schema.messages.c.id), rows).scalars())
        conn.execute(stmt, rows)
        return {row["id"] for row in rows}

    def _existing_keys(self, conn: Connection, keys: list[str]) -> set[str]:
        existing: set[str] = set()
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            if self._sync_engine is not None:
                marks = ",".join("?" * len(chunk))
                cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
                try:
                    cursor.execute(
                        f"SELECT dedup_key FROM messages WHERE dedup_key IN ({marks})", chunk
                    )
                    existing.update(row[0] for row in cursor.fetchall())
                finally:
                    cursor.close()
                continue
            else:
                res = conn.execute(
                    sa.select(schema.messages.c.dedup_key).where(
                        schema.messages.c.dedup_key.in_(chunk)
                    )
                )
            existing.update(res.scalars().all())
        return existing

    def _insert_inbound(self, conn: Connection, msgs: list[Message]) -> list[bool]:
        self._upsert_people(conn, msgs)
        if self._sync_engine is None and not hasattr(
            self._insert(schema.messages), "on_conflict_do_nothing"
        ):
            # Databases without ON CONFLICT: look the keys up first (single writer per batch).
            keys = [m.dedup_key for m in msgs if m.dedup_key is not None]
            existing = self._existing_keys(conn, keys) if keys else set()
            fresh = []
            for m in msgs:
                if m.dedup_key is None or m.dedup_key not in existing:
                    fresh.append(m)
                    if m.dedup_key is not None:
                        existing.add(m.dedup_key)
            inserted = self._insert_rows(conn, [self._inbound_row(m) for m in fresh])
        else:
            rows = [self._inbound_row(m) for m in msgs]
            inserted = self._insert_rows(conn, rows, skip_duplicates=True)
        return [m.id in inserted for m in msgs]

    @staticmethod
    def _inbound_row(m: Message) -> dict[str, Any]:
        meta = m.metadata or None
        return {
            "id": m.id,
            "direction": "in",
            "platform": m.platform,
            "chat_id": m.chat_id,
            "user_id": m.user_id,
            "platform_message_id": m.message_id,
            "dedup_key": m.dedup_key,
            "reply_to_id": None,
            "text": m.text,
            "original_length": (meta or {}).get("original_length"),
            "kind": "edited" if m.edited else None,
            "skill": None,
            "latency_ms": None,
            "model": None,
            "adapter": None,
            "adapter_version": None,
            "meta": meta,
            "created_at": m.received_at,
        }

    def _upsert_people(self, conn: Connection, msgs: list[Message]) -> None:
        now = utcnow()
        users: dict[tuple[str, str], dict[str, Any]] = {}
        chats: dict[tuple[str, str], dict[str, Any]] = {}
        for m in msgs:
            ukey = (m.platform, m.user_id)
            if self._known_users.get(ukey) != m.user_name:
                users[ukey] = {
                    "platform": m.platform,
                    "platform_user_id": m.user_id,
                    "display_name": m.user_name[:256],
                    "first_seen": now,
                }
            ckey = (m.platform, m.chat_id)
            if self._known_chats.get(ckey) != (m.chat_kind, m.chat_title):
                chats[ckey] = {
                    "platform": m.platform,
                    "platform_chat_id": m.chat_id,
                    "kind": m.chat_kind,
                    "title": m.chat_title[:256],
                    "first_seen": now,
                }
        if users:
            stmt = self._insert(schema.users)
            if hasattr(stmt, "on_conflict_do_update"):
                stmt = stmt.on_conflict_do_update(
                    index_elements=["platform", "platform_user_id"],
                    set_={"display_name": stmt.excluded.display_name},
                )
            conn.execute(stmt, list(users.values()))
        if chats:
            stmt = self._insert(schema.chats)
            if hasattr(stmt, "on_conflict_do_update"):
                stmt = stmt.on_conflict_do_update(
                    index_elements=["platform", "platform_chat_id"],
                    set_={"kind": stmt.excluded.kind, "title": stmt.excluded.title},
                )
            conn.execute(stmt, list(chats.values()))
        if len(self._known_users) > 200_000:
            self._known_users.clear()
        if len(self._known_chats) > 200_000:
            self._known_chats.clear()
        for (platform, uid), row in users.items():
            self._known_users[(platform, uid)] = row["display_name"]
        for key, row in chats.items():
            self._known_chats[key] = (row["kind"], row["title"])

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

    async def run_in_writer(self, fn: Callable[[Connection], Any]) -> Any:
        """Run ``fn(conn)`` — synchronous, on a SQLAlchemy ``Connection`` — in the writer's
        transaction order, after every write submitted before it."""
        return await self._submit("fn", fn)

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

    # -- reads ---------------------------------------------------------------------------------

    def _engine(self) -> AsyncEngine:
        if self.engine is None:
            raise StoreError("the store is not open")
        return self.engine

    async def _reader(self) -> AsyncEngine:
        """The engine for a read, once this process's queued writes are visible to it."""
        await self.flush()
        return self._engine()

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
