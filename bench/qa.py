"""Question answering per corpus, through the real core and models, asked as users ask.

Corpora: the construction FAQ (``zaragoza-construction-faq``, the one the skills were tuned on)
and documentation sets, Flask's and Click's Sphinx sources (``_sources/*.rst.txt``) from
Debian's ``python-flask-doc`` / ``python-click-doc`` packages, and ``python``: the Python 3.11
documentation (``python3.11-doc``, ~500 files, the set issue #13 was measured on), whose 30
questions were written after every retrieval and QA default was chosen, so nothing was tuned
on them (``--corpus python``; its ingest takes ~7 minutes here) —
found under /usr/share/doc, or fetched with ``apt-get download`` and unpacked into
``~/.cache/chinwag/bench`` (no root needed). Questions are in bench/data/ and tests/data/,
written the way users type, each with the source(s) that answer it, a key fact and a reference
answer; Flask has a second set naming identifiers (``SESSION_COOKIE_SAMESITE``…).

Per corpus it prints:
- ingest: chunks, seconds, chunks per CPU-second;
- retrieval, ``dense`` (vectors) and ``hybrid`` (vectors + BM25 on code-like words) side by
  side on the same index: recall@1, recall@5, MRR (the right source among the first k);
- through plain chat, one question at a time: routed to QA, right source cited, key fact
  contained, answer token-F1 (SQuAD's, of the answer without its source list) against the
  reference, share generated (vs quoted), latency
  p50/p95;
- off-corpus questions asked as plain chat: share declined, abstained or hedged, for two
  sets nothing was tuned on: ``off_corpus_heldout`` and ``off_corpus_unseen`` (the second
  written on 2026-12-07, before the abstention rules that followed the first set's misses).

    .venv/bin/python bench/qa.py [--corpus faq flask click python] [--limit N] [--set KEY=VALUE]

Last line: JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# bench/knowledge.py would shadow the knowledge package: run against the installed packages.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
DATA = ROOT / "tests" / "data"
BENCH_DATA = ROOT / "bench" / "data"
sys.path.insert(0, str(ROOT))  # bench.corpora, and the checkout's own packages

from bench.corpora import debian_docs  # noqa: E402
from bot.logs import quiet_libraries  # noqa: E402
from trainers.metrics import token_f1  # noqa: E402

quiet_libraries()  # the bench's own lines, not tqdm's "Loading weights" bars


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def answer_of(reply: Any) -> str:
    """What the reply answers, without the "Sources:" list a QA reply ends with: the list is
    navigation, and scoring it would charge every cited title against the answer's F1."""
    return str(reply.metadata.get("answer") or reply.text)


@dataclass
class Corpus:
    name: str
    files: list[Path]
    cases: list[dict[str, Any]]  # question, fact, answer, and sources or title
    tuned: bool  # the skills' defaults were chosen on it

    def relevant(self, case: dict[str, Any], location: str, title: str) -> bool:
        if "title" in case:
            return title.startswith(case["title"]) or case["title"] in title
        return any(location.endswith("/" + s) for s in case["sources"])


def load_corpus(name: str) -> Corpus:
    if name == "faq":
        import zaragoza_construction_faq

        faq = Path(zaragoza_construction_faq.__file__).parent / "data" / "faq-en.jsonl"
        pairs = {r["id"]: r for r in map(json.loads, faq.read_text().splitlines())}
        cases = []
        for line in (DATA / "faq_paraphrases.jsonl").read_text().splitlines():
            c = json.loads(line)
            pair = pairs[c["id"]]
            cases.append(
                {
                    "question": c["question"],
                    "fact": c["fact"],
                    "answer": pair["a"],
                    "title": pair["q"],
                }
            )
        return Corpus("faq", [faq], cases, tuned=True)
    package, folder = {
        "flask": ("python-flask-doc", None),
        "click": ("python-click-doc", None),
        "python": ("python3.11-doc", "python3.11"),
    }[name]
    files = [debian_docs(package, folder)]
    sets = {
        "flask": ["flask_questions", "flask_identifier_questions"],
        "click": ["click_questions"],
        "python": ["python_questions"],
    }
    cases = []
    for stem in sets[name]:
        for line in (BENCH_DATA / f"{stem}.jsonl").read_text().splitlines():
            cases.append({**json.loads(line), "set": stem})
    return Corpus(name, files, cases, tuned=False)


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def retrieval(kb: Any, corpus: Corpus, mode: str) -> dict[str, float]:
    found = kb.search_many(
        [c["question"] for c in corpus.cases], k=5, min_score=-1.0, retrieval=mode
    )
    r1 = r5 = mrr = 0.0
    for case, passages in zip(corpus.cases, found, strict=True):
        ranks = [i for i, p in enumerate(passages) if corpus.relevant(case, p.source, p.title)]
        if ranks:
            r1 += ranks[0] == 0
            r5 += 1
            mrr += 1 / (ranks[0] + 1)
    n = len(corpus.cases)
    return {"recall_at_1": r1 / n, "recall_at_5": r5 / n, "mrr": mrr / n}


def is_abstention(reply: Any) -> bool:
    return bool(reply.metadata.get("abstained") or reply.metadata.get("hedged"))


def overrides_from(pairs: list[str]) -> dict[str, Any]:
    """``skills.qa.min_new_facts=1`` → nested settings overrides (values parsed as JSON when
    they parse, else kept as strings): the same bench, one setting changed, side by side."""
    tree: dict[str, Any] = {}
    for pair in pairs:
        key, _, raw = pair.partition("=")
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        *parents, leaf = key.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


async def evaluate(
    corpus: Corpus,
    off: dict[str, list[str]],
    work: Path,
    models: Path,
    overrides: dict[str, Any] | None = None,
    replies: Any = None,
) -> dict[str, Any]:
    from bot.config import _deep_merge
    from bot.core import Bot
    from bot.testing import ChatUser, chinwag_test_settings
    from knowledge.plugin import from_settings

    settings = chinwag_test_settings(
        work / corpus.name,
        _deep_merge({"knowledge": {"directory": work / corpus.name / "kb"}}, overrides or {}),
        models,
    )
    # A kept --workdir keeps its knowledge base, not its conversations: the store would take
    # this run's messages (the same chats and ids) for redeliveries of the last run's.
    shutil.rmtree(settings.data_dir, ignore_errors=True)
    kb = from_settings(settings)
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    summary = kb.add(corpus.files)
    ingest_s, ingest_cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    chunks = kb.stats()["chunks"]
    result: dict[str, Any] = {
        "tuned_on": corpus.tuned,
        "questions": len(corpus.cases),
        "chunks": chunks,
        "ingest_s": round(ingest_s, 1),
        "chunks_per_cpu_s": round(summary.chunks_added / max(ingest_cpu, 1e-9), 1),
    }
    for mode in ("dense", "hybrid"):
        result[mode] = {k: round(v, 3) for k, v in retrieval(kb, corpus, mode).items()}
    kb.close()
    rows = []
    async with Bot(settings) as bot:
        bot.warm_up()  # the model and the knowledge base load before the first question,
        await bot.warmed()  # as ``chinwag run`` has them load at start
        for i, case in enumerate(corpus.cases):
            (reply,) = await ChatUser(bot, chat_id=f"q{i}", user_id=f"q{i}").send(case["question"])
            rows.append((case, reply))
        off_replies: dict[str, list[Any]] = {name: [] for name in off}
        i = 0
        for name, questions in off.items():
            for q in questions:
                (reply,) = await ChatUser(bot, chat_id=f"o{i}", user_id=f"o{i}").send(q)
                off_replies[name].append(reply)
                i += 1
    if replies is not None:
        asked = [(c["question"], c, r, None) for c, r in rows] + [
            (q, None, r, name)
            for name, questions in off.items()
            for q, r in zip(questions, off_replies[name], strict=True)
        ]
        for question, case, r, off_set in asked:
            record = {
                "corpus": corpus.name,
                "question": question,
                "off_corpus": off_set,
                "reference": None if case is None else case.get("answer"),
                "fact": None if case is None else case.get("fact"),
                "skill": r.skill,
                "latency_s": None if r.latency_ms is None else r.latency_ms / 1000,
                "text": r.text,
                "sources": [s.location for s in r.sources],
                "metadata": r.metadata,
            }
            replies.write(json.dumps(record, default=str) + "\n")
        replies.flush()
    qa = [(c, r) for c, r in rows if r.skill == "qa"]
    n = len(rows)
    cited = sum(any(corpus.relevant(c, s.location, s.title) for s in r.sources) for c, r in rows)
    facts = sum(c["fact"].lower() in r.text.lower() for c, r in rows)
    f1 = [token_f1(answer_of(r), c["answer"]) for c, r in rows]
    by_mode: dict[str, list[float]] = {}
    for (_c, r), score in zip(rows, f1, strict=True):
        by_mode.setdefault(str(r.metadata.get("mode", r.skill)), []).append(score)
    latency = [r.latency_ms / 1000 for _, r in qa if r.latency_ms is not None]
    result.update(
        routed_to_qa=round(len(qa) / n, 3),
        cited_right=round(cited / n, 3),
        key_fact=round(facts / n, 3),
        answer_f1=round(statistics.mean(f1), 3),
        answer_f1_by_mode={m: round(statistics.mean(v), 3) for m, v in sorted(by_mode.items())},
        generated_share=round(
            sum(r.metadata.get("mode") == "generated" for _, r in qa) / max(len(qa), 1), 3
        ),
        qa_p50_s=round(statistics.median(latency), 2) if latency else None,
        qa_p95_s=round(pct(latency, 0.95), 2) if latency else None,
        **{
            f"{name}_abstained": round(sum(map(is_abstention, said)) / len(said), 3)
            for name, said in off_replies.items()
        },
        off_corpus_routed=dict(Counter(r.skill for said in off_replies.values() for r in said)),
    )
    sets = sorted({c.get("set", corpus.name) for c, _ in rows})
    if len(sets) > 1:
        result["cited_by_set"] = {
            s: round(
                statistics.mean(
                    any(corpus.relevant(c, x.location, x.title) for x in r.sources)
                    for c, r in rows
                    if c.get("set") == s
                ),
                3,
            )
            for s in sets
        }
    misses = [
        (c["question"], r.skill, [s.location.rsplit("/", 1)[-1] for s in r.sources][:2])
        for c, r in rows
        if not any(corpus.relevant(c, s.location, s.title) for s in r.sources)
    ]
    result["missed"] = misses[:12]
    # An off-corpus question answered is the failure that matters most: say what was said.
    result["answered_off_corpus"] = [
        (q, r.skill, answer_of(r)[:160])
        for name, questions in off.items()
        for q, r in zip(questions, off_replies[name], strict=True)
        if not is_abstention(r)
    ]
    return result


def show(name: str, r: dict[str, Any]) -> None:
    tuned = "tuned on it" if r["tuned_on"] else "not tuned on"
    print(f"\n== {name} ({tuned}): {r['questions']} questions, {r['chunks']} chunks")
    print(f"ingest              {r['ingest_s']} s, {r['chunks_per_cpu_s']} chunks per CPU-second")
    for mode in ("dense", "hybrid"):
        m = r[mode]
        print(
            f"retrieval {mode:<7}   recall@1 {m['recall_at_1']:.2f}  recall@5 "
            f"{m['recall_at_5']:.2f}  MRR {m['mrr']:.2f}"
        )
    print(
        f"through chat        routed to QA {r['routed_to_qa']:.2f}, cited right "
        f"{r['cited_right']:.2f}, key fact {r['key_fact']:.2f}, F1 {r['answer_f1']:.2f}, "
        f"generated {r['generated_share']:.2f}"
    )
    print(f"answer F1 by mode   {r['answer_f1_by_mode']}")
    print(f"QA latency          p50 {r['qa_p50_s']} s, p95 {r['qa_p95_s']} s")
    print(
        f"off-corpus          abstained/declined/hedged {r['off_corpus_abstained']:.2f} "
        f"(held out), {r['off_corpus_unseen_abstained']:.2f} (unseen)"
    )
    for q, skill, where in r["missed"]:
        print(f"  missed: {q!r} → {skill} {where}")
    for q, skill, said in r["answered_off_corpus"]:
        print(f"  answered off-corpus: {q!r} → {skill}: {said!r}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", nargs="+", default=["faq", "flask", "click"])
    parser.add_argument("--limit", type=int, default=0, help="at most N questions per corpus")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a settings override, e.g. skills.qa.min_new_facts=1 (repeatable)",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        help="keep the knowledge bases here (a second run reuses them: nothing to re-embed)",
    )
    parser.add_argument(
        "--replies",
        type=Path,
        help="write every reply (text, sources, the QA skill's reasons) to this JSONL file",
    )
    args = parser.parse_args()
    import contextlib
    import os

    off = {
        name: [q for q in (DATA / f"{file}.txt").read_text().splitlines() if q.strip()]
        for name, file in (
            ("off_corpus", "off_corpus_heldout"),
            ("off_corpus_unseen", "off_corpus_unseen"),
        )
    }
    result: dict[str, Any] = {"load_average_start": [round(x, 2) for x in os.getloadavg()]}
    if args.set:
        result["overrides"] = args.set
    kept = contextlib.nullcontext(str(args.workdir)) if args.workdir else None
    with (
        kept or tempfile.TemporaryDirectory(prefix="chinwag-bench-qa-") as tmp,
        args.replies.open("w") if args.replies else contextlib.nullcontext() as replies,
    ):
        work = Path(tmp)
        work.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 (nothing else runs yet)
        for name in args.corpus:
            corpus = load_corpus(name)
            if args.limit:
                corpus.cases = corpus.cases[: args.limit]
            r = await evaluate(
                corpus, off, work, work / "models", overrides_from(args.set), replies
            )
            show(name, r)
            result[name] = r
    result["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    for r in result.values():
        if isinstance(r, dict):
            r.pop("missed", None)
            r.pop("answered_off_corpus", None)
    print(json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main())
