"""The knowledge base: files → chunks → embeddings → FAISS, with a SQLite catalogue.

Vector ids are ``chunk_id * 2`` for a chunk's text and ``chunk_id * 2 + 1`` for an FAQ pair's
question; a search keeps each chunk's best score.

Layout of the knowledge directory (``<data_dir>/knowledge`` by default)::

    catalogue.sqlite3   files, chunks (text, heading trail, position, checksum, embedding), state
    index-<n>.faiss     the vector index of version n; the catalogue names the current one

Crash safety comes from ordering: an ingest writes the new index file under a new version
number first (atomically), then commits the catalogue rows and the new version in one SQLite
transaction, and only then deletes the old file. A crash at any point leaves the catalogue
pointing at a complete index file. Embeddings are kept in the catalogue, so ``rebuild``
recreates any index without re-running the model.

Searches never take the writer's lock: they use whichever index object is current, and an ingest
swaps in the new one when it commits. Another process's ingest is noticed by the version number
(checked at most once a second) and loaded.
"""

from __future__ import annotations

import fcntl
import fnmatch
import glob
import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa

from knowledge import lexical
from knowledge.chunking import Chunk, Chunker
from knowledge.embedder import DEFAULT_MODEL, Embedder
from knowledge.index import IndexCorrupt, VectorIndex
from knowledge.loaders import SkipFile, load

log = logging.getLogger(__name__)

_PAGE = re.compile(r"page \d+", re.IGNORECASE)

Progress = Callable[[str, int, int], None]

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


def _batches(
    pending: list[tuple[Path, str, int, list[Chunk]]], chunks_per_batch: int
) -> list[list[tuple[Path, str, int, list[Chunk]]]]:
    """Whole files grouped until a group holds ``chunks_per_batch`` chunks."""
    out: list[list[tuple[Path, str, int, list[Chunk]]]] = []
    size = chunks_per_batch
    for item in pending:
        if size >= chunks_per_batch:
            out.append([])
            size = 0
        out[-1].append(item)
        size += len(item[3])
    return out


class KnowledgeError(Exception):
    """Something about the knowledge base needs the operator; the message says what."""


@dataclass(slots=True)
class Passage:
    chunk_id: int
    text: str
    score: float
    source: str
    headings: list[str]
    position: int
    meta: dict[str, Any] = field(default_factory=dict)
    #: Where the section is published (``knowledge.links``), with its anchor; else None.
    url: str | None = None

    @property
    def title(self) -> str:
        return " › ".join(h for h in self.headings if h) or Path(self.source).name

    @property
    def where(self) -> str:
        """The source as a reader can find it: "deploying/gunicorn.rst.txt", not "gunicorn.rst.txt".

        Sphinx sources are named from their ``_sources`` folder (the site's layout); other
        files with their folder.
        """
        parts = Path(self.source).parts
        if "_sources" in parts:
            return "/".join(parts[len(parts) - parts[::-1].index("_sources") :])
        return "/".join(parts[-2:])


@dataclass(slots=True)
class IngestSummary:
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    chunks_added: int = 0
    chunks_removed: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "added": self.added,
            "updated": self.updated,
            "unchanged": self.unchanged,
            "removed": self.removed,
            "failed": [{"path": p, "reason": r} for p, r in self.failed],
            "chunks_added": self.chunks_added,
            "chunks_removed": self.chunks_removed,
            "seconds": round(self.seconds, 3),
        }


def file_checksum(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def expand(paths: Iterable[str | Path]) -> tuple[list[Path], list[Path], list[tuple[str, str]]]:
    """Files named by ``paths`` (files, folders recursively, globs); the folders; the misses."""
    files: list[Path] = []
    folders: list[Path] = []
    missing: list[tuple[str, str]] = []
    for raw in paths:
        raw = str(raw)
        matches = (
            [Path(m) for m in glob.glob(raw, recursive=True)]
            if glob.has_magic(raw)
            else [Path(raw)]
        )
        if not matches:
            missing.append((raw, "no such file or folder"))
        for p in matches:
            if p.is_dir():
                folders.append(p.resolve())
                files.extend(
                    sorted(
                        f
                        for f in p.rglob("*")
                        if f.is_file()
                        and not any(part.startswith(".") for part in f.relative_to(p).parts)
                    )
                )
            elif p.is_file():
                files.append(p)
            else:
                missing.append((raw, "no such file or folder"))
    seen: set[Path] = set()
    unique = []
    for f in files:
        r = f.resolve()
        if r not in seen:
            seen.add(r)
            unique.append(r)
    return unique, folders, missing


class KnowledgeBase:
    def __init__(
        self,
        directory: Path,
        *,
        model: str = DEFAULT_MODEL,
        embedder: Embedder | None = None,
        device: str = "cpu",
        dtype: str = "auto",
        chunk_tokens: int = 250,
        overlap: int = 32,
        ivf_threshold: int = 20_000,
        nprobe: int = 16,
        min_score: float = 0.3,
        batch_size: int = 64,
        max_file_mb: float = 200,
        faq_question_vectors: bool = True,
        commit_chunks: int = 2048,
        retrieval: str = "hybrid",
        lexical_weight: float = 1.0,
        candidates: int = 30,
        embed_headings: bool = True,
        links: dict[str, str] | None = None,
    ) -> None:
        self.directory = Path(directory)
        if retrieval not in ("hybrid", "dense"):
            raise ValueError(f"retrieval must be 'hybrid' or 'dense', not {retrieval!r}")
        #: ``hybrid``: FAISS and BM25 (knowledge/lexical.py) fused by rank; ``dense``: FAISS.
        self.retrieval = retrieval
        self.lexical_weight = lexical_weight
        #: How deep each list is read before fusing.
        self.candidates = candidates
        self.embed_headings = embed_headings
        #: Folder → URL where its documents are published; longest folder first.
        self.links = sorted(
            ((str(Path(k).expanduser()).rstrip("/") + "/", v) for k, v in (links or {}).items()),
            key=lambda kv: -len(kv[0]),
        )
        #: An ingest commits (catalogue rows and a new index version) whenever this many
        #: chunks are embedded: a killed ingest keeps what it committed, and the next one
        #: skips those files by checksum.
        self.commit_chunks = commit_chunks
        self.max_file_bytes = int(max_file_mb * 1024 * 1024)
        self.faq_question_vectors = faq_question_vectors
        self.embedder = embedder or Embedder(
            model, device=device, batch_size=batch_size, dtype=dtype
        )
        self.chunk_tokens = chunk_tokens
        self.overlap = overlap
        self.ivf_threshold = ivf_threshold
        self.nprobe = nprobe
        self.min_score = min_score
        self._engine: sa.Engine | None = None
        self._index: VectorIndex | None = None
        self._version = 0
        self._chunk_count: tuple[int, int] = (-1, 0)  # (index version, chunks) for lexical
        self._checked = 0.0
        self._write_lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._open_lock = threading.Lock()
        #: Set once the catalogue is open *and* the current index is loaded.
        self._ready = False

    # -- opening -------------------------------------------------------------------------------

    @property
    def engine(self) -> sa.Engine:
        if self._engine is None:
            with self._open_lock:
                self._open_catalogue()
        assert self._engine is not None
        return self._engine

    def open(self) -> KnowledgeBase:
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

        _meta.create_all(engine)
        with engine.begin() as conn:
            conn.execute(sa.text(lexical.DDL))
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

    # -- writing -------------------------------------------------------------------------------

    def add(
        self, paths: Sequence[str | Path], *, sync: bool = False, progress: Progress | None = None
    ) -> IngestSummary:
        """Ingest files, folders and globs; unchanged files are skipped by checksum.

        With ``sync``, files previously ingested from the given folders that no longer exist
        there are removed from the index.
        """
        started = time.perf_counter()
        summary = IngestSummary()
        files, folders, missing = expand(paths)
        summary.failed.extend(missing)
        self.open()
        with self._exclusive():
            with self.engine.connect() as conn:
                known = {
                    r.source: (r.id, r.checksum)
                    for r in conn.execute(
                        sa.select(files_t.c.id, files_t.c.source, files_t.c.checksum)
                    )
                }
            chunker = Chunker(
                self.embedder.count_tokens,
                self.embedder.windows,
                min(self.chunk_tokens, self.embedder.max_tokens),
                self.overlap,
            )
            pending: list[tuple[Path, str, int, list[Chunk]]] = []
            for n, path in enumerate(files, 1):
                if progress:
                    progress("reading", n, len(files))
                source = str(path)
                try:
                    digest = file_checksum(path)
                    if source in known and known[source][1] == digest:
                        summary.unchanged.append(source)
                        continue
                    chunks = chunker.chunk(load(path, self.max_file_bytes))
                except SkipFile as exc:
                    summary.failed.append((source, str(exc)))
                    continue
                except Exception as exc:  # a loader bug must not lose the rest of the ingest
                    log.exception("failed to read %s", source)
                    summary.failed.append((source, f"{type(exc).__name__}: {exc}"))
                    continue
                pending.append((path, digest, path.stat().st_size, chunks))
            if not self.faq_question_vectors:
                for *_, chunks in pending:
                    for chunk in chunks:
                        chunk.meta.pop("question", None)
            removed_sources: list[str] = []
            if sync:
                present = {str(f) for f in files}
                for source in known:
                    if source not in present and any(
                        Path(source).is_relative_to(folder) for folder in folders
                    ):
                        removed_sources.append(source)
            batches = _batches(pending, self.commit_chunks)
            total = sum(len(c) + sum(1 for ch in c if ch.meta.get("question")) for *_, c in pending)
            done = 0
            for i, batch in enumerate(batches):
                chunks = [c for *_, cs in batch for c in cs]
                questions = [c.meta["question"] for c in chunks if c.meta.get("question")]
                texts = [
                    self._embedding_text(str(path), c.headings, c.text)
                    for path, _, _, cs in batch
                    for c in cs
                ] + questions
                vectors = self._embed(texts, progress, done=done, total=total)
                done += len(texts)
                last = i == len(batches) - 1
                self._commit(
                    batch,
                    vectors[: len(chunks)],
                    removed_sources if last else [],
                    known,
                    summary,
                    progress,
                    vectors[len(chunks) :],
                )
            if not batches and removed_sources:
                self._commit(
                    [], np.zeros((0, 0), dtype=np.float32), removed_sources, known, summary,
                    progress,
                )  # fmt: skip
        summary.seconds = time.perf_counter() - started
        return summary

    def _embedding_text(self, source: str, headings: Sequence[str] | None, text: str) -> str:
        """What the vector is computed from: the document's own headings, then the text.

        The names loaders make up (the file's name for a plain-text file, "page 3") are left
        out: they say nothing about the content and pulled unrelated short files together.
        """
        if not self.embed_headings:
            return text
        stem = Path(source).stem  # exactly what the loaders fall back to
        trail = " › ".join(h for h in headings or [] if h and h != stem and not _PAGE.fullmatch(h))
        return f"{trail}\n{text}" if trail else text

    def _embed(
        self, texts: list[str], progress: Progress | None, *, done: int = 0, total: int = 0
    ) -> np.ndarray:
        """Vectors for ``texts``; progress counts from ``done`` of ``total`` (whole ingest)."""
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        total = max(total, done + len(texts))
        batch = max(self.embedder.batch_size * 8, 256)
        parts = []
        for start in range(0, len(texts), batch):
            parts.append(self.embedder.encode(texts[start : start + batch]))
            if progress:
                progress("embedding", done + min(start + batch, len(texts)), total)
        return np.concatenate(parts)

    def _commit(
        self,
        pending: list[tuple[Path, str, int, list[Chunk]]],
        vectors: np.ndarray,
        removed_sources: list[str],
        known: dict[str, tuple[int, str]],
        summary: IngestSummary,
        progress: Progress | None,
        question_vectors: np.ndarray | None = None,
    ) -> None:
        if not pending and not removed_sources:
            return
        now = datetime.now(UTC)
        with self.engine.begin() as conn:
            state = self._state(conn)
            next_id = int(state.get("next_chunk_id", "1"))
            dim = int(state.get("dim", "0")) or (
                vectors.shape[1] if len(vectors) else self.embedder.dim
            )
            model_id = state.get("model")
            if model_id and model_id != self.embedder.model_name and len(vectors):
                raise KnowledgeError(
                    f"this index was built with {model_id!r}, not {self.embedder.model_name!r}; "
                    "rebuild it with `chinwag knowledge rebuild --reembed` to switch models"
                )
            stale_files = [known[str(p)][0] for p, *_ in pending if str(p) in known]
            stale_files += [known[s][0] for s in removed_sources]
            old_ids = np.array(
                [
                    r[0]
                    for r in conn.execute(
                        sa.select(chunks_t.c.id).where(chunks_t.c.file_id.in_(stale_files))
                    )
                ]
                if stale_files
                else [],
                dtype=np.int64,
            )
            if stale_files:
                lexical.delete(conn, old_ids.tolist())
                conn.execute(sa.delete(chunks_t).where(chunks_t.c.file_id.in_(stale_files)))
                conn.execute(sa.delete(files_t).where(files_t.c.id.in_(stale_files)))
            new_ids: list[int] = []
            new_vectors: list[np.ndarray] = []
            rows: list[dict[str, Any]] = []
            offset = 0
            q_offset = 0
            for path, digest, size, chunks in pending:
                source = str(path)
                file_id = conn.execute(
                    sa.insert(files_t).returning(files_t.c.id),
                    {
                        "source": source,
                        "checksum": digest,
                        "size": size,
                        "chunks": len(chunks),
                        "updated_at": now,
                    },
                ).scalar_one()
                for chunk in chunks:
                    question_vector = None
                    if chunk.meta.get("question") and question_vectors is not None:
                        question_vector = question_vectors[q_offset]
                        q_offset += 1
                    rows.append(
                        {
                            "id": next_id,
                            "file_id": file_id,
                            "source": source,
                            "position": chunk.position,
                            "headings": chunk.headings,
                            "text": chunk.text,
                            "checksum": chunk.checksum,
                            "meta": chunk.meta or None,
                            "embedding": vectors[offset].tobytes(),
                            "question_embedding": None
                            if question_vector is None
                            else question_vector.tobytes(),
                        }
                    )
                    new_ids.append(next_id * 2)
                    new_vectors.append(vectors[offset])
                    if question_vector is not None:
                        new_ids.append(next_id * 2 + 1)
                        new_vectors.append(question_vector)
                    next_id += 1
                    offset += 1
                (summary.updated if source in known else summary.added).append(source)
            if rows:
                conn.execute(sa.insert(chunks_t), rows)
                lexical.insert(conn, rows)
            summary.removed.extend(removed_sources)
            summary.chunks_added += len(rows)
            summary.chunks_removed += len(old_ids)
            total = conn.scalar(sa.select(sa.func.count()).select_from(chunks_t)) or 0
            if progress:
                progress("indexing", 0, 1)
            current = self._index
            switch = current is None or (current.info.kind == "flat") != (
                total < self.ivf_threshold
            )
            if switch:
                index = self._build_from_catalogue(conn, dim)
            else:
                assert current is not None
                index = current.clone()
                index.remove(np.concatenate([old_ids * 2, old_ids * 2 + 1]))
                if new_ids:
                    index.add(np.array(new_ids, dtype=np.int64), np.stack(new_vectors))
            self._write_state(
                conn, index, next_id=next_id, dim=dim, embedded="new" if rows else None
            )
        self._after_commit(index)
        if progress:
            progress("indexing", 1, 1)

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

    def _after_commit(self, index: VectorIndex) -> None:
        version, name = self._pending_version
        with self._read_lock:
            self._index, self._version = index, version
        for old in self.directory.glob("index-*.faiss"):
            if old.name != name:
                old.unlink(missing_ok=True)

    def remove(self, source: str) -> int:
        """Remove one source (a path as ``list`` shows it, or a glob); returns chunks removed."""
        self.open()
        with self._exclusive():
            with self.engine.connect() as conn:
                rows = conn.execute(sa.select(files_t.c.id, files_t.c.source)).all()
            matches = [r for r in rows if r.source == source or fnmatch.fnmatch(r.source, source)]
            if not matches:
                resolved = str(Path(source).resolve())
                matches = [r for r in rows if r.source == resolved]
            if not matches:
                raise KnowledgeError(
                    f"no ingested source matches {source!r}; see `chinwag knowledge list`"
                )
            summary = IngestSummary()
            self._commit(
                [],
                np.zeros((0, 0), dtype=np.float32),
                [r.source for r in matches],
                {r.source: (r.id, "") for r in matches},
                summary,
                None,
            )
            return summary.chunks_removed

    def rebuild(self, *, reembed: bool = False, progress: Progress | None = None) -> dict[str, Any]:
        """Recreate the index from the catalogue (re-running the model with ``reembed``)."""
        self.engine  # noqa: B018 - the catalogue only: the index may be the broken part
        with self._write_lock, (self.directory / ".write.lock").open("a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                with self.engine.begin() as conn:
                    if reembed:
                        query = sa.select(
                            chunks_t.c.id,
                            chunks_t.c.source,
                            chunks_t.c.text,
                            chunks_t.c.headings,
                            chunks_t.c.meta,
                        )
                        rows = conn.execute(query.order_by(chunks_t.c.id)).all()
                        vectors = self._embed(
                            [self._embedding_text(r.source, r.headings, r.text) for r in rows],
                            progress,
                        )
                        asked = [r for r in rows if (r.meta or {}).get("question")]
                        q_vectors = self._embed([r.meta["question"] for r in asked], None)
                        q_by_id = {r.id: v for r, v in zip(asked, q_vectors, strict=True)}
                        for r, v in zip(rows, vectors, strict=True):
                            q = q_by_id.get(r.id)
                            conn.execute(
                                sa.update(chunks_t)
                                .where(chunks_t.c.id == r.id)
                                .values(
                                    embedding=v.tobytes(),
                                    question_embedding=None if q is None else q.tobytes(),
                                )
                            )
                        dim = vectors.shape[1] if len(rows) else self.embedder.dim
                    else:
                        state = self._state(conn)
                        dim = int(state.get("dim", "0")) or self.embedder.dim
                    lexical.rebuild(conn, chunks_t)
                    index = self._build_from_catalogue(conn, dim)
                    self._write_state(conn, index, dim=dim, embedded="all" if reembed else None)
                self._after_commit(index)
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
        return self.stats()

    # -- reading -------------------------------------------------------------------------------

    def _chunks_in(self, conn: sa.Connection) -> int:
        """Chunks in the catalogue, counted once per index version."""
        version, count = self._chunk_count
        if version != self._version:
            count = conn.execute(sa.select(sa.func.count()).select_from(chunks_t)).scalar() or 0
            self._chunk_count = (self._version, count)
        return count

    def search(
        self,
        query: str,
        k: int = 5,
        *,
        filters: dict[str, str] | None = None,
        min_score: float | None = None,
        retrieval: str | None = None,
    ) -> list[Passage]:
        """The ``k`` best passages scoring at least ``min_score`` (cosine similarity).

        ``filters``: ``{"source": "*.md"}`` (a glob on the source path) and/or
        ``{"heading": "billing"}`` (a case-insensitive substring of the heading trail).
        An empty result means "nothing relevant": callers should say so rather than guess.
        """
        return self.search_many(
            [query], k, filters=filters, min_score=min_score, retrieval=retrieval
        )[0]

    def search_many(
        self,
        queries: list[str],
        k: int = 5,
        *,
        filters: dict[str, str] | None = None,
        min_score: float | None = None,
        retrieval: str | None = None,
    ) -> list[list[Passage]]:
        """The ``k`` best passages per query, best first.

        ``hybrid`` ranks by the fusion of the vector and the BM25 lists; ``score`` stays each
        passage's cosine similarity to the query either way, so ``min_score`` keeps meaning
        "relevant enough" (a keyword hit that is about something else is still dropped).
        """
        self.open()
        self._maybe_reload()
        index = self._index
        if index is None or index.info.count == 0 or not queries:
            return [[] for _ in queries]
        mode = retrieval or self.retrieval
        threshold = self.min_score if min_score is None else min_score
        depth = max(self.candidates, k * 6 if filters else k * 2)
        vectors = self.embedder.encode(queries)
        scores, ids = index.search(vectors, depth)
        dense: list[list[int]] = []
        cosine: list[dict[int, float]] = []
        for q_scores, q_ids in zip(scores, ids, strict=True):
            order: list[int] = []
            best: dict[int, float] = {}
            for score, vid in zip(q_scores, q_ids, strict=True):
                cid = int(vid) // 2
                if vid < 0 or cid in best:
                    continue  # results are sorted: the first hit of a chunk is its best
                best[cid] = float(score)
                order.append(cid)
            dense.append(order)
            cosine.append(best)
        with self.engine.connect() as conn:
            keyword = [[] for _ in queries]
            if mode == "hybrid":
                total = self._chunks_in(conn)
                keyword = [lexical.search(conn, q, depth, total) for q in queries]
            wanted = {c for lst in dense + keyword for c in lst}
            if not wanted:
                return [[] for _ in queries]
            rows = {
                r.id: r
                for r in conn.execute(
                    sa.select(
                        chunks_t.c.id,
                        chunks_t.c.text,
                        chunks_t.c.source,
                        chunks_t.c.headings,
                        chunks_t.c.position,
                        chunks_t.c.meta,
                        chunks_t.c.embedding,
                        chunks_t.c.question_embedding,
                    ).where(chunks_t.c.id.in_(wanted))
                )
            }
        results = []
        for vector, order, best, words in zip(vectors, dense, cosine, keyword, strict=True):
            for cid in words:  # keyword-only hits get their cosine from the stored vectors
                row = rows.get(cid)
                if cid not in best and row is not None:
                    best[cid] = _cosine(vector, row.embedding, row.question_embedding)
            if words:
                fused = lexical.fuse([(order, 1.0), (words, self.lexical_weight)])
                ranked = sorted(fused, key=lambda c: (-fused[c], -best.get(c, -1.0)))
            else:
                ranked = order
            # A passage that contains the very name the user asked about is relevant however
            # its words score against the rest of the question ("TEMPLATES_AUTO_RELOAD what
            # is it for" is 0.3 from the section defining it): the keyword list's best few
            # pass the relevance bar by that match.
            named = set(words[: lexical.EXACT_HITS])
            found: list[Passage] = []
            for cid in ranked:
                row = rows.get(cid)
                if row is None or (best.get(cid, -1.0) < threshold and cid not in named):
                    continue
                if filters and not _matches(row, filters):
                    continue
                found.append(
                    Passage(
                        row.id,
                        row.text,
                        # Cosine of unit vectors; float32 rounding can land a hair past 1.
                        min(1.0, best[cid]),
                        row.source,
                        list(row.headings or []),
                        row.position,
                        row.meta or {},
                        self.link(row.source, (row.meta or {}).get("anchor")),
                    )
                )
                if len(found) == k:
                    break
            results.append(found)
        return results

    def link(self, source: str, anchor: str | None = None) -> str | None:
        """The published URL of ``source`` (and its section), from ``knowledge.links``.

        Sphinx sources map to their pages: ``_sources/deploying/gunicorn.rst.txt`` under a
        folder linked to ``https://flask.example/`` is ``https://flask.example/deploying/
        gunicorn.html#running``; ``.rst`` files likewise; anything else keeps its name.
        """
        for folder, base in self.links:
            if source.startswith(folder):
                rel = source[len(folder) :]
                for suffix in (".rst.txt", ".rst"):
                    if rel.endswith(suffix):
                        rel = rel[: -len(suffix)] + ".html"
                        break
                return base.rstrip("/") + "/" + rel + (f"#{anchor}" if anchor else "")
        return None

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


def _cosine(query: np.ndarray, embedding: bytes, question: bytes | None) -> float:
    """The query's similarity to a stored chunk: its text's vector or its question's."""
    score = float(np.frombuffer(embedding, dtype=np.float32) @ query)
    if question is not None:
        score = max(score, float(np.frombuffer(question, dtype=np.float32) @ query))
    return score


def _matches(row: Any, filters: dict[str, str]) -> bool:
    source = filters.get("source")
    if source and not (
        fnmatch.fnmatch(row.source, source) or fnmatch.fnmatch(os.path.basename(row.source), source)
    ):
        return False
    heading = filters.get("heading")
    return not (heading and heading.lower() not in " ".join(row.headings or []).lower())


def _json(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False)
