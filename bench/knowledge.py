"""Knowledge benchmarks: ingest cost beyond the model, and index latency/recall at scale.

1. **Ingest ratio** — the FAQ corpus (``zaragoza-construction-faq``, 503 pairs) through
   ``KnowledgeBase.add`` (read, chunk, embed, catalogue, index, atomic save) against raw
   ``SentenceTransformer.encode`` of the same chunk texts with the same model object, in the
   same run. Ratio = pipeline chunks/s ÷ raw chunks/s. (The pipeline also embeds each FAQ
   question on its own — the second vector that lifts hit@3 — and puts each chunk's headings
   before its text; that cost is included. ``ingest_ratio_same_work`` has the raw side encode
   exactly the strings the pipeline embeds: what the pipeline itself costs.)
2. **A documentation set, as an operator ingests it** — the Python 3.11 documentation's Sphinx
   sources (Debian's ``python3.11-doc``: ~500 ``.rst.txt`` files) through ``chinwag knowledge
   add`` in a fresh process, so imports and model loading count: chunks per CPU-second of the
   whole command (user + system time of the child), wall seconds, and the same again beside a
   neighbour that keeps one core busy (the machine users share).
3. **Index at scale** — 100k and 1M unit vectors of dimension 384 drawn from a mixture of
   ~1,000 Gaussian clusters (real embeddings cluster; uniform random vectors do not), indexed
   through the project's own ``VectorIndex`` (IVF past the threshold); 1,000 held-out queries
   from the same mixture; single-query latency p50/p99 and recall@10 against exact search.

The last line is a JSON object with ``ingest_ratio``, ``docs_chunks_per_cpu_s``,
``p50_ms_100k``, ``recall10_100k``, ``p50_ms_1m``, ``recall10_1m``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import faiss  # noqa: E402
import numpy as np  # noqa: E402

from bot.logs import quiet_libraries  # noqa: E402
from knowledge.base import KnowledgeBase  # noqa: E402
from knowledge.embedder import Embedder  # noqa: E402
from knowledge.index import VectorIndex  # noqa: E402

quiet_libraries()  # the bench's own lines, not tqdm's "Loading weights" bars


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
                    sa.select(
                        chunks_t.c.source, chunks_t.c.headings, chunks_t.c.text, chunks_t.c.meta
                    ).order_by(chunks_t.c.id)
                )
                texts, embedded, questions = [], [], []
                for source, headings, text, meta in rows:
                    texts.append(text)
                    # The headings trail the pipeline puts before each chunk's text.
                    embedded.append(kb.embedding_text(source, headings, text))
                    if meta and meta.get("question"):
                        questions.append(meta["question"])
            kb.close()
        encode = embedder.model.encode
        t0 = time.perf_counter()
        encode(texts, batch_size=embedder.batch_size, normalize_embeddings=True)
        raw.append(len(texts) / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        encode(embedded + questions, batch_size=embedder.batch_size, normalize_embeddings=True)
        raw_all.append(len(texts) / (time.perf_counter() - t0))
    p, r, ra = (float(np.median(x)) for x in (pipeline, raw, raw_all))
    label = "ingest" if question_vectors else "ingest (no question vectors)"
    print(
        f"{label}: pipeline {p:.1f} chunks/s, raw encode of the chunk texts {r:.1f} chunks/s "
        f"(ratio {p / r:.3f}); raw encode of everything the pipeline embeds (texts with "
        f"their headings + "
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


def docs_ingest(package: str, folder: str, *, neighbour: bool) -> dict[str, float]:
    """``chinwag knowledge add`` of a whole documentation set in a child process."""
    from bench.corpora import debian_docs
    from bench.neighbours import busy_core

    sources = debian_docs(package, folder)
    files = sum(1 for _ in sources.rglob("*.txt"))
    with busy_core(neighbour), tempfile.TemporaryDirectory(prefix="chinwag-bench-docs-") as tmp:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        load0 = os.getloadavg()[0]
        t0 = time.perf_counter()
        command = [sys.executable, "-m", "bot.cli", "--data-dir", tmp]
        command += ["knowledge", "add", "--json", str(sources)]
        # In the empty folder: no chinwag.toml of the caller's is read.
        env = {k: v for k, v in os.environ.items() if not k.startswith("CHINWAG_")}
        env["PYTHONPATH"] = str(ROOT)
        out = subprocess.run(command, check=True, capture_output=True, text=True, cwd=tmp, env=env)
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    summary = json.loads(out.stdout)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    chunks = int(summary["chunks_added"])
    result = {
        "files": files,
        "chunks": chunks,
        "failed": len(summary.get("failed", [])),
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
        "chunks_per_cpu_s": round(chunks / max(cpu, 1e-9), 1),
        "chunks_per_s": round(chunks / wall, 1),
        "load_average": [round(load0, 2), round(os.getloadavg()[0], 2)],
    }
    label = "beside a busy core" if neighbour else "alone"
    print(
        f"docs ingest ({package}, {label}): {files} files → {chunks} chunks in {wall:.1f} s "
        f"wall, {cpu:.1f} CPU-s: {result['chunks_per_cpu_s']} chunks per CPU-second "
        f"(load average {result['load_average'][0]} → {result['load_average'][1]})"
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--nprobe", type=int, default=16)
    parser.add_argument("--skip-1m", action="store_true")
    parser.add_argument("--skip-ingest", action="store_true")
    parser.add_argument("--skip-docs", action="store_true")
    parser.add_argument("--docs-package", default="python3.11-doc")
    parser.add_argument(
        "--docs-folder", default="python3.11", help="its folder under /usr/share/doc"
    )
    parser.add_argument(
        "--spread",
        type=float,
        default=1.0,
        help="cluster spread: the noise norm relative to the (unit) centre",
    )
    args = parser.parse_args()
    result: dict[str, object] = {"load_average_start": [round(x, 2) for x in os.getloadavg()]}
    if not args.skip_ingest:
        embedder = Embedder()
        result.update(ingest_ratio(embedder, args.repeats))
        without = ingest_ratio(embedder, args.repeats, question_vectors=False)
        result["ingest_ratio_without_question_vectors"] = without["ingest_ratio"]
    if not args.skip_docs:
        alone = docs_ingest(args.docs_package, args.docs_folder, neighbour=False)
        busy = docs_ingest(args.docs_package, args.docs_folder, neighbour=True)
        result.update(
            {
                "docs_chunks": alone["chunks"],
                "docs_chunks_per_cpu_s": alone["chunks_per_cpu_s"],
                "docs_wall_s": alone["wall_s"],
                "docs_chunks_per_cpu_s_beside_busy_core": busy["chunks_per_cpu_s"],
                "docs_wall_s_beside_busy_core": busy["wall_s"],
            }
        )
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
    result["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
