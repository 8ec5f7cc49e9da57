"""Lexical retrieval beside the vectors: SQLite FTS5 (BM25) over the same chunks, fused by rank.

Dense vectors find paraphrases but blur exact words: a user who types ``MAX_CONTENT_LENGTH``,
``waitress-serve`` or ``stream_with_context`` wants the passage with those very tokens, and
all-MiniLM ranks it third or fifth behind passages that merely talk about the same topic. BM25
ranks exactly those first — but only for such tokens (see ``_CODE``). Neither list's scores
mean anything to the other, so they are fused by rank (reciprocal rank fusion, Cormack et al.
2009): no score calibration per corpus, and a passage both lists like wins.

The FTS table lives in the catalogue and is written in the same transaction as the chunk rows,
so it inherits the catalogue's crash safety; ``rowid`` is the chunk id. Words are stemmed
(Porter) and folded (unicode61, diacritics removed), so "reloads" finds "reload".
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

import sqlalchemy as sa

TABLE = "chunks_fts"


#: A name in more than this share of the chunks (and more than COMMON_MIN) is not searched.
COMMON_SHARE = 0.02
COMMON_MIN = 5

#: The keyword list's first hits count as relevant by their exact match (see base.search).
EXACT_HITS = 3

#: The usual rank-fusion constant: damps the head of each list so that one list's first
#: place alone does not decide.
RRF_K = 60

#: Words that read as code or configuration rather than prose: ``snake_case``, ``dotted.names``,
#: ``--flags`` and ``-f``, ``calls()``, ``CamelCase``, ``1.2.3``, anything in backticks. Not plain
#: acronyms: on the FAQ corpus "ROT" or "PPE" name a topic that dozens of entries share, and
#: ranking by them put the wrong entry first (recall@1 0.83 → 0.75).
#: Measured on the Flask documentation (bench/qa.py): for questions phrased in plain words,
#: fusing a BM25 list of *all* their words made recall@1 worse (0.88 → 0.76: the words users
#: ask with are not the words the docs use, which is what the vectors are for), while for
#: questions naming an identifier, BM25 on the identifier lifted it from 0.50 to 0.89. So the
#: keyword list is built from these tokens only, each matched as a phrase.
_CODE = re.compile(
    r"`([^`]{2,80})`"
    r"|(?<![\w-])(--?[A-Za-z][\w-]*)"
    r"|([A-Za-z_]\w*(?:[._][A-Za-z_0-9]\w*)+(?:\(\))?)"
    r"|([A-Za-z_]\w*\(\))"
    r"|(\b[a-z]+[A-Z]\w*|\b[A-Z][a-z0-9]+[A-Z]\w*)"
    r"|(\b\d+(?:\.\d+)+\b)"
)


def code_terms(text: str, *, max_terms: int = 16) -> list[str]:
    """The code-like tokens of a message, in order, without repeats."""
    found: list[str] = []
    for match in _CODE.finditer(text):
        raw = next(g for g in match.groups() if g).strip()
        term = raw.strip("-").removesuffix("()")
        # One letter is a name only as a short flag ("-h", "-v"): what FTS then matches is
        # that letter as a word, rare in prose, and ``search`` drops it where it is common.
        if (len(term) > 1 or raw.startswith("-")) and term and term not in found:
            found.append(term)
        if len(found) == max_terms:
            break
    return found


def _phrase(term: str) -> str:
    """``term`` as one FTS5 phrase: quoted, so FTS5's own syntax in a hostile message
    (``NEAR``, ``*``, column filters, unbalanced quotes) is plain text; the tokenizer splits
    ``SESSION_COOKIE_SAMESITE`` into words that must then appear together."""
    return '"' + term.replace('"', '""') + '"'


def insert(conn: sa.Connection, rows: Iterable[dict[str, Any]]) -> None:
    """Index chunk rows (``id``, ``headings``, ``text``) in the current transaction."""
    params = [
        {"id": r["id"], "headings": " ".join(filter(None, r["headings"] or [])), "text": r["text"]}
        for r in rows
    ]
    if params:
        conn.execute(
            sa.text(f"INSERT INTO {TABLE}(rowid, headings, text) VALUES (:id, :headings, :text)"),
            params,
        )


def delete(conn: sa.Connection, chunk_ids: Sequence[int]) -> None:
    for start in range(0, len(chunk_ids), 500):
        part = [int(i) for i in chunk_ids[start : start + 500]]
        conn.execute(sa.text(f"DELETE FROM {TABLE} WHERE rowid IN ({','.join(map(str, part))})"))


def rebuild(conn: sa.Connection, chunks: sa.Table) -> int:
    """Re-index every chunk from the catalogue (an older catalogue, or a repair)."""
    conn.execute(sa.text(f"DELETE FROM {TABLE}"))
    query = sa.select(chunks.c.id, chunks.c.headings, chunks.c.text).order_by(chunks.c.id)
    rows = [r._asdict() for r in conn.execute(query).all()]  # read first: inserts share conn
    for start in range(0, len(rows), 1000):
        insert(conn, rows[start : start + 1000])
    return len(rows)


def search(conn: sa.Connection, text: str, limit: int, total: int | None = None) -> list[int]:
    """Chunk ids, best BM25 first (headings count twice as much as body text).

    Only names that single passages out are searched: one found in more than
    ``COMMON_SHARE`` of the chunks (``click.echo`` in Click's own docs, ``app.config`` in
    Flask's) says nothing about where the answer is, and ranking by it put an arbitrary
    example first. ``total`` is the number of chunks when the caller knows it (counting an
    FTS table scans all of it).
    """
    terms = code_terms(text)
    if not terms:
        return []
    if total is None:
        total = conn.execute(sa.text(f"SELECT count(*) FROM {TABLE}")).scalar() or 0
    cap = max(COMMON_MIN, int(COMMON_SHARE * total))
    count = sa.text(f"SELECT count(*) FROM (SELECT 1 FROM {TABLE} WHERE {TABLE} MATCH :q LIMIT :n)")
    kept = [
        t
        for t in terms
        if (conn.execute(count, {"q": _phrase(t), "n": cap + 1}).scalar() or 0) <= cap
    ]
    if not kept:
        return []
    rows = conn.execute(
        sa.text(
            f"SELECT rowid FROM {TABLE} WHERE {TABLE} MATCH :q "
            f"ORDER BY bm25({TABLE}, 2.0, 1.0) LIMIT :n"
        ),
        {"q": " OR ".join(map(_phrase, kept)), "n": limit},
    )
    return [int(r[0]) for r in rows]


def fuse(rankings: Sequence[tuple[Sequence[int], float]]) -> dict[int, float]:
    """Reciprocal rank fusion: ``{id: Σ weight / (RRF_K + rank)}`` over ``(ids, weight)`` lists."""
    fused: dict[int, float] = {}
    for ids, weight in rankings:
        for rank, cid in enumerate(ids, 1):
            fused[cid] = fused.get(cid, 0.0) + weight / (RRF_K + rank)
    return fused
