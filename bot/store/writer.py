"""The store's writer: one task that commits writes in groups ("group commit").

Whatever arrived while the previous transaction was committing goes into the next one. Each
caller still awaits its own commit, so ``log_inbound`` returns only once the row is durable —
that is what lets the core promise "logged before processed" — yet a burst from hundreds of
chats costs a handful of transactions instead of hundreds. A batch that fails is retried one
operation at a time so a single bad row fails only its own caller.

A mixin of :class:`bot.store.store.ConversationStore`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from bot.messages import Message, utcnow
from bot.store import schema
from bot.store.engine import StoreState
from bot.store.rows import (
    StoreError,
    _sqlite_insert_messages,
)

log = logging.getLogger("bot.store")


@dataclass(slots=True)
class _Op:
    kind: str  # "in" | "out" | "meta" | "fn"
    payload: Any
    future: asyncio.Future[Any]


_STOP = object()


class GroupCommitWriter(StoreState):
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

    async def _stop_writer(self) -> None:
        """Commit everything queued, then end the writer task."""
        if self._writer is not None:
            await self._queue.put(_STOP)
            await self._writer
            self._writer = None

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

    async def run_in_writer(self, fn: Callable[[Connection], Any]) -> Any:
        """Run ``fn(conn)`` — synchronous, on a SQLAlchemy ``Connection`` — in the writer's
        transaction order, after every write submitted before it."""
        return await self._submit("fn", fn)
