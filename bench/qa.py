"""QA quality and latency on the construction FAQ, through the real core and models.

Prints: the share of held-out paraphrased questions whose reply cites the right FAQ pair and
contains its key fact, the share of off-corpus questions abstained, and reply latency for one
question at a time (p50/p95) and for all questions at once. Last line: JSON.

    .venv/bin/python bench/qa.py [--single N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# bench/knowledge.py would shadow the knowledge package: run against the installed packages.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
DATA = ROOT / "tests" / "data"


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def main() -> None:
    import zaragoza_construction_faq

    from bot.core import Bot
    from bot.testing import ChatUser, chinwag_test_settings
    from knowledge.plugin import from_settings

    parser = argparse.ArgumentParser()
    parser.add_argument("--single", type=int, default=8, help="questions asked one at a time")
    args = parser.parse_args()
    faq = Path(zaragoza_construction_faq.__file__).parent / "data" / "faq-en.jsonl"
    questions = {r["id"]: r["q"] for r in map(json.loads, faq.read_text().splitlines())}
    cases = [json.loads(line) for line in (DATA / "faq_paraphrases.jsonl").read_text().splitlines()]
    off = [q for q in (DATA / "off_corpus_questions.txt").read_text().splitlines() if q.strip()]
    tmp = Path(tempfile.mkdtemp(prefix="chinwag-bench-qa-"))
    settings = chinwag_test_settings(tmp, {"bot": {"skill_timeout_s": 120}})
    kb = from_settings(settings)
    kb.add([faq])
    kb.close()
    async with Bot(settings) as bot:
        await bot.models.start()
        users = [ChatUser(bot, chat_id=f"c{i}", user_id=f"u{i}") for i in range(len(cases))]
        t0 = time.perf_counter()
        replies = await asyncio.gather(
            *(u.send(c["question"]) for u, c in zip(users, cases, strict=True))
        )
        burst_s = time.perf_counter() - t0
        cited = facts = generated = 0
        routed: dict[str, int] = {}
        for case, (reply,) in zip(cases, replies, strict=True):
            cited += any(s.title.startswith(questions[case["id"]]) for s in reply.sources)
            facts += case["fact"].lower() in reply.text.lower()
            generated += reply.metadata.get("mode") == "generated"
            routed[reply.skill] = routed.get(reply.skill, 0) + 1
        offs = [ChatUser(bot, chat_id=f"o{i}", user_id=f"o{i}") for i in range(len(off))]
        off_replies = await asyncio.gather(
            *(u.send(f"/ask {q}") for u, q in zip(offs, off, strict=True))
        )
        abstained = sum(bool(r[0].metadata.get("abstained")) for r in off_replies)
        single, single_generated = [], 0
        for i, case in enumerate(cases[: args.single]):
            (reply,) = await ChatUser(bot, chat_id=f"s{i}", user_id=f"s{i}").send(case["question"])
            single.append(reply.latency_ms / 1000)
            single_generated += reply.metadata.get("mode") == "generated"
    n = len(cases)
    result = {
        "cited_right": round(cited / n, 3),
        "key_fact": round(facts / n, 3),
        "abstained_off_corpus": round(abstained / len(off), 3),
        "generated_share_burst": round(generated / n, 3),
        "burst_questions": n,
        "burst_routed": routed,
        "burst_s": round(burst_s, 2),
        "single_p50_s": round(statistics.median(single), 2),
        "single_p95_s": round(pct(single, 0.95), 2),
        "generated_share_single": round(single_generated / len(single), 3),
    }
    print(f"cited the right pair      {cited}/{n} = {result['cited_right']:.2f}   (target ≥ 0.90)")
    print(f"contains the key fact     {facts}/{n} = {result['key_fact']:.2f}   (target ≥ 0.70)")
    print(
        f"off-corpus abstained      {abstained}/{len(off)} = {result['abstained_off_corpus']:.2f}   (target ≥ 0.90)"
    )
    print(f"{n} questions at once     {burst_s:.1f} s, generated answers {generated}/{n}")
    print(
        f"one at a time             p50 {result['single_p50_s']} s, p95 {result['single_p95_s']} s, "
        f"generated {single_generated}/{len(single)}"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main())
