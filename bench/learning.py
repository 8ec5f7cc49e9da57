"""Does the bot get better from its users? The learning loop measured end to end, through the product.

Per corpus (the construction FAQ, and Flask's documentation — see bench/qa.py for both):

1. The real bot (core, QA skill, knowledge index, SmolLM2) is started once and stays up.
2. **Cycle 0**: held-out questions — never asked while teaching, asked the way users ask
   (the FAQ's 36 paraphrases; a third of the Flask questions, chosen by hash) — and off-corpus
   questions go through plain chat, one at a time. Measured: key fact contained, answer token-F1
   against the reference, right source cited, share generated (vs quoted), abstention on the
   off-corpus questions.
3. **Teaching**: simulated users ask training questions (FAQ pairs the held-out set does not
   use, worded as the FAQ words them; the other Flask questions) and rate each reply with
   ``/good`` when it contains the reference fact and ``/bad`` when not. A share of the askers are operators, who
   ``/correct`` a bad reply with the reference answer instead. All of it through the chat path
   into the conversation log, as real users' feedback arrives.
4. ``chinwag train --now`` in its own process, as the nightly schedule runs it: dataset from the
   log, LoRA training of the ``qa`` adapter, the gate (held-out and regression-set loss),
   promotion. The running bot hot-swaps to a promoted adapter; the bench waits until it serves.
5. Measure as in 2, and repeat 3–5 for ``--cycles`` cycles.

Printed per cycle: the figures above, the gate's decision and the regression-set loss of the
adapter in service on real human conversations (chitchat-dataset). Written to ``--out``: a
plot of the learning curves and an HTML report with the gate's figures and answers before and
after. Last line: JSON with ``containment_gain_after_3`` (a share: 0.15 is 15 points, pooled
over the corpora's held-out questions) and ``abstention_delta_after_3``, and per corpus
figures.

    .venv/bin/python bench/learning.py [--corpus faq flask] [--cycles 3] [--per-cycle 60]
        [--correct-share 0.5] [--epochs N] [--out bench-learning]

Takes ~10 min per cycle and corpus on the 2-core machine.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import hashlib
import importlib.util
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bot.logs import quiet_libraries

quiet_libraries()  # the bench's own lines, not tqdm's "Loading weights" bars

ROOT = Path(__file__).resolve().parents[1]
# bench/knowledge.py would shadow the knowledge package: run against the installed packages.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
DATA = ROOT / "tests" / "data"


@functools.cache
def _bench_qa() -> Any:
    """bench/qa.py's corpora (loaded by path: bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location("bench_qa", ROOT / "bench" / "qa.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules["bench_qa"] = module
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


_SENTENCES = re.compile(r"(?<=[.!?])\s+")
_STOP = frozenset(
    """a an the and or of to in on for with by at from is are was were be been it its this that
    as can you your i we our they their he she his her not no do does if then than so also""".split()
)


def _content(text: str) -> list[str]:
    return [w for w in re.findall(r"\w+", text.lower()) if w not in _STOP]


@dataclass
class Case:
    question: str
    reference: str  # the reference answer (F1, and what an operator's correction says)
    fact: str | None  # a phrase the reply must contain (held-out cases always have one)
    title: str | None = None  # FAQ: the pair's question (its citation title)
    sources: tuple[str, ...] = ()  # documentation: files that answer it

    def satisfied(self, reply_text: str) -> bool:
        """What a simulated user decides on reading the reply: did it say the thing?"""
        if self.fact:
            return self.fact.lower() in reply_text.lower()
        key = _content(_SENTENCES.split(self.reference.strip())[0])
        have = set(_content(reply_text))
        return bool(key) and sum(w in have for w in key) / len(key) >= 0.6

    def correction(self) -> str:
        """An operator's ``/correct``: the reference answer, at most two sentences."""
        return " ".join(_SENTENCES.split(self.reference.strip())[:2])

    def cited(self, reply: Any) -> bool:
        for s in reply.sources:
            if self.title and (s.title.startswith(self.title) or self.title in s.title):
                return True
            if any(s.location.endswith("/" + f) for f in self.sources):
                return True
        return False


@dataclass
class Corpus:
    name: str
    files: list[Path]
    train: list[Case]
    held_out: list[Case]


def _hash_share(text: str) -> float:
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) / 16**8


def load(name: str) -> Corpus:
    qa = _bench_qa()
    base = qa.load_corpus(name)
    if name == "faq":
        held = [Case(c["question"], c["answer"], c["fact"], title=c["title"]) for c in base.cases]
        used = {c.title for c in held}
        pairs = [json.loads(line) for line in base.files[0].read_text().splitlines()]
        train = [Case(p["q"], p["a"], None, title=p["q"]) for p in pairs if p["q"] not in used]
        random.Random(7).shuffle(train)
        return Corpus(name, base.files, train, held)
    cases = [
        Case(c["question"], c["answer"], c["fact"], sources=tuple(c["sources"]))
        for c in base.cases
        if c.get("sources")
    ]
    held = [c for c in cases if _hash_share(c.question) < 1 / 3]
    train = [c for c in cases if _hash_share(c.question) >= 1 / 3]
    return Corpus(name, base.files, train, held)


def answer_part(reply: Any) -> str:
    """The reply without its source list: what F1 is measured on."""
    return str(reply.metadata.get("answer") or reply.text.split("\n\nSources:")[0])


async def measure(bot: Any, corpus: Corpus, off: list[str], tag: str) -> dict[str, Any]:
    from bot.simulation.chat import ChatUser
    from trainers.metrics import token_f1

    is_abstention = _bench_qa().is_abstention
    rows = []
    for i, case in enumerate(corpus.held_out):
        (reply,) = await ChatUser(bot, chat_id=f"{tag}-h{i}", user_id=f"{tag}-h{i}").send(
            case.question
        )
        rows.append(
            {
                "question": case.question,
                "skill": reply.skill,
                "contained": bool(case.fact and case.fact.lower() in reply.text.lower()),
                "f1": token_f1(answer_part(reply), case.reference),
                "cited": case.cited(reply),
                "mode": reply.metadata.get("mode"),
                "adapter": reply.adapter_version,
                "answer": answer_part(reply),
            }
        )
        print(f"\r  {tag}: held-out {i + 1}/{len(corpus.held_out)}", end="", flush=True)
    abstained = 0
    for i, q in enumerate(off):
        (reply,) = await ChatUser(bot, chat_id=f"{tag}-o{i}", user_id=f"{tag}-o{i}").send(q)
        abstained += is_abstention(reply)
        print(f"\r  {tag}: off-corpus {i + 1}/{len(off)}   ", end="", flush=True)
    print()
    n = len(rows)
    return {
        "containment": round(sum(r["contained"] for r in rows) / n, 3),
        "answer_f1": round(statistics.mean(r["f1"] for r in rows), 3),
        "cited_right": round(sum(r["cited"] for r in rows) / n, 3),
        "generated": round(sum(r["mode"] == "generated" for r in rows) / n, 3),
        "abstention": round(abstained / len(off), 3),
        "adapters_seen": sorted({str(r["adapter"]) for r in rows}),
        "rows": rows,
    }


async def teach(
    bot: Any, cases: list[Case], correct_share: float, tag: str
) -> tuple[dict[str, int], list[Case]]:
    """Users ask and rate; operators correct what was wrong — all as chat messages. Returns
    the counts and the cases an operator corrected."""
    from bot.simulation.chat import ChatUser

    counts = {"asked": 0, "good": 0, "bad": 0, "corrected": 0, "not_qa": 0}
    corrected: list[Case] = []
    rng = random.Random(tag)
    for i, case in enumerate(cases):
        operator = rng.random() < correct_share
        user = ChatUser(bot, chat_id=f"{tag}-t{i}", user_id=f"{tag}-{'op' if operator else 'u'}{i}")
        if operator:
            bot.add_admin(user.platform, user.user_id)
        (reply,) = await user.send(case.question)
        counts["asked"] += 1
        counts["not_qa"] += reply.skill != "qa"
        if case.satisfied(answer_part(reply)):
            counts["good"] += 1
            await user.ask("/good")
        elif operator:
            counts["corrected"] += 1
            corrected.append(case)
            await user.ask(f"/correct {case.correction()}")
        else:
            counts["bad"] += 1
            await user.ask("/bad")
        print(f"\r  {tag}: taught {i + 1}/{len(cases)}", end="", flush=True)
    print()
    await bot.store.flush()
    return counts, corrected


async def ask_again(bot: Any, cases: list[Case], tag: str) -> dict[str, Any]:
    """Other users ask the corrected questions again, in the same words, before any training:
    does the bot now say what the operator said? (Every one of them was wrong the first time.)"""
    from bot.simulation.chat import ChatUser

    right = taught = 0
    rows = []
    for i, case in enumerate(cases):
        (reply,) = await ChatUser(bot, chat_id=f"{tag}-a{i}", user_id=f"{tag}-a{i}").send(
            case.question
        )
        ok = case.satisfied(answer_part(reply))
        right += ok
        taught += any("taught by an operator" in s.title for s in reply.sources)
        rows.append([case.question, reply.metadata.get("mode"), ok, answer_part(reply)[:200]])
    n = len(cases)
    return {
        "corrected": n,
        "right_when_asked_again": round(right / n, 3) if n else None,
        "cited_taught_answer": round(taught / n, 3) if n else None,
        "replies": rows,
    }


def train_now(
    data_dir: Path, cache: Path, trainers: dict[str, Any], log: Path, knowledge: Path | None = None
) -> dict[str, Any]:
    """``chinwag train --now`` in its own process, as the schedule runs it; its report.

    It gets the bot's configuration — the knowledge index included, which the gate's
    in-service check answers the held-out questions from."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHINWAG_")}
    env.update(
        CHINWAG_DATA_DIR=str(data_dir),
        CHINWAG_MODELS__CACHE_DIR=str(cache),
        CHINWAG_SKILLS__SENTIMENT__TRAIN_IF_MISSING="false",
        CHINWAG_TRAINERS=json.dumps(trainers),
    )
    if knowledge is not None:
        env["CHINWAG_KNOWLEDGE"] = json.dumps({"directory": str(knowledge)})
    with log.open("a") as out:
        done = subprocess.run(
            [sys.executable, "-m", "bot.cli", "train", "--now"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    if done.returncode != 0:
        tail = "\n".join(log.read_text().strip().splitlines()[-20:])
        raise SystemExit(f"the training cycle failed (exit {done.returncode}):\n{tail}")
    reports = sorted((data_dir / "trainers" / "reports").glob("*/report.json"))
    return json.loads(reports[-1].read_text())


async def until_serving(bot: Any, name: str, timeout_s: float = 120.0) -> str | None:
    """Wait for the running bot's hot swap to the version the registry has in service."""
    current = bot.models.registry.current(name)
    if current is None:
        return None
    deadline = time.monotonic() + timeout_s
    while bot.models.adapters().get(name) != current.version:
        if time.monotonic() > deadline:
            raise SystemExit(f"the bot did not swap to {name} {current.version} in {timeout_s}s")
        await asyncio.sleep(0.5)
    return current.version


def _gate(report: dict[str, Any]) -> dict[str, Any]:
    qa = report["adapters"].get("qa", {})
    out = {k: qa.get(k) for k in ("decision", "why", "train", "held_out", "version")}
    if qa.get("baseline") and qa.get("candidate"):
        for which in ("baseline", "candidate"):
            for k in ("held_out", "regression"):
                out[f"{which}_{k}_loss"] = round(qa[which][k]["loss"], 4)
        for which in ("baseline", "candidate"):
            if "answers" in qa[which]:
                out[f"{which}_answer_f1"] = round(qa[which]["answers"]["f1"], 3)
        out["comparisons"] = qa.get("gate")
        served = "candidate" if qa.get("decision") == "promoted" else "baseline"
        out["regression_loss_in_service"] = out[f"{served}_regression_loss"]
        out["tokens_per_s"] = qa.get("train_tokens_per_s")
        out["train_seconds"] = qa.get("train_seconds")
        out["in_service_seconds"] = (qa.get("in_service_check") or {}).get("seconds")
    return out


async def run_corpus(corpus: Corpus, args: argparse.Namespace, work: Path, cache: Path) -> dict:
    from bot.core import Bot
    from bot.testing import chinwag_test_settings
    from knowledge.plugin import from_settings

    data = work / corpus.name
    settings = chinwag_test_settings(data, {"knowledge": {"directory": str(data / "kb")}}, cache)
    print(f"== {corpus.name}: ingesting {len(corpus.files)} source(s) …", flush=True)
    kb = from_settings(settings)
    kb.add(corpus.files)
    kb.close()
    off = [q for q in (DATA / "off_corpus_heldout.txt").read_text().splitlines() if q.strip()]
    if args.limit:
        corpus.held_out, off = corpus.held_out[: args.limit], off[: args.limit]
    trainers: dict[str, Any] = {"adapters": ["qa"], "lora": {}}
    if args.epochs:
        trainers["lora"]["epochs"] = args.epochs
    if args.steps:
        trainers["lora"]["max_steps"] = args.steps
    cycles: list[dict[str, Any]] = []
    log = args.out / f"{corpus.name}-train.log"
    async with Bot(settings) as bot:
        await bot.models.start()
        print(
            f"   {len(corpus.held_out)} held-out questions, {len(off)} off-corpus, "
            f"{len(corpus.train)} to teach from",
            flush=True,
        )
        cycles.append({"cycle": 0, **await measure(bot, corpus, off, "c0")})
        show(corpus.name, cycles[-1])
        for c in range(1, args.cycles + 1):
            if corpus.name == "faq":  # new questions each night, as new users come
                batch = corpus.train[(c - 1) * args.per_cycle : c * args.per_cycle]
            else:  # a small manual: the same questions keep coming from new users
                batch = corpus.train
            taught, corrected = await teach(bot, batch, args.correct_share, f"c{c}")
            again = await ask_again(bot, corrected, f"c{c}")
            shown = {k: v for k, v in again.items() if k != "replies"}
            print(f"   cycle {c}: corrected questions asked again: {shown}", flush=True)
            print(f"   cycle {c}: training (log: {log}) …", flush=True)
            started = time.perf_counter()
            report = await asyncio.to_thread(
                train_now, settings.data_dir, cache, trainers, log, data / "kb"
            )
            gate = _gate(report)
            gate["cycle_seconds"] = round(time.perf_counter() - started, 1)
            serving = await until_serving(bot, "qa")
            figures = await measure(bot, corpus, off, f"c{c}")
            cycles.append(
                {
                    "cycle": c,
                    "taught": taught,
                    "asked_again": again,
                    "gate": gate,
                    "serving": serving,
                    **figures,
                }
            )
            show(corpus.name, cycles[-1])
    first, last = cycles[0], cycles[-1]
    again = [c["asked_again"] for c in cycles[1:] if c["asked_again"]["corrected"]]
    corrected = sum(a["corrected"] for a in again)
    return {
        "corrected": corrected,
        "right_when_asked_again": round(
            sum(a["right_when_asked_again"] * a["corrected"] for a in again) / corrected, 3
        )
        if corrected
        else None,
        "held_out_questions": len(corpus.held_out),
        "off_corpus_questions": len(off),
        "cycles": cycles,
        "containment_gain": round(last["containment"] - first["containment"], 3),
        "f1_gain": round(last["answer_f1"] - first["answer_f1"], 3),
        "abstention_delta": round(last["abstention"] - first["abstention"], 3),
        "promoted": sum(c.get("gate", {}).get("decision") == "promoted" for c in cycles),
    }


def show(name: str, c: dict[str, Any]) -> None:
    gate = c.get("gate") or {}
    extra = ""
    if gate:
        extra = (
            f"  | gate {gate.get('decision')} ({gate.get('train')} examples; regression loss "
            f"in service {gate.get('regression_loss_in_service')})"
        )
    print(
        f"   {name} cycle {c['cycle']}: key fact {c['containment']:.2f}, F1 {c['answer_f1']:.2f}, "
        f"cited {c['cited_right']:.2f}, generated {c['generated']:.2f}, abstained "
        f"{c['abstention']:.2f}{extra}",
        flush=True,
    )


def write_report(result: dict[str, Any], out: Path) -> None:
    """learning.png (the curves) and report.html (figures, gate, answers before and after)."""
    from trainers.page import Section, Text, image, plt, render, table

    pyplot = plt()
    corpora = {k: v for k, v in result.items() if isinstance(v, dict) and "cycles" in v}
    figures = ("containment", "answer_f1", "cited_right", "generated", "abstention")
    fig, axes = pyplot.subplots(1, len(corpora), figsize=(5.5 * len(corpora), 3.6), squeeze=False)
    for ax, (name, r) in zip(axes[0], corpora.items(), strict=True):
        xs = [c["cycle"] for c in r["cycles"]]
        for f in figures:
            ax.plot(xs, [c[f] for c in r["cycles"]], marker="o", label=f.replace("_", " "))
        # The night's teaching questions answered right when first asked that night: on Flask
        # the same questions come back every night, so this is what repeat askers get once
        # operators' corrections are taught (at once); on the FAQ each night's are new.
        asked = [c for c in r["cycles"][1:] if c.get("taught", {}).get("asked")]
        ax.plot(
            [c["cycle"] for c in asked],
            [c["taught"]["good"] / c["taught"]["asked"] for c in asked],
            marker="s",
            ls="--",
            color="#555",
            label="teaching questions: right on first ask",
        )
        for c in r["cycles"][1:]:
            if c["gate"].get("decision") != "promoted":
                ax.axvline(c["cycle"], color="#c33", alpha=0.25, lw=6)
        ax.set_title(f"{name}: held-out questions per cycle (solid)")
        ax.set_xlabel("training cycle (red: candidate not promoted)")
        ax.set_xticks(xs)
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize=7, loc="best")
    fig.savefig(out / "learning.png", dpi=110, bbox_inches="tight")
    intro = Text(
        f"Load average {result.get('load_average_start')} → {result.get('load_average_end')}. "
        "Held-out questions never appear in training."
    )
    sections = [Section("Learning curves", [intro, image(fig, "learning curves")])]
    for name, r in corpora.items():
        rows = []
        for c in r["cycles"]:
            gate = c.get("gate") or {}
            why = f" — {gate['why']}" if gate.get("why") else ""
            rows.append(
                [
                    c["cycle"],
                    *(c[f] for f in figures),
                    json.dumps(c.get("taught", {})),
                    f"{gate.get('decision', '–')}{why}",
                    gate.get("regression_loss_in_service"),
                ]
            )
        before, after = r["cycles"][0]["rows"], r["cycles"][-1]["rows"]
        answers = [
            [
                b["question"],
                f"{'✓' if b['contained'] else '✗'} {b['answer'][:400]}",
                f"{'✓' if a['contained'] else '✗'} {a['answer'][:400]}",
            ]
            for b, a in list(zip(before, after, strict=True))[:20]
        ]
        sections.append(
            Section(
                name,
                [
                    table(
                        ["cycle", *figures, "taught", "gate", "regression loss in service"], rows
                    ),
                    table(
                        ["question", "cycle 0", "last cycle"],
                        answers,
                        title="Held-out answers, before and after",
                    ),
                ],
            )
        )
    page = render("Does the bot learn from its users?", sections)
    (out / "report.html").write_text(page, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", nargs="+", default=["faq", "flask"])
    parser.add_argument("--cycles", type=int, default=3)
    parser.add_argument("--per-cycle", type=int, default=60, help="FAQ questions taught a cycle")
    parser.add_argument("--correct-share", type=float, default=0.5, help="askers who are operators")
    parser.add_argument("--epochs", type=float, default=None, help="LoRA epochs (default: config)")
    parser.add_argument("--steps", type=int, default=None, help="LoRA max steps (smoke runs)")
    parser.add_argument("--limit", type=int, default=0, help="held-out/off-corpus questions")
    parser.add_argument("--out", type=Path, default=Path("bench-learning"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    cache = Path(tempfile.gettempdir()) / "chinwag-model-cache"
    result: dict[str, Any] = {"load_average_start": [round(x, 2) for x in os.getloadavg()]}
    with tempfile.TemporaryDirectory(prefix="chinwag-bench-learning-") as tmp:
        for name in args.corpus:
            result[name] = asyncio.run(run_corpus(load(name), args, Path(tmp), cache))
    result["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    corpora = [v for v in result.values() if isinstance(v, dict) and "cycles" in v]
    held = sum(r["held_out_questions"] for r in corpora)
    off = sum(r["off_corpus_questions"] for r in corpora)
    result["containment_gain_after_3"] = round(
        sum(r["containment_gain"] * r["held_out_questions"] for r in corpora) / held, 3
    )
    result["abstention_delta_after_3"] = round(
        sum(r["abstention_delta"] * r["off_corpus_questions"] for r in corpora) / off, 3
    )
    again = [r for r in corpora if r["corrected"]]
    corrected = sum(r["corrected"] for r in again)
    result["corrected_right_when_asked_again"] = (
        round(sum(r["right_when_asked_again"] * r["corrected"] for r in again) / corrected, 3)
        if corrected
        else None
    )
    result["targets"] = {"containment_gain_after_3": ">= 0.15", "abstention_delta_after_3": ">= 0"}
    write_report(result, args.out)
    (args.out / "result.json").write_text(json.dumps(result, indent=2, default=str))
    print(f"report: {args.out / 'report.html'}")
    for r in corpora:
        for c in r["cycles"]:
            c.pop("rows", None)
            c.get("asked_again", {}).pop("replies", None)
    print(json.dumps(result, default=str))


if __name__ == "__main__":
    main()
