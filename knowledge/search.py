"""The knowledge base's search: dense (FAISS) and lexical (BM25) lists fused by rank, FAQ
questions' own vectors, passages with their heading trail and a link where the documents are
published.

A mixin of :class:`knowledge.base.KnowledgeBase`.
"""

from __future__ import annotations

import fnmatch
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa

from knowledge import lexical
from knowledge.catalogue import Catalogue, chunks_t
from knowledge.taught import SOURCE_LABEL

log = logging.getLogger("knowledge.base")


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

        Sphinx sources are named from their ``_sources`` folder (the site's layout); an
        answer an operator taught in chat by who it is (knowledge/taught.py); other files with
        their folder.
        """
        if self.meta.get("taught_at"):
            return f"{SOURCE_LABEL}, {str(self.meta['taught_at'])[:10]}"
        parts = Path(self.source).parts
        if "_sources" in parts:
            return "/".join(parts[len(parts) - parts[::-1].index("_sources") :])
        return "/".join(parts[-2:])


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


#: Cosines this close are one score: the same text embedded in different batches differs by
#: ~1e-5 (bf16 encoder, padding), which must not decide between an operator's answer and a
#: document.
TIE = 1e-3


def _taught_first(ranked: list[int], best: dict[int, float], rows: dict[int, Any]) -> list[int]:
    """``ranked`` with each taught answer moved ahead of the passages above it that it ties with.

    An operator's ``/correct`` of a question is keyed by that question, so asked again it ties
    with the FAQ entry it corrected (both carry the question's vector). Left to the fused
    rank it can fall behind its original, or out of the top ``k`` when other passages tie
    too — and the user gets the answer the operator corrected. Only ties move: a taught
    answer that matches worse keeps its place.
    """
    out = list(ranked)
    for cid in ranked:
        row = rows.get(cid)
        if row is None or not (row.meta or {}).get("taught_at"):
            continue
        score = best.get(cid, -1.0)
        here = out.index(cid)
        at = next(
            (i for i, c in enumerate(out[:here]) if abs(best.get(c, -1.0) - score) <= TIE), here
        )
        out.insert(at, out.pop(here))
    return out


class Search(Catalogue):
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
            keyword: list[list[int]] = [[] for _ in queries]
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
            ranked = _taught_first(ranked, best, rows)
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
