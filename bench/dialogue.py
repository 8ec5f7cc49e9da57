"""Dialogue: does chinwag's pipeline (persona, history, tidy-up, sampling) make the embedded
model's replies better than the bare model — or worse? Compared pair by pair, blind.

30 everyday messages (bench/data/dialogue_prompts.jsonl: greetings, farewells, feelings, angry
customers, advice, recipes, jokes, poems, small talk, one in French) go through the real bot as
plain chat, once per dialogue configuration, and to the raw base model (no persona, greedy) on
the same weights. Each reply is checked for what users notice at once:

- **loop**: a sentence said twice, or a four-word run three times;
- **cut**: stops mid-sentence;
- **flood**: a line of emoji or symbols;
- **empty**: nothing, or the bot's own apology;
- **declined**: "I don't know that" to a message that asks no question of fact (none here
  does: they are the chat a bot must take part in);
- **relevance**: the embedder's cosine between message and reply.

Pairs (configuration vs base) are decided by fewer defects, then relevance (a margin of 0.05);
equal is a tie. That is a proxy judge and says so; for a real one, ``--judge-url``/
``--judge-model`` point the ChatEval-style panel (trainers/judge.py) at any OpenAI-compatible
server, both orders, and its verdicts are reported beside the proxy's. Either way a blind sheet
(``--out``/blind.html, answers in random order, the key in key.json) lets a person judge.

Last line: JSON with ``preferred_vs_base`` per configuration (share of decided pairs) and the
configuration that did best.

    .venv/bin/python bench/dialogue.py [--configs shipped,greedy,greedy_plain] [--out DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import statistics
import sys
import tempfile
import time
import unicodedata
from pathlib import Path
from typing import Any

from bot.logs import quiet_libraries

quiet_libraries()  # the bench's own lines, not tqdm's "Loading weights" bars

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPTS = ROOT / "bench" / "data" / "dialogue_prompts.jsonl"
PLAIN_PERSONA = (
    "You are {name}, a friendly assistant in a messaging app. Reply to the user's last message "
    "directly and briefly, in one to three sentences. Be honest when you don't know something."
)
#: Dialogue settings per configuration; "shipped" is whatever the defaults are.
CONFIGS: dict[str, dict[str, Any]] = {
    "shipped": {},
    "greedy": {"temperature": 0.0},
    "greedy_plain": {"temperature": 0.0, "persona": PLAIN_PERSONA},
    "low_temp_plain": {"temperature": 0.3, "persona": PLAIN_PERSONA},
}
_SENTENCE = re.compile(r"(?<=[.!?…])\s+")
_WORD = re.compile(r"\w+", re.U)
_ENDS = re.compile(r"[.!?…)\"'»\]*~]\s*$")


def _symbol(ch: str) -> bool:
    return unicodedata.category(ch) in ("So", "Sk", "Cs") or ch in "\u200d\ufe0f"


def defects(text: str, apologies: set[str]) -> list[str]:
    """What a user notices at a glance, by rules anyone can check."""
    found = []
    stripped = text.strip()
    if not stripped or stripped in apologies:
        return ["empty"]
    sentences = [s.strip().lower() for s in _SENTENCE.split(stripped) if len(s.strip()) > 8]
    words = [w.lower() for w in _WORD.findall(stripped)]
    grams = [tuple(words[i : i + 4]) for i in range(max(0, len(words) - 3))]
    if len(sentences) != len(set(sentences)) or any(grams.count(g) >= 3 for g in set(grams)):
        found.append("loop")
    if not _ENDS.search(stripped) and not _symbol(stripped[-1]):
        found.append("cut")
    visible = [c for c in stripped if not c.isspace()]
    symbols = sum(map(_symbol, visible))
    if symbols >= 8 or symbols > 0.3 * len(visible):
        found.append("flood")
    return found


def proxy_verdict(ours: dict[str, Any], base: dict[str, Any]) -> str:
    """ "ours", "base" or "tie": fewer defects win, then relevance by a clear margin."""
    if len(ours["defects"]) != len(base["defects"]):
        return "ours" if len(ours["defects"]) < len(base["defects"]) else "base"
    if abs(ours["relevance"] - base["relevance"]) >= 0.05:
        return "ours" if ours["relevance"] > base["relevance"] else "base"
    return "tie"


async def replies_for(
    config: dict[str, Any] | None, prompts: list[dict[str, str]], work: Path, models: Path
) -> list[dict[str, Any]]:
    """The bot's replies under dialogue ``config`` (``None``: the bare base model, greedy)."""
    from bot.core import Bot
    from bot.testing import ChatUser, chinwag_test_settings

    overrides: dict[str, Any] = {"skills": {"dialogue": config or {}}}
    settings = chinwag_test_settings(work, overrides, models)
    out = []
    async with Bot(settings) as bot:
        await bot.models.start()
        knowledge = bot.services.get("knowledge")
        apologies = {settings.bot.apology.strip(), settings.bot.timeout_apology.strip()}
        for i, case in enumerate(prompts):
            t0 = time.perf_counter()
            if config is None:
                gen = await bot.models.generate(
                    [{"role": "user", "content": case["text"]}],
                    max_new_tokens=96,
                    temperature=0.0,
                    within_s=60,
                )
                text, skill, declined = gen.text.strip(), "base", False
            else:
                (reply,) = await ChatUser(bot, chat_id=f"d{i}", user_id=f"d{i}").send(case["text"])
                text, skill = reply.text, reply.skill
                declined = bool(reply.metadata.get("abstained"))
            seconds = time.perf_counter() - t0
            relevance = 0.0
            if knowledge is not None and text.strip():
                (relevance,) = await knowledge.similarity(case["text"], [text])
            out.append(
                {
                    "text": text,
                    "skill": skill,
                    "seconds": round(seconds, 2),
                    "defects": defects(text, apologies) + (["declined"] if declined else []),
                    "relevance": round(float(relevance), 3),
                }
            )
    return out


def blind_sheet(
    prompts: list[dict[str, str]], pairs: dict[str, list[tuple[dict, dict]]], out: Path
) -> None:
    """An HTML page of A/B pairs in random order for a person to judge, and the key."""
    import jinja2

    rng = random.Random(7)
    rows, key = [], []
    for name, items in pairs.items():
        for case, (ours, base) in zip(prompts, items, strict=True):
            flip = rng.random() < 0.5
            a, b = (base, ours) if flip else (ours, base)
            rows.append({"message": case["text"], "a": a["text"], "b": b["text"]})
            key.append({"config": name, "message": case["text"], "a": "base" if flip else name})
    order = list(range(len(rows)))
    rng.shuffle(order)
    template = jinja2.Environment(autoescape=True).from_string(
        "<!doctype html><meta charset=utf-8><title>chinwag dialogue: blind pairs</title>"
        "<style>body{font:15px sans-serif;max-width:60em;margin:2em auto}td{vertical-align:top;"
        "padding:.5em;border-top:1px solid #ccc;width:45%}</style>"
        "<h1>Which reply is better?</h1><p>Mark A, B or tie for each message. The key is in "
        "key.json (pair numbers as shown).</p><table>"
        "{% for n, r in rows %}<tr><th colspan=2 style='text-align:left'>{{ n }}. "
        "{{ r.message }}</th></tr><tr><td><b>A</b> {{ r.a }}</td><td><b>B</b> {{ r.b }}</td>"
        "</tr>{% endfor %}</table>"
    )
    out.mkdir(parents=True, exist_ok=True)
    shown = [(n + 1, rows[i]) for n, i in enumerate(order)]
    (out / "blind.html").write_text(template.render(rows=shown), encoding="utf-8")
    (out / "key.json").write_text(
        json.dumps([{"pair": n + 1, **key[i]} for n, i in enumerate(order)], indent=1),
        encoding="utf-8",
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--out", type=Path, default=Path("bench-dialogue"))
    parser.add_argument("--models", type=Path, default=Path.home() / ".cache/chinwag/bench/models")
    parser.add_argument("--limit", type=int, default=None, help="first N messages only")
    parser.add_argument("--judge-url", default=None)
    parser.add_argument("--judge-model", default=None)
    args = parser.parse_args()
    prompts = [json.loads(line) for line in PROMPTS.read_text().splitlines() if line.strip()]
    prompts = prompts[: args.limit] if args.limit else prompts
    names = [n for n in args.configs.split(",") if n]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"unknown configuration(s) {unknown}; known: {', '.join(CONFIGS)}")
    with tempfile.TemporaryDirectory(prefix="chinwag-dialogue-") as tmp:
        work = Path(tmp)
        print(f"base model, greedy, no persona: {len(prompts)} messages", flush=True)
        base = await replies_for(None, prompts, work / "base", args.models)
        results: dict[str, list[dict[str, Any]]] = {}
        for name in names:
            print(f"chinwag, dialogue configuration {name!r}", flush=True)
            results[name] = await replies_for(CONFIGS[name], prompts, work / name, args.models)
    panel = None
    if args.judge_url and args.judge_model:
        from trainers.judge import JudgePanel

        panel = JudgePanel(args.judge_url, args.judge_model)
    summary: dict[str, Any] = {"messages": len(prompts), "configs": {}}
    kinds = sorted({p["kind"] for p in prompts})

    def describe(replies: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "defect_share": {
                d: round(sum(d in r["defects"] for r in replies) / len(replies), 3)
                for d in ("loop", "cut", "flood", "empty", "declined")
            },
            "clean_share": round(sum(not r["defects"] for r in replies) / len(replies), 3),
            "relevance": round(statistics.mean(r["relevance"] for r in replies), 3),
            "p95_s": round(sorted(r["seconds"] for r in replies)[int(0.95 * len(replies))], 2),
        }

    summary["base"] = describe(base)
    for name, replies in results.items():
        verdicts = [proxy_verdict(o, b) for o, b in zip(replies, base, strict=True)]
        decided = [v for v in verdicts if v != "tie"]
        entry = {
            **describe(replies),
            "pairs": {v: verdicts.count(v) for v in ("ours", "base", "tie")},
            "preferred_vs_base": round(decided.count("ours") / len(decided), 3)
            if decided
            else None,
            "worse_by_kind": sorted(
                {p["kind"] for p, v in zip(prompts, verdicts, strict=True) if v == "base"}
                & set(kinds)
            ),
        }
        if panel is not None:
            judged = [
                (await panel.compare(p["text"], o["text"], b["text"])).winner
                for p, o, b in zip(prompts, replies, base, strict=True)
            ]
            sure = [w for w in judged if w != "tie"]
            entry["judge_preferred_vs_base"] = (
                round(sure.count("a") / len(sure), 3) if sure else None
            )
        summary["configs"][name] = entry
    if panel is not None:
        await panel.close()
    blind_sheet(prompts, {n: list(zip(r, base, strict=True)) for n, r in results.items()}, args.out)
    (args.out / "replies.json").write_text(
        json.dumps({"prompts": prompts, "base": base, **results}, indent=1, ensure_ascii=False),
        encoding="utf-8",
    )
    print(
        f"\n{'configuration':<16} {'preferred':>9} {'clean':>6} {'loop':>5} {'cut':>5} "
        f"{'flood':>5} {'decl.':>5} {'relev.':>6} {'p95 s':>6}"
    )
    rows = [("base (greedy)", {**summary["base"], "preferred_vs_base": None})]
    rows += list(summary["configs"].items())
    for name, e in rows:
        pref = "–" if e["preferred_vs_base"] is None else f"{e['preferred_vs_base']:.2f}"
        d = e["defect_share"]
        print(
            f"{name:<16} {pref:>9} {e['clean_share']:>6.2f} {d['loop']:>5.2f} {d['cut']:>5.2f} "
            f"{d['flood']:>5.2f} {d['declined']:>5.2f} {e['relevance']:>6.3f} {e['p95_s']:>6.2f}"
        )
    print(f"blind pairs for a person: {args.out / 'blind.html'} (key: {args.out / 'key.json'})")
    scored = {n: e["preferred_vs_base"] or 0.0 for n, e in summary["configs"].items()}
    best = max(scored, key=scored.get) if scored else None
    print(
        json.dumps(
            {
                "preferred_vs_base": scored,
                "best": best,
                "clean_share": {n: e["clean_share"] for n, e in summary["configs"].items()},
                "base_clean_share": summary["base"]["clean_share"],
                "judge": bool(panel),
            }
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
