"""The evaluation suite behind ``chinwag eval``, and the trainers' gate.

Each suite runs the real bot (its skills, models, knowledge index and adapters in service) on a
temporary conversation log, and returns plain data: the figures (standard definitions, from
:mod:`trainers.metrics`) plus what the report plots. Operators' own data comes in as files;
a bad row is an error naming the file and line rather than a silently skewed number.
"""

from __future__ import annotations

import asyncio
import csv
import json
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bot.core import Bot
from bot.simulation.chat import ChatUser
from bot.text import support
from trainers import metrics

LABELS = ("negative", "neutral", "positive")
_LABEL_ALIASES = {
    "negative": 0, "neg": 0, "-1": 0, "rotten": 0,
    "neutral": 1, "neu": 1, "0": 1,
    "positive": 2, "pos": 2, "1": 2, "fresh": 2,
}  # fmt: skip

Progress = Callable[[str, int, int], None]


class DataError(ValueError):
    """An evaluation data file that cannot be used; the message starts with ``file:line:``."""


# -- operators' data ----------------------------------------------------------------------------


def read_labelled_csv(path: Path) -> tuple[list[str], list[int]]:
    """``text,label`` rows (a header row is required); labels negative/neutral/positive."""
    texts, labels = [], []
    try:
        with path.open(encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames or not {"text", "label"} <= set(reader.fieldnames):
                raise DataError(f"{path}:1: expected a header with 'text' and 'label' columns")
            for row in reader:
                line = reader.line_num
                label = str(row.get("label") or "").strip().lower()
                if label not in _LABEL_ALIASES:
                    raise DataError(
                        f"{path}:{line}: label {row.get('label')!r} is not one of "
                        "negative, neutral, positive"
                    )
                text = (row.get("text") or "").strip()
                if not text:
                    raise DataError(f"{path}:{line}: empty text")
                texts.append(text)
                labels.append(_LABEL_ALIASES[label])
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot read: {exc}") from exc
    if not texts:
        raise DataError(f"{path}: no rows")
    return texts, labels


def read_qa_jsonl(path: Path) -> list[dict[str, Any]]:
    """One JSON object per line: ``question``, ``answer`` (absent or null: the bot should
    abstain — the question is off the knowledge base), optional ``source``."""
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read: {exc}") from exc
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{n}: not JSON: {exc.msg}") from None
        if not isinstance(row, dict) or not isinstance(row.get("question"), str):
            raise DataError(f"{path}:{n}: needs a 'question' string")
        if row.get("answer") is not None and not isinstance(row["answer"], str):
            raise DataError(f"{path}:{n}: 'answer' must be a string or null")
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def default_sentiment_data(limit: int = 600, seed: int = 13) -> tuple[list[str], list[int]]:
    """The classifier's own held-out split (movies it never trained on), sampled."""
    from trainers.sentiment import SentimentTrainConfig, load_rotten_tomatoes, split_by_group

    _, test = split_by_group(load_rotten_tomatoes(), SentimentTrainConfig().held_out)
    random.Random(seed).shuffle(test)
    test = test[:limit]
    return [e.text for e in test], [int(e.label) for e in test]


def default_dialogue_prompts(n: int = 20, seed: int = 7) -> list[str]:
    """Openers of real human conversations (``chitchat-dataset``)."""
    from bot.simulation.users import _chitchat

    conversations = _chitchat()
    rng = random.Random(seed)
    return [rng.choice(conversations)[0] for _ in range(n)]


# -- suites ------------------------------------------------------------------------------------


async def eval_sentiment(
    bot: Bot, texts: list[str], labels: list[int], progress: Progress | None = None
) -> dict[str, Any]:
    from bot.models.classifier import NoClassifier

    proba = np.zeros((len(texts), len(LABELS)))
    batch = 64
    for start in range(0, len(texts), batch):
        try:
            results = await bot.models.classify(texts[start : start + batch], "sentiment")
        except NoClassifier:
            raise DataError(
                "no 'sentiment' classifier in service to evaluate: the bot trains one on its "
                "first start (skills.sentiment.train_if_missing)"
            ) from None
        for i, r in enumerate(results):
            proba[start + i] = [r.scores.get(label, 0.0) for label in LABELS]
        if progress:
            progress("sentiment", min(start + batch, len(texts)), len(texts))
    report = metrics.classification_report(labels, proba, LABELS)
    report["roc_curves"] = metrics.roc_curves(labels, proba, LABELS)
    predicted = proba.argmax(axis=1)
    report["mistakes"] = [
        {
            "text": texts[i],
            "true": LABELS[labels[i]],
            "predicted": LABELS[int(predicted[i])],
            "confidence": round(float(proba[i].max()), 3),
        }
        for i in np.argsort(-proba.max(axis=1))
        if predicted[i] != labels[i]
    ][:20]
    version = bot.models.registry.current("sentiment") if bot.models.registry else None
    report["adapter_version"] = version.version if version else None
    return report


def _relevant(passage: Any, row: dict[str, Any]) -> bool:
    if row.get("source"):
        needle = str(row["source"]).casefold()
        return needle in f"{passage.source} {passage.title}".casefold()
    return metrics.contains_answer(passage.text, row["answer"])


async def eval_retrieval(
    bot: Bot, rows: list[dict[str, Any]], k: int = 10, progress: Progress | None = None
) -> dict[str, Any]:
    kb = _knowledge(bot)
    answerable = [r for r in rows if r.get("answer") is not None]
    ranks: list[int | None] = []
    for i, row in enumerate(answerable, 1):
        found = await kb.search(row["question"], k=k, min_score=-1.0)
        ranks.append(next((j + 1 for j, p in enumerate(found) if _relevant(p, row)), None))
        if progress:
            progress("retrieval", i, len(answerable))
    return {**metrics.retrieval_metrics(ranks), "ranks": ranks}


async def _ask_all(
    bot: Bot, questions: list[str], label: str, progress: Progress | None, concurrency: int = 8
) -> list[tuple[list[Any], float]]:
    gate = asyncio.Semaphore(concurrency)
    done = 0

    async def ask(i: int, q: str) -> tuple[list[Any], float]:
        nonlocal done
        async with gate:
            user = ChatUser(bot, platform="eval", chat_id=f"{label}-{i}", user_id=f"{label}-{i}")
            started = time.perf_counter()
            replies = await user.send(q)
            took = time.perf_counter() - started
        done += 1
        if progress:
            progress(label, done, len(questions))
        return replies, took

    return list(await asyncio.gather(*(ask(i, q) for i, q in enumerate(questions))))


def _answer_text(text: str) -> str:
    return text.split("\n\nSources:", 1)[0].strip()


async def eval_qa(
    bot: Bot, rows: list[dict[str, Any]], progress: Progress | None = None
) -> dict[str, Any]:
    results = await _ask_all(bot, [r["question"] for r in rows], "qa", progress)
    contained, f1s, cited_right, cited_total, routed = [], [], 0, 0, 0
    abstained, should, cases = [], [], []
    latencies: dict[str, list[float]] = {}
    for row, (replies, took) in zip(rows, results, strict=True):
        text = _answer_text("\n".join(r.text for r in replies))
        did_abstain = any(r.metadata.get("abstained") for r in replies)
        abstained.append(did_abstain)
        should.append(row.get("answer") is None)
        routed += any(r.skill == "qa" for r in replies)
        for r in replies:
            latencies.setdefault(r.skill or "?", []).append(r.latency_ms or took * 1000)
        case = {"question": row["question"], "reply": text, "abstained": did_abstain}
        if row.get("answer") is not None:
            contained.append(metrics.contains_answer(text, row["answer"]))
            f1s.append(metrics.token_f1(text, row["answer"]))
            case.update(reference=row["answer"], f1=round(f1s[-1], 3))
            if row.get("source"):
                cited_total += 1
                sources = [s for r in replies for s in r.sources]
                ok = bool(sources) and str(row["source"]).casefold() in (
                    f"{sources[0].location} {sources[0].title}".casefold()
                )
                cited_right += ok
                case["cited_right"] = ok
        cases.append(case)
    return {
        "n": len(rows),
        "answerable": len(contained),
        "containment": float(np.mean(contained)) if contained else None,
        "f1": float(np.mean(f1s)) if f1s else None,
        "citation_accuracy": cited_right / cited_total if cited_total else None,
        "routed_to_qa": routed / len(rows) if rows else 0.0,
        **metrics.abstention_metrics(abstained, should),
        "latency_ms": _latency_table(latencies),
        "cases": cases,
    }


async def eval_dialogue(
    bot: Bot, prompts: list[str], progress: Progress | None = None
) -> dict[str, Any]:
    results = await _ask_all(bot, prompts, "dialogue", progress)
    texts: list[str] = []
    grounded: list[float] = []
    latencies: dict[str, list[float]] = {}
    kb = bot.services.get("knowledge")
    cfg = getattr(bot.skill("dialogue"), "config", None) if _has_skill(bot, "dialogue") else None
    for prompt, (replies, took) in zip(prompts, results, strict=True):
        text = "\n".join(r.text for r in replies)
        texts.append(text)
        for r in replies:
            latencies.setdefault(r.skill or "?", []).append(r.latency_ms or took * 1000)
        if kb is not None and any(r.metadata.get("passages") for r in replies):
            k = getattr(cfg, "knowledge_passages", 3) if cfg else 3
            passages = await kb.search(prompt, k=k)
            grounded.append(support(text, [p.text for p in passages]))
    lengths = [len(t.split()) for t in texts]
    return {
        "n": len(prompts),
        "distinct_1": metrics.distinct_n(texts, 1),
        "distinct_2": metrics.distinct_n(texts, 2),
        "repetition_rate": float(np.mean([metrics.repetition_rate(t) for t in texts]))
        if texts
        else 0.0,
        "reply_words_mean": float(np.mean(lengths)) if lengths else 0.0,
        "reply_lengths": lengths,
        "groundedness": float(np.mean(grounded)) if grounded else None,
        "grounded_replies": len(grounded),
        "latency_ms": _latency_table(latencies),
        "samples": [{"prompt": p, "reply": t} for p, t in zip(prompts, texts, strict=True)][:10],
    }


async def eval_scenarios(settings: Any, paths: list[Path], workdir: Path) -> dict[str, Any]:
    from bot.simulation import load, simulate

    scenarios = load(paths)
    results = await simulate(settings, scenarios, workdir=workdir)
    checked = [r for r in results if r.skipped is None]
    return {
        "n": len(results),
        "passed": sum(r.passed for r in results),
        "skipped": len(results) - len(checked),
        # Of the scenarios this bot could be checked on (a missing classifier is no failure).
        "pass_rate": sum(r.passed for r in checked) / len(checked) if checked else 0.0,
        "failures": [
            {"name": r.scenario.name, "file": str(r.scenario.path), "why": r.failures[0]}
            for r in results
            if r.failed
        ],
        "skips": [{"name": r.scenario.name, "why": r.skipped} for r in results if r.skipped],
    }


# -- helpers -----------------------------------------------------------------------------------


def _knowledge(bot: Bot) -> Any:
    kb = bot.services.get("knowledge")
    if kb is None:
        raise DataError("no knowledge plugin is loaded: retrieval and QA cannot be evaluated")
    return kb


def _has_skill(bot: Bot, name: str) -> bool:
    return any(e.name == name for e in bot.skills)


def _latency_table(latencies: dict[str, list[float]]) -> dict[str, dict[str, float | None]]:
    return {
        skill: {
            "n": len(v),
            "p50": metrics.percentile(v, 50),
            "p95": metrics.percentile(v, 95),
        }
        for skill, v in sorted(latencies.items())
    }


def flatten(report: dict[str, Any]) -> dict[str, float]:
    """``suite.metric`` → value for every scalar figure (what baselines are compared on)."""
    out: dict[str, float] = {}
    for suite, figures in report.get("suites", {}).items():
        for key, value in figures.items():
            if isinstance(value, bool) or key in ("n",):
                continue
            if isinstance(value, int | float):
                out[f"{suite}.{key}"] = float(value)
            elif key == "latency_ms" and isinstance(value, dict):
                for skill, row in value.items():
                    for q in ("p50", "p95"):
                        if row.get(q) is not None:
                            out[f"{suite}.latency_{skill}_{q}_ms"] = float(row[q])
    return out


#: Figures where lower is better (their deltas are shown the other way round).
LOWER_IS_BETTER = ("repetition_rate", "_ms")


def compare(report: dict[str, Any], baseline: dict[str, Any]) -> list[dict[str, Any]]:
    """Every figure both reports have: value, baseline, delta, and whether it got better."""
    now, before = flatten(report), flatten(baseline)
    rows = []
    for key in sorted(now.keys() & before.keys()):
        delta = now[key] - before[key]
        lower = any(key.endswith(s) for s in LOWER_IS_BETTER)
        rows.append(
            {
                "metric": key,
                "value": now[key],
                "baseline": before[key],
                "delta": delta,
                "better": (delta < 0) if lower else (delta > 0),
            }
        )
    return rows
