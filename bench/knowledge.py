"""Knowledge benchmarks: ingest cost beyond the model, and index latency/recall at scale.

1. **Ingest ratio** — the FAQ corpus (``zaragoza-construction-faq``, 503 pairs) through
   ``KnowledgeBase.add`` (read, chunk, embed, catalogue, index, atomic save) against raw
   ``SentenceTransformer.encode`` of the same chunk texts with the same model object, in the
   same run. Ratio = pipeline chunks/s ÷ raw chunks/s. (The pipeline also embeds each FAQ
   question on its own — the second vector that lifts hit@3 — and that cost is included.)
2. **Index at scale** — 100k and 1M unit vectors of dimension 384 drawn from a mixture of
   ~1,000 Gaussian clusters (real embeddings cluster; uniform random vectors do not), indexed
   through the project's own ``VectorIndex`` (IVF past the threshold); 1,000 held-out queries
   from the same mixture; single-query latency p50/p99 and recall@10 against exact search.

The last line is a JSON object with ``ingest_ratio``, ``p50_ms_100k``, ``recall10_100k``,
``p50_ms_1m``, ``recall10_1m``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import faiss
import numpy as np

from knowledge.base import KnowledgeBase
from knowledge.embedder import Embedder
from knowledge.index import VectorIndex


def ingest_ratio(
    embedder: Embedder, repeats: int, question_vectors: bool = True
) -> dict[str, float]:
    import zaragoza_construction_faq

    faq = Path(zaragoza_construction_faq.__file__).parent / "data" / "faq-en.jsonl"
    embedder.encode(["warm-up"] * 64)
    pipeline, raw, raw_all = [], [], []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            kb = KnowledgeBase(Path(tmp), embedder=embedder, faq_question_vectors=question_vectors)
            t0 = time.perf_counter()
            summary = kb.add([faq])
            pipeline.append(summary.chunks_added / (time.perf_counter() - t0))
            import sqlalchemy as sa

            from knowledge.base import chunks_t

            with kb.engine.connect() as conn:
                rows = conn.execute(
                    sa.select(chunks_t.c.text, chunks_t.c.meta).order_by(chunks_t.c.id)
                )
                texts, questions = [], []
                for text, meta in rows:
                    texts.append(text)
                    if meta and meta.get("question"):
                        questions.append(meta["question"])
            kb.close()
        encode = embedder.model.encode
        t0 = time.perf_counter()
        encode(texts, batch_size=embedder.batch_size, normalize_embeddings=True)
        raw.append(len(texts) / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        encode(texts + questions, batch_size=embedder.batch_size, normalize_embeddings=True)
        raw_all.append(len(texts) / (time.perf_counter() - t0))
    p, r, ra = (float(np.median(x)) for x in (pipeline, raw, raw_all))
    label = "ingest" if question_vectors else "ingest (no question vectors)"
    print(
        f"{label}: pipeline {p:.1f} chunks/s, raw encode of the chunk texts {r:.1f} chunks/s "
        f"(ratio {p / r:.3f}); raw encode of everything the pipeline embeds (texts + "
        f"{len(questions)} FAQ questions) {ra:.1f} chunks/s (ratio {p / ra:.3f}); "
        f"median of {repeats}, {len(texts)} chunks"
    )
    return {
        "ingest_chunks_per_s": round(p, 1),
        "raw_encode_chunks_per_s": round(r, 1),
        "ingest_ratio": round(p / r, 3),
        "ingest_ratio_same_work": round(p / ra, 3),
    }


def clustered(
    n: int, dim: int, clusters: int, rng: np.random.Generator, spread: float
) -> np.ndarray:
    centers = rng.standard_normal((clusters, dim)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    out = np.empty((n, dim), dtype=np.float32)
    step = 100_000
    for start in range(0, n, step):
        m = min(step, n - start)
        labels = rng.integers(0, clusters, m)
        block = centers[labels] + spread * rng.standard_normal((m, dim)).astype(
            np.float32
        ) / np.sqrt(dim)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[start : start + m] = block
    return out


def index_at_scale(
    n: int, nprobe: int, spread: float, queries: int = 1000, dim: int = 384
) -> dict[str, float]:
    rng = np.random.default_rng(n)
    data = clustered(n + queries, dim, 1000, rng, spread=spread)
    base, q = data[:n], data[n:]
    ids = np.arange(n, dtype=np.int64)
    t0 = time.perf_counter()
    index = VectorIndex.build(ids, base, dim=dim, ivf_threshold=20_000, nprobe=nprobe)
    build_s = time.perf_counter() - t0
    exact = faiss.IndexFlatIP(dim)
    exact.add(base)
    _, truth = exact.search(q, 10)
    faiss.omp_set_num_threads(1)  # one query at a time, as a chat message searches
    latencies = []
    found = np.empty((queries, 10), dtype=np.int64)
    for i in range(queries):
        t = time.perf_counter()
        _, got = index.search(q[i : i + 1], 10)
        latencies.append((time.perf_counter() - t) * 1000)
        found[i] = got[0]
    faiss.omp_set_num_threads(0)
    recall = float(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth, strict=True)]))
    p50, p99 = float(np.percentile(latencies, 50)), float(np.percentile(latencies, 99))
    info = index.info
    print(
        f"{n:>9,} vectors: {info.kind} nlist={info.nlist} nprobe={info.nprobe} built in "
        f"{build_s:.1f}s | p50 {p50:.3f} ms, p99 {p99:.3f} ms, recall@10 {recall:.4f}"
    )
    return {
        "p50_ms": round(p50, 4),
        "p99_ms": round(p99, 4),
        "recall10": round(recall, 4),
        "build_s": round(build_s, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--nprobe", type=int, default=16)
    parser.add_argument("--skip-1m", action="store_true")
    parser.add_argument("--skip-ingest", action="store_true")
    parser.add_argument(
        "--spread",
        type=float,
        default=1.0,
        help="cluster spread: the noise norm relative to the (unit) centre",
    )
    args = parser.parse_args()
    result: dict[str, float] = {}
    if not args.skip_ingest:
        embedder = Embedder()
        result.update(ingest_ratio(embedder, args.repeats))
        without = ingest_ratio(embedder, args.repeats, question_vectors=False)
        result["ingest_ratio_without_question_vectors"] = without["ingest_ratio"]
    r100k = index_at_scale(100_000, args.nprobe, args.spread)
    result.update(
        {
            "p50_ms_100k": r100k["p50_ms"],
            "p99_ms_100k": r100k["p99_ms"],
            "recall10_100k": r100k["recall10"],
        }
    )
    if not args.skip_1m:
        r1m = index_at_scale(1_000_000, args.nprobe, args.spread)
        result.update(
            {"p50_ms_1m": r1m["p50_ms"], "p99_ms_1m": r1m["p99_ms"], "recall10_1m": r1m["recall10"]}
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
