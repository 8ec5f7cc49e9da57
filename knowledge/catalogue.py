"""The knowledge base's catalogue: the SQLite tables (files, chunks with their embeddings,
state), opening them, the version of the current FAISS index and loading it, the lock that
keeps one writer at a time, and what the catalogue reports (sources, stats).

A mixin of :class:`knowledge.base.KnowledgeBase`: the layer the ingest writes and the search
reads.
"""

from __future__ import annotations

import fcntl
import functools
import json
import logging
import threading
import time
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa

from knowledge import lexical
from knowledge.embedder import Embedder
from knowledge.index import IndexCorrupt, VectorIndex

log = logging.getLogger("knowledge.base")


_meta = sa.MetaData()
files_t = sa.Table(
    "files",
    _meta,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("source", sa.Text, nullable=False, unique=True),
    sa.Column("checksum", sa.String(64), nullable=False),
    sa.Column("size", sa.Integer, nullable=False),
    sa.Column("chunks", sa.Integer, nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)
chunks_t = sa.Table(
    "chunks",
    _meta,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("file_id", sa.Integer, nullable=False, index=True),
    sa.Column("source", sa.Text, nullable=False),
    sa.Column("position", sa.Integer, nullable=False),
    sa.Column("headings", sa.JSON, nullable=False),
    sa.Column("text", sa.Text, nullable=False),
    sa.Column("checksum", sa.String(64), nullable=False),
    sa.Column("meta", sa.JSON, nullable=True),
    sa.Column("embedding", sa.LargeBinary, nullable=False),
    # FAQ pairs get a second vector for the question alone: a user's question matches the
    # stored question far better than question+answer (hit@3 0.86 → 0.97 on the FAQ corpus).
    sa.Column("question_embedding", sa.LargeBinary, nullable=True),
)
state_t = sa.Table(
    "state",
    _meta,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)


class KnowledgeError(Exception):
    """Something about the knowledge base needs the operator; the message says what."""


MIGRATIONS = Path(__file__).with_name("migrations")


@functools.cache
def _head() -> str | None:
    from bot.store.migrate import head_revision

    return head_revision(MIGRATIONS)


def _migrate(engine: sa.Engine, lock: Path) -> None:
    """Bring the catalogue to the schema this code reads (Alembic, knowledge/migrations/):
    a new one is created, an older one upgraded in place, one from a newer chinwag refused.
    Under the write lock, so two processes opening one catalogue migrate it once."""
    from alembic.runtime.migration import MigrationContext
    from alembic.util import CommandError

    from bot.store.migrate import upgrade_sync

    with engine.connect() as conn:
        current = MigrationContext.configure(conn).get_current_revision()
    if current == _head():
        return  # every open but the first: one query
    with lock.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            with engine.begin() as conn:
                current = MigrationContext.configure(conn).get_current_revision()
                if current == _head():
                    return
                try:
                    upgrade_sync(conn, location=MIGRATIONS)
                except CommandError as exc:  # an unknown revision: written by a newer chinwag
                    raise KnowledgeError(
                        f"{engine.url.database}: cannot migrate the catalogue from revision "
                        f"{current!r} ({exc}); was it written by a newer chinwag?"
                    ) from None
            log.info("knowledge: catalogue schema %s → %s", current or "none", _head())
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _json(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False)


class KnowledgeState:
    """What :class:`~knowledge.base.KnowledgeBase` sets in ``__init__`` and its catalogue,
    ingest and search layers all use: declared once, for type checkers."""

    directory: Path
    embedder: Embedder
    retrieval: str
    lexical_weight: float
    candidates: int
    embed_headings: bool
    links: list[tuple[str, str]]
    commit_chunks: int
    max_file_bytes: int
    faq_question_vectors: bool
    chunk_tokens: int
    overlap: int
    ivf_threshold: int
    nprobe: int
    min_score: float
    _engine: sa.Engine | None
    _index: VectorIndex | None
    _version: int
    _chunk_count: tuple[int, int]
    _checked: float
    _write_lock: threading.Lock
    _read_lock: threading.Lock
    _open_lock: threading.Lock
    _pending_version: tuple[int, str]
    _ready: bool


class Catalogue(KnowledgeState):
    @property
    def engine(self) -> sa.Engine:
        if self._engine is None:
            with self._open_lock:
                self._open_catalogue()
        assert self._engine is not None
        return self._engine

    def open(self) -> Any:  # the KnowledgeBase itself, for chaining
        """Open the catalogue and load the current index (a corrupt one raises, with a hint)."""
        if self._ready:
            return self
        # Searches arrive from many threads at once: without the lock a second thread saw the
        # catalogue open but the index not yet loaded, and answered "nothing relevant".
        with self._open_lock:
            if not self._ready:
                self._open_catalogue()
                self._ensure_lexical()
                self._load_current()
                self._ready = True
        return self

    def _open_catalogue(self) -> None:
        """The SQLite catalogue alone: enough to rebuild a broken index."""
        if self._engine is not None:
            return
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise KnowledgeError(f"cannot create {self.directory}: {exc.strerror or exc}") from None
        engine = sa.create_engine(f"sqlite:///{self.directory / 'catalogue.sqlite3'}")

        @sa.event.listens_for(engine, "connect")
        def _pragmas(conn: Any, _record: Any) -> None:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=30000")

        _migrate(engine, self.directory / ".write.lock")
        self._engine = engine

    def _ensure_lexical(self) -> None:
        """Fill the BM25 table once for a catalogue written before it existed."""
        with self.engine.connect() as conn:
            if self._state(conn).get("lexical") == "1":
                return
        with (self.directory / ".write.lock").open("a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)  # another process may be doing the same
            try:
                with self.engine.begin() as conn:
                    if self._state(conn).get("lexical") == "1":
                        return
                    count = lexical.rebuild(conn, chunks_t)
                    conn.execute(sa.delete(state_t).where(state_t.c.key == "lexical"))
                    conn.execute(sa.insert(state_t), {"key": "lexical", "value": "1"})
                if count:
                    log.info("knowledge: indexed %d existing chunks for keyword search", count)
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def close(self) -> None:
        with self._open_lock:
            self._ready = False
            if self._engine is not None:
                self._engine.dispose()
                self._engine = None

    def _state(self, conn: sa.Connection) -> dict[str, str]:
        return {k: v for k, v in conn.execute(sa.select(state_t.c.key, state_t.c.value)).all()}

    def _load_current(self) -> None:
        with self.engine.connect() as conn:
            state = self._state(conn)
        version = int(state.get("version", "0"))
        if version == 0:
            self._index, self._version = None, 0
            return
        path = self.directory / state["index_file"]
        try:
            index = VectorIndex.load(path, sha256=state.get("index_sha256"), nprobe=self.nprobe)
        except IndexCorrupt as exc:
            raise KnowledgeError(
                f"{exc}. Run `chinwag knowledge rebuild` to recreate it from the catalogue."
            ) from None
        if index.info.count != int(state.get("count", index.info.count)):
            raise KnowledgeError(
                f"index file {path} holds {index.info.count} vectors but the catalogue has "
                f"{state.get('count')}. Run `chinwag knowledge rebuild`."
            )
        self._index, self._version = index, version
        self._checked = time.monotonic()

    def _maybe_reload(self) -> None:
        """Pick up an ingest committed by another process (checked at most once a second)."""
        now = time.monotonic()
        if now - self._checked < 1.0:
            return
        self._checked = now
        with self.engine.connect() as conn:
            version = conn.scalar(sa.select(state_t.c.value).where(state_t.c.key == "version"))
        if version is not None and int(version) != self._version:
            with self._read_lock:
                self._load_current()

    @contextmanager
    def _exclusive(self):
        """One writer at a time, across threads and processes."""
        with self._write_lock:
            lock_path = self.directory / ".write.lock"
            with lock_path.open("a") as fh:
                fcntl.flock(fh, fcntl.LOCK_EX)
                try:
                    self._load_current()  # another process may have written meanwhile
                    yield
                finally:
                    fcntl.flock(fh, fcntl.LOCK_UN)

    def _build_from_catalogue(self, conn: sa.Connection, dim: int) -> VectorIndex:
        query = sa.select(chunks_t.c.id, chunks_t.c.embedding, chunks_t.c.question_embedding)
        ids_list: list[int] = []
        blobs: list[bytes] = []
        for r in conn.execute(query.order_by(chunks_t.c.id)):
            ids_list.append(r.id * 2)
            blobs.append(r.embedding)
            if r.question_embedding is not None:
                ids_list.append(r.id * 2 + 1)
                blobs.append(r.question_embedding)
        ids = np.array(ids_list, dtype=np.int64)
        vectors = (
            np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(len(blobs), dim)
            if blobs
            else np.zeros((0, dim), dtype=np.float32)
        )
        return VectorIndex.build(
            ids, vectors, dim=dim, ivf_threshold=self.ivf_threshold, nprobe=self.nprobe
        )

    def _write_state(
        self,
        conn: sa.Connection,
        index: VectorIndex,
        *,
        next_id: int | None = None,
        dim: int,
        embedded: str | None = None,
    ) -> None:
        """Save the index under the next version, then record it in this transaction.

        ``embedded``: the new vectors were computed from ``"headings"`` + text or ``"text"``
        alone (``"all"``: every vector was recomputed). Vectors of both kinds in one index
        rank inconsistently, so that state is recorded as ``mixed`` and logged with the fix.
        """
        state = self._state(conn)
        version = int(state.get("version", "0")) + 1
        name = f"index-{version}.faiss"
        sha = index.save(self.directory / name)
        info = index.info
        values = {
            "version": str(version),
            "index_file": name,
            "index_sha256": sha,
            "count": str(info.count),
            "kind": info.kind,
            "dim": str(dim),
            "model": self.embedder.model_name,
            "built_at": datetime.now(UTC).isoformat(),
        }
        if next_id is not None:
            values["next_chunk_id"] = str(next_id)
        form = "headings" if self.embed_headings else "text"
        before = state.get("embedding_text", "text" if int(state.get("count", "0")) else form)
        if embedded == "all" or info.count == 0 or (embedded is not None and before == form):
            values["embedding_text"] = form
        elif embedded is not None and before != form:
            values["embedding_text"] = "mixed"
            log.warning(
                "knowledge: new chunks are embedded from %s but the index holds vectors "
                "embedded from %s; run `chinwag knowledge rebuild --reembed` for one kind",
                "headings and text" if form == "headings" else "text alone",
                "text alone" if before == "text" else "both kinds",
            )
        if info.kind == "ivf" and (state.get("kind") != "ivf"):
            values["switched_to_ivf_at"] = values["built_at"]
        for key, value in values.items():
            conn.execute(sa.delete(state_t).where(state_t.c.key == key))
            conn.execute(sa.insert(state_t), {"key": key, "value": value})
        self._pending_version = (version, name)

    def sources(self) -> list[dict[str, Any]]:
        self.open()
        with self.engine.connect() as conn:
            return [
                {
                    "source": r.source,
                    "chunks": r.chunks,
                    "size": r.size,
                    "checksum": r.checksum,
                    "updated_at": r.updated_at.isoformat(),
                }
                for r in conn.execute(sa.select(files_t).order_by(files_t.c.source))
            ]

    def stats(self) -> dict[str, Any]:
        self.open()
        with self.engine.connect() as conn:
            state = self._state(conn)
            n_files = conn.scalar(sa.select(sa.func.count()).select_from(files_t)) or 0
            n_chunks = conn.scalar(sa.select(sa.func.count()).select_from(chunks_t)) or 0
        info = self._index.info if self._index is not None else None
        index_file = self.directory / state["index_file"] if "index_file" in state else None
        return {
            "directory": str(self.directory),
            "files": n_files,
            "chunks": n_chunks,
            "vectors": info.count if info else 0,
            "index_kind": info.kind if info else "none",
            "nlist": info.nlist if info else None,
            "nprobe": info.nprobe if info else None,
            "ivf_threshold": self.ivf_threshold,
            "dim": int(state["dim"]) if "dim" in state else None,
            "model": state.get("model", self.embedder.model_name),
            "version": int(state.get("version", "0")),
            "index_bytes": index_file.stat().st_size if index_file and index_file.exists() else 0,
            "built_at": state.get("built_at"),
            "switched_to_ivf_at": state.get("switched_to_ivf_at"),
            "embedding_text": state.get("embedding_text", "text" if n_chunks else None),
            "retrieval": self.retrieval,
        }
