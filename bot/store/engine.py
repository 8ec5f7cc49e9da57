"""The store's engine: opening the database (SQLite tuned for many small durable writes, or
PostgreSQL by URL), migrating it, WAL checkpoints, and closing.

A mixin of :class:`bot.store.store.ConversationStore`; split out because how the database is
opened and kept healthy is a different concern from what is written and read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from bot.store.ids import IdGenerator
from bot.store.migrate import current_revision, head_revision, upgrade_sync
from bot.store.rows import (
    StoreError,
    _dumps,
)

log = logging.getLogger("bot.store")


#: How long the WAL checkpoint at close waits for other readers before leaving the WAL as it is.
FINAL_CHECKPOINT_S = 1.0


class StoreState:
    """What :class:`~bot.store.store.ConversationStore` sets in ``__init__`` and both its halves
    (the engine here, the writer in writer.py) use: declared once, for type checkers."""

    url: str
    _synchronous: str
    _batch_max: int
    _echo: bool
    engine: AsyncEngine | None
    _sync_engine: Engine | None
    _executor: ThreadPoolExecutor | None
    _sqlite_path: str | None
    _checkpointer: asyncio.Task[None] | None
    checkpoint_interval_s: float
    checkpoint_idle_s: float
    checkpoint_wal_bytes: int
    _last_write: float
    _queue: asyncio.Queue[Any]
    _pending: int
    ids: IdGenerator
    _writer: asyncio.Task[None] | None
    _known_users: dict[tuple[str, str], str]
    _known_chats: dict[tuple[str, str], tuple[str, str]]
    _insert: Callable[..., Any]


class StoreEngine(StoreState):
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

        def checkpoint(mode: str, wait_s: float | None = None) -> None:
            nonlocal conn
            if conn is None:
                conn = sqlite3.connect(self._sqlite_path or "", timeout=30, check_same_thread=False)
            if wait_s is not None:  # PASSIVE never waits; only the last one needs its own bound
                conn.execute(f"PRAGMA busy_timeout = {int(wait_s * 1000)}")
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
            # The last checkpoint empties the WAL so a stopped bot leaves one file. A TRUNCATE
            # waits for every reader to finish, and with SQLite's busy timeout a reader in
            # another process (a backup, a trainer, `sqlite3` in a terminal) held the stop for
            # 30 s. It is tidiness, not durability — the WAL is part of the database — so it
            # waits a second at most.
            try:
                await loop.run_in_executor(executor, checkpoint, "TRUNCATE", FINAL_CHECKPOINT_S)
            except Exception:
                log.debug("final WAL checkpoint skipped", exc_info=True)
            raise
        finally:
            if conn is not None:
                await loop.run_in_executor(executor, conn.close)
            executor.shutdown(wait=True)

    async def close(self) -> None:
        """Flush every pending write, then close the connections."""
        await self._stop_writer()
        await self._dispose()  # first: the last checkpoint need not wait for our own readers
        if self._checkpointer is not None:
            self._checkpointer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checkpointer
            self._checkpointer = None

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

    def _engine(self) -> AsyncEngine:
        if self.engine is None:
            raise StoreError("the store is not open")
        return self.engine

    async def _reader(self) -> AsyncEngine:
        """The engine for a read, once this process's queued writes are visible to it."""
        await self.flush()
        return self._engine()

    if TYPE_CHECKING:  # the writer's (GroupCommitWriter), which the engine starts and stops

        async def _run_writer(self) -> None: ...

        async def _stop_writer(self) -> None: ...

        async def flush(self) -> None: ...
