"""The knowledge base's ingest: files → chunks → embeddings → a new index version, committed
in steps (``commit_chunks``) so a killed ingest keeps what it committed; also removing files
and rebuilding the index from the stored embeddings.

A mixin of :class:`knowledge.base.KnowledgeBase`.
"""

from __future__ import annotations

import fcntl
import fnmatch
import glob
import hashlib
import logging
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa

from knowledge import lexical
from knowledge.catalogue import Catalogue, KnowledgeError, chunks_t, files_t
from knowledge.chunking import Chunk, Chunker
from knowledge.index import VectorIndex
from knowledge.loaders import SkipFile, load

log = logging.getLogger("knowledge.base")


_PAGE = re.compile(r"page \d+", re.IGNORECASE)

Progress = Callable[[str, int, int], None]


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


#: Bumped when the readers turn the same file into different sections (a parser fix): the
#: version is part of every file's checksum, so the next ``chinwag knowledge add`` of the same
#: folder reads each file again instead of calling it unchanged. 2: Sphinx class descriptions,
#: qualified names and clean anchors (knowledge/rst.py).
READER_VERSION = 2


def file_checksum(path: Path) -> str:
    """The file's content and the reader version: what its chunks were made from."""
    h = hashlib.sha256(f"chinwag-reader-{READER_VERSION}\n".encode())
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


class Ingest(Catalogue):
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
                    self.embedding_text(str(path), c.headings, c.text)
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

    def embedding_text(self, source: str, headings: Sequence[str] | None, text: str) -> str:
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
                            [self.embedding_text(r.source, r.headings, r.text) for r in rows],
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
