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

Three layers: the catalogue (knowledge/catalogue.py), and the ingest (knowledge/ingest.py) and
the search (knowledge/search.py) built on it; :class:`KnowledgeBase` is both of the latter.

Searches never take the writer's lock: they use whichever index object is current, and an ingest
swaps in the new one when it commits. Another process's ingest is noticed by the version number
(checked at most once a second) and loaded.
"""

from __future__ import annotations

import threading
from pathlib import Path

import sqlalchemy as sa

from knowledge.catalogue import (
    KnowledgeError,
    _meta,
    chunks_t,
    files_t,
    state_t,
)
from knowledge.embedder import DEFAULT_MODEL, Embedder
from knowledge.index import VectorIndex
from knowledge.ingest import Ingest, IngestSummary, Progress, expand, file_checksum
from knowledge.search import Passage, Search

__all__ = [
    "IngestSummary",
    "KnowledgeBase",
    "KnowledgeError",
    "Passage",
    "Progress",
    "_meta",
    "chunks_t",
    "expand",
    "file_checksum",
    "files_t",
    "state_t",
]


class KnowledgeBase(Ingest, Search):
    """Files → chunks → embeddings → FAISS, with a SQLite catalogue (see the module)."""

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
