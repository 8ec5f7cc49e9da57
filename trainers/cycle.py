"""One training cycle: ``logs → dataset → LoRA training → evaluation → gate → registry``.

Runs in its own process (``chinwag train --now``, or the nightly schedule ``chinwag run``
starts), never inside the bot: a training run can use every core and all the memory it likes and
still cannot stall the event loop or take the bot down with it. The running bot notices a
promotion through the registry and swaps the adapter without a restart.

Safety properties, each tested:

- only one cycle at a time: an OS file lock, which the kernel releases when a crashed cycle's
  process dies — a crash never leaves it stuck;
- a crash or kill mid-training leaves the registry and the adapter in service untouched (a
  candidate is published only once complete, and promoted only after the gate); the next run
  resumes from the last checkpoint;
- the gate scores the candidate and the adapter in service (the base model when none) on the
  same held-out replies, and promotes only when the candidate is not worse by more than
  ``margin``: a candidate trained on poisoned data is rejected.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from bot.files import atomic_write
from bot.models.registry import AdapterRegistry
from trainers.lora import LoraConfig

if TYPE_CHECKING:
    from trainers.in_service import InServiceCheck

log = logging.getLogger(__name__)
Progress = Callable[[str, int, int], None]


class CycleBusy(RuntimeError):
    """Another cycle holds the lock."""


class CycleConfig(BaseModel):
    """``[trainers]`` in the configuration."""

    model_config = ConfigDict(extra="forbid")

    adapters: list[str] = ["dialogue", "qa", "sentiment"]
    held_out: float = Field(0.1, gt=0, lt=0.5)
    #: Earlier cycles' training examples replayed beside the new ones, as a multiple of the
    #: new: each candidate is trained from the base model, so what earlier nights taught is
    #: kept only through replay. At 0.2 the learning bench's held-out key-fact containment
    #: went 0.86 → 0.81 → 0.78 over three promoted cycles (2026-12-05): each night's
    #: adapter knew mostly that night's questions.
    replay_share: float = Field(2.0, ge=0)
    context_turns: int = Field(4, ge=0)
    #: A ``qa`` example's target must be this well supported by the passages in its prompt
    #: (the QA skill's ``min_support`` measure) or it is left out: trained on answers from
    #: beyond its passages, the adapter learns to answer from memory. Operators' corrections
    #: that go beyond the passages are taught to the knowledge base instead.
    qa_min_support: float = Field(0.75, ge=0, le=1)
    #: The candidate may be at most this much worse (relative to the one in service, on each
    #: gated figure) and still be promoted; 0 means "not measurably worse" (trainers/gate.py).
    margin: float = Field(0.0, ge=0)
    #: Significance the gate's paired sign test needs before it holds a candidate back: a
    #: handful of held-out examples cannot tell 1 % apart, a consistent regression shows.
    gate_alpha: float = Field(0.05, gt=0, le=1)
    #: ``better``: promote only a candidate measurably better than the one in service on
    #: held-out loss, answer F1 or answer F1 in service (sign test at ``gate_better_alpha``)
    #: and worse on none; ``not_worse``: any candidate the checks do not hold back.
    gate_promote: Literal["better", "not_worse"] = "better"
    gate_better_alpha: float = Field(0.05, gt=0, le=1)
    #: The gate also scores earlier cycles' held-out examples (never trained on): one
    #: night's split is a handful, too few to show that a candidate is better.
    gate_earlier_held_out: bool = True
    #: Held-out prompts the candidate and the one in service both answer (greedy) for the
    #: gate's answer check; 0 switches the check off.
    gate_answers: int = Field(24, ge=0)
    #: Put the candidate in service on a throwaway bot and ask the held-out questions (up to
    #: ``gate_answers``) and run the scenarios there, beside the adapters in service
    #: (trainers/in_service.py). False: the losses and the answer check only.
    gate_in_service: bool = True
    #: Scenario files or folders every candidate must pass wherever the adapter in service
    #: does. Unset: chinwag's shipped scenarios; ``[]``: none.
    gate_scenarios: list[Path] | None = None
    lora: LoraConfig = LoraConfig()
    #: The sentiment classifier's training (``trainers.sentiment.SentimentTrainConfig``
    #: fields); it retrains only in cycles that bring operator labels (``/label``).
    sentiment: dict[str, Any] = {}
    #: Size of the fixed regression set (human replies from chitchat-dataset) every candidate
    #: is also scored on.
    regression_size: int = Field(48, ge=1)
    #: Scheduling priority of the cycle process (``nice``): the bot's replies come first when
    #: both want the CPU. 0 disables.
    nice: int = Field(15, ge=0, le=19)
    #: Cron expression and time zone of the nightly cycle ``chinwag run`` schedules.
    schedule: str | None = "0 3 * * *"
    timezone: str = "UTC"


def trainers_dir(settings: Any) -> Path:
    return Path(settings.data_dir) / "trainers"


@contextlib.contextmanager
def cycle_lock(settings: Any) -> Iterator[None]:
    path = trainers_dir(settings) / "cycle.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CycleBusy("another training cycle is running") from None
        yield


def _state(settings: Any) -> dict[str, Any]:
    path = trainers_dir(settings) / "state.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


async def _read_log(settings: Any, since: datetime) -> tuple[list[Any], dict[Any, Any]]:
    from bot.store import ConversationStore

    store = ConversationStore(settings.database_url)
    await store.open(migrate=True)
    try:
        return await store.conversations(since), await store.forgotten_users()
    finally:
        await store.close()


def _new_cycle_id(settings: Any, at: datetime) -> str:
    """The cycle's start, to the second; a second cycle in the same second (a night with
    nothing to train ends in one) gets a suffix rather than the first one's folders."""
    stamp = at.strftime("%Y%m%d-%H%M%S")
    taken = (Path(settings.data_dir) / "datasets", trainers_dir(settings) / "reports")
    cycle_id, n = stamp, 1
    while any((folder / cycle_id).exists() for folder in taken):
        n += 1
        cycle_id = f"{stamp}-{n}"
    return cycle_id


def run_cycle(
    settings: Any,
    config: CycleConfig | None = None,
    *,
    progress: Progress | None = None,
    resume: bool = True,
) -> dict[str, Any]:
    """Run one cycle; returns its report (also written under ``data_dir/trainers/reports``)."""
    from trainers.dataset import build, earlier_held_out, user_hash

    config = config or CycleConfig()
    say = progress or (lambda stage, done, total: None)
    with cycle_lock(settings):
        state = _state(settings)
        until = datetime.now(UTC)
        since = datetime.fromisoformat(state["until"]) if state.get("until") else None
        # An interrupted cycle is finished under its own id, so its checkpoints are reused.
        cycle_id = (state.get("running") if resume else None) or _new_cycle_id(settings, until)
        atomic_write(
            trainers_dir(settings) / "state.json", json.dumps({**state, "running": cycle_id})
        )
        say("log", 0, 1)
        conversations, forgotten = asyncio.run(
            _read_log(settings, since or datetime(1970, 1, 1, tzinfo=UTC))
        )
        say("log", 1, 1)
        dataset = build(
            conversations,
            Path(settings.data_dir) / "datasets" / cycle_id,
            forgotten=forgotten,
            since=since,
            until=until,
            held_out=config.held_out,
            replay_share=config.replay_share,
            context_turns=config.context_turns,
            adapters=tuple(config.adapters),
            seed=config.lora.seed,
            pending=state.get("pending") or {},
            qa_min_support=config.qa_min_support,
        )
        registry = AdapterRegistry(
            settings.models.registry_dir or AdapterRegistry.for_data_dir(settings.data_dir).root
        )
        report: dict[str, Any] = {
            "cycle": cycle_id,
            "since": since.isoformat() if since else None,
            "until": until.isoformat(),
            "dataset": dataset.manifest,
            "adapters": {},
        }
        in_service = _in_service_check(settings, config)
        gone = {user_hash(p, u) for p, u in forgotten}
        for name in config.adapters:
            train, held = dataset.for_adapter(name)
            if name == "sentiment":
                report["adapters"][name] = _train_sentiment(
                    config,
                    registry,
                    sum(e.source != "replay" for e in train + held),
                    Path(settings.data_dir) / "datasets",
                    gone,
                    cycle_id,
                    say,
                )
                continue
            earlier: list[Any] = []
            if config.gate_earlier_held_out:
                earlier = earlier_held_out(
                    Path(settings.data_dir) / "datasets",
                    cycle_id,
                    name,
                    train,
                    gone,
                )
                tonight = {e.key() for e in held}  # carried examples are in both
                earlier = [e for e in earlier if e.key() not in tonight]
            report["adapters"][name] = _train_one(
                settings,
                config,
                registry,
                name,
                train,
                held + earlier,
                dataset.manifest,
                cycle_id,
                say,
                in_service,
                earlier=len(earlier),
            )
        # An adapter skipped for too few examples keeps them for the next cycle; one that
        # trained (promoted or not) has used them.
        pending = dict(state.get("pending") or {})
        for name, r in report["adapters"].items():
            if r.get("decision") == "skipped" and r.get("too_few"):
                pending[name] = [cycle_id]  # this cycle's dataset holds the older ones too
            else:
                pending.pop(name, None)
        report["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
        out = trainers_dir(settings) / "reports" / cycle_id
        _write_reports(report, out, history=out.parent)
        atomic_write(
            trainers_dir(settings) / "state.json",
            json.dumps({"until": until.isoformat(), "last_cycle": cycle_id, "pending": pending}),
        )
        return report


def _in_service_check(settings: Any, config: CycleConfig) -> InServiceCheck | None:
    """The cycle's in-service check; its scenarios are read before any training, so a broken
    file fails the cycle at once rather than after an hour of it."""
    from trainers.in_service import InServiceCheck, gate_scenarios

    if not config.gate_in_service:
        return None
    return InServiceCheck(settings, gate_scenarios(config.gate_scenarios))


#: The gated figures a candidate must measurably improve (``gate_promote = "better"``); the
#: regression loss and the scenarios are held, not improved.
IMPROVEMENTS = frozenset({"held_out loss", "answer F1", "answer F1 in service"})


def _train_one(
    settings: Any,
    config: CycleConfig,
    registry: AdapterRegistry,
    name: str,
    train: list[Any],
    held: list[Any],
    manifest: dict[str, Any],
    cycle_id: str,
    say: Progress,
    in_service_check: InServiceCheck | None = None,
    *,
    earlier: int = 0,
) -> dict[str, Any]:
    """Train ``name`` on ``train``, gate it on ``held`` (this cycle's held-out examples, then
    ``earlier`` of earlier cycles'), promote it or not."""
    from peft import PeftModel

    from trainers.gate import answer_f1, compare
    from trainers.lora import (
        last_complete_checkpoint,
        load_for_training,
        reply_loss,
        train_lora,
    )
    from trainers.regression import regression_examples

    lora = config.lora
    if len(train) < lora.min_examples:
        msg = (
            f"skipped: {len(train)} training examples, fewer than min_examples {lora.min_examples}"
        )
        log.info("%s: %s (kept for the next cycle)", name, msg)
        return {
            "decision": "skipped",
            "why": msg + "; they are kept for the next cycle",
            "too_few": True,
            "train": len(train),
            "held_out": len(held),
        }
    if not held:
        return {
            "decision": "skipped",
            "why": "no held-out examples yet; the training examples are kept for the next cycle",
            "too_few": True,
            "train": len(train),
        }
    cache = settings.models.cache_dir or Path(settings.data_dir) / "models"
    started = time.perf_counter()
    model, tokenizer = load_for_training(
        settings.models.base_model, cache, settings.models.device, lora.precision
    )
    if model.device.type == "cpu":
        # The gate's answers are decoded a token at a time, as in serving: fp16 weight copies
        # make those steps ~1.8× faster on a CPU without native bf16, chinwag's own bf16
        # kernel ~1.3× on one with it (built by ``make``; cached). Training itself (with
        # gradients) always takes the plain layers (bot/models/cpu_linear.py).
        from bot.models import kernels
        from bot.models.cpu_linear import convert

        native = kernels.build() if settings.models.native_kernels else None
        convert(model, int8=False, fp16=settings.models.fp16_weights, native=native)
    current = registry.current(name)
    fixed = regression_examples(config.regression_size)

    asked = held[: config.gate_answers]

    def score(m: Any) -> dict[str, Any]:
        scored = {
            "held_out": reply_loss(m, tokenizer, held, lora.max_length),
            "regression": reply_loss(m, tokenizer, fixed, lora.max_length),
        }
        if asked:  # what users would see: its answers to the held-out prompts
            f1 = answer_f1(m, tokenizer, asked)
            scored["answers"] = {"f1": sum(f1) / len(f1), "per_example": f1}
        return scored

    say("baseline", 0, 1)
    if current is not None:
        served = PeftModel.from_pretrained(model, str(current.path), adapter_name="current")
        baseline = score(served)
        model = served.unload()  # the plain base model again, for the candidate
    else:
        baseline = score(model)
    say("baseline", 1, 1)
    checkpoints = trainers_dir(settings) / "checkpoints" / cycle_id / name
    resumed = last_complete_checkpoint(checkpoints)
    candidate, curve, stats = train_lora(model, tokenizer, train, lora, checkpoints, progress=say)
    say("evaluate", 0, 1)
    scored = score(candidate)
    say("evaluate", 1, 1)
    # Every gated figure must hold: this cycle's held-out replies, the fixed regression set
    # that poisoned data (a whole cycle of "lol") cannot also poison, and the answers to the
    # held-out prompts — each pair by pair, so that noise does not block a candidate.
    checks = [
        compare(
            f"{k} loss",
            baseline[k]["per_example"],
            scored[k]["per_example"],
            higher_is_better=False,
            margin=config.margin,
            alpha=config.gate_alpha,
            better_alpha=config.gate_better_alpha,
        )
        for k in ("held_out", "regression")
    ]
    if "answers" in scored and "answers" in baseline:
        checks.append(
            compare(
                "answer F1",
                baseline["answers"]["per_example"],
                scored["answers"]["per_example"],
                higher_is_better=True,
                margin=config.margin,
                alpha=config.gate_alpha,
                better_alpha=config.gate_better_alpha,
            )
        )
    worse = [c.why() for c in checks if c.worse]
    trained = time.perf_counter()
    meta = {
        "kind": "generative",
        "base_model": settings.models.base_model,
        "cycle": cycle_id,
        "dataset_sha256": manifest.get("sha256"),
        "metrics": {
            "held_out_loss": scored["held_out"]["loss"],
            "held_out_perplexity": scored["held_out"]["perplexity"],
            "regression_loss": scored["regression"]["loss"],
        },
        "baseline": {
            "version": current.version if current else None,
            "held_out_loss": baseline["held_out"]["loss"],
            "regression_loss": baseline["regression"]["loss"],
        },
        "lora": lora.model_dump(),
        "promoted": False,
    }
    # Published (not promoted) first: the in-service check serves this very folder.
    entry = registry.publish(name, lambda folder: candidate.save_pretrained(folder), meta)
    in_service_report: dict[str, Any] | None = None
    # Asked again, the version in service repeats the replies it wrote itself word for word
    # (greedy): scored against those, any change would look worse. Its own liked replies are
    # left to the losses; the questions are those an operator corrected or an earlier
    # version answered.
    serving = current.version if current else ""
    questions = [
        (e.asked, e.messages[-1]["content"])
        for e in asked
        if e.asked and (e.source == "correction" or e.written_by != serving)
    ]
    if not worse and in_service_check is not None and (questions or in_service_check.scenarios):
        # Only a candidate the other checks pass is worth putting in service to try.
        say("in service", 0, 1)
        checking = time.perf_counter()
        now_serving = tuple(
            (n, v.version) for n in registry.names() if (v := registry.current(n)) is not None
        )
        try:
            found, in_service_report = in_service_check.check(
                name,
                entry.path,
                entry.version,
                now_serving,
                questions,
                margin=config.margin,
                alpha=config.gate_alpha,
                better_alpha=config.gate_better_alpha,
            )
        except Exception as exc:  # an unverified candidate stays out of service
            log.exception("%s: the in-service check could not run", name)
            worse.append(f"the in-service check could not run ({type(exc).__name__}: {exc})")
        else:
            checks += found
            worse += [c.why() for c in found if c.worse]
        say("in service", 1, 1)
        in_service_report = {
            **(in_service_report or {}),
            "seconds": round(time.perf_counter() - checking, 1),
        }
    # The promise: a candidate replaces the one in service only when it measurably beats it
    # on what it was trained to improve, not merely when nothing shows it worse.
    gains = [c for c in checks if c.figure in IMPROVEMENTS]
    unproven = not worse and config.gate_promote == "better" and not any(c.better for c in gains)
    passed = not worse and not unproven
    result: dict[str, Any] = {
        "train": len(train),
        "held_out": len(held),
        "held_out_earlier": earlier,
        "regression": len(fixed),
        "in_service": current.version if current else None,
        "baseline": baseline,
        "candidate": scored,
        "loss_delta": {
            k: scored[k]["loss"] - baseline[k]["loss"] for k in ("held_out", "regression")
        },
        "gate": {c.figure: c.as_dict() for c in checks},
        "in_service_check": in_service_report,
        "margin": config.margin,
        "curve": curve,
        # Loading, scoring and training; the in-service check's time is its own.
        "train_seconds": round(trained - started, 1),
        "resumed_from": resumed.name if resumed else None,
        "version": entry.version,
        **stats,
    }
    if passed:
        registry.annotate(name, entry.version, {"promoted": True})
        registry.promote(
            name,
            entry.version,
            reason=("measurably better, " if config.gate_promote == "better" else "")
            + "not measurably worse: "
            + "; ".join(c.why() for c in checks),
        )
        result["decision"] = "promoted"
    elif unproven:
        result["decision"] = "rejected"
        result["why"] = (
            f"not measurably better than {result['in_service'] or 'the base model'}: "
            + "; ".join(c.why() for c in gains)
        )
    else:
        result["decision"] = "rejected"
        result["why"] = f"worse than {result['in_service'] or 'the base model'}: " + "; ".join(
            worse
        )
    _write_reports({"adapter": name, **result}, entry.path / "report")
    shutil.rmtree(checkpoints, ignore_errors=True)
    log.info("%s: %s (%s)", name, result["decision"], entry.version)
    return result


def _train_sentiment(
    config: CycleConfig,
    registry: AdapterRegistry,
    new_labels: int,
    datasets_dir: Path,
    forgotten: set[str],
    cycle_id: str,
    say: Progress,
) -> dict[str, Any]:
    """Tune the classifier on every operator label so far; gate it pair by pair against the
    version in service on the operators' held-out labels and on the original held-out set.

    The operators' labels are the users' own domain (what the classifier is there to get
    right); the original held-out set guards against forgetting what it knew. On each the
    candidate is held back when it is wrong on significantly more messages that the one in
    service gets right than the other way round (McNemar's test: the sign test of
    trainers/gate.py on the messages where exactly one of the two is right).
    """
    import time

    import numpy as np

    from bot.models.classifier import LoadedClassifier
    from trainers.dataset import operator_labels
    from trainers.gate import compare
    from trainers.metrics import classification_report
    from trainers.sentiment import (
        LABELS,
        SentimentTrainConfig,
        held_out_set,
        train_sentiment,
        tune_sentiment,
    )
    from trainers.sentiment import Example as Labelled

    if not new_labels:
        return {"decision": "skipped", "why": "no operator-labelled messages since the last cycle"}
    cfg = SentimentTrainConfig.model_validate(config.sentiment)

    def convert(examples: list[Any]) -> list[Labelled]:
        return [
            Labelled(
                e.messages[0]["content"], LABELS.index(e.messages[1]["content"]), e.conversation
            )
            for e in examples
        ]

    train, held = (convert(side) for side in operator_labels(datasets_dir, forgotten))
    current = registry.current("sentiment")
    started = time.perf_counter()
    if current is None:  # nothing to tune: the full training, with the labels beside the data
        entry = train_sentiment(registry, cfg, promote=False, progress=say, extra_train=train)
    else:
        entry = tune_sentiment(registry, current, train, cfg, progress=say)
    seconds = round(time.perf_counter() - started, 1)
    sets = {"operators": ([e.text for e in held], [e.label for e in held])}
    sets["original"] = held_out_set(cfg)

    def score(version: Any) -> dict[str, tuple[dict[str, Any], np.ndarray]]:
        """Per held-out set: the classification report and which messages it got right."""
        clf = LoadedClassifier(version, "cpu")
        out = {}
        for name, (texts, y) in sets.items():
            if texts:
                probs = clf.predict(texts)
                out[name] = (
                    classification_report(y, probs, LABELS),
                    probs.argmax(1) == np.array(y),
                )
        return out

    def figures(scored: dict[str, tuple[dict[str, Any], np.ndarray]]) -> dict[str, Any]:
        keep = ("accuracy", "macro_f1", "roc_auc", "n")
        return {name: {k: report[k] for k in keep} for name, (report, _) in scored.items()}

    versions = 2 if current else 1
    say("evaluate", 0, versions)
    cand = score(entry)
    say("evaluate", 1, versions)
    # `chinwag adapters list` and the first-start logic read a classifier's "metrics": the
    # original held-out set's report, as a full training writes it.
    reports = {name: report for name, (report, _) in cand.items()}
    registry.annotate(
        "sentiment",
        entry.version,
        {"metrics": reports.get("original"), "operator_metrics": reports.get("operators")},
    )
    result: dict[str, Any] = {
        "mode": "tuned" if current else "trained",
        "new_labels": new_labels,
        "train_labels": len(train),
        "held_out_labels": len(held),
        "in_service": current.version if current else None,
        "version": entry.version,
        "train_seconds": seconds,
        "candidate": figures(cand),
    }
    worse: list[str] = []
    if current is not None:
        base = score(current)
        say("evaluate", 2, versions)
        result["baseline"] = figures(base)
        result["gate"] = {}
        for name in cand:
            c = compare(
                f"{name} labels right",
                base[name][1].astype(float).tolist(),
                cand[name][1].astype(float).tolist(),
                higher_is_better=True,
                margin=config.margin,
                alpha=config.gate_alpha,
            )
            result["gate"][name] = c.as_dict()
            if c.worse:
                worse.append(c.why())
    if worse:
        result["decision"] = "rejected"
        result["why"] = f"worse than {current.version}: " + "; ".join(worse)  # type: ignore[union-attr]
    else:
        registry.promote("sentiment", entry.version, reason=f"cycle {cycle_id}: gate passed")
        result["decision"] = "promoted"
    _write_reports({"adapter": "sentiment", **result}, entry.path / "report")
    log.info("sentiment: %s (%s)", result["decision"], entry.version)
    return result


def _write_reports(report: dict[str, Any], out: Path, *, history: Path | None = None) -> None:
    """JSON and HTML (loss curves, held-out loss before/after) beside the data; with
    ``history`` (the folder of every cycle's report), the nights so far as well."""
    from trainers import history as nights
    from trainers.page import Section, Text, image, plt, render, table

    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "report.json", json.dumps(report, indent=2, default=str))
    adapters = report.get("adapters") or {report.get("adapter", "adapter"): report}
    pyplot = plt()
    sections = []
    for name, r in adapters.items():
        blocks: list[Any] = [Text(r["why"])] if r.get("why") else []
        if r.get("curve"):
            fig, ax = pyplot.subplots(figsize=(5.5, 3))
            ax.plot([c["step"] for c in r["curve"]], [c["loss"] for c in r["curve"]])
            ax.set_xlabel("step")
            ax.set_ylabel("training loss")
            ax.set_title("Training loss")
            blocks.append(image(fig, f"{name} training loss"))
        if r.get("candidate") and "held_out" not in r["candidate"]:  # a classifier's figures
            before = r.get("baseline") or {}
            sets = list(r["candidate"])
            fig, ax = pyplot.subplots(figsize=(5, 3))
            for i, (who, figures, color) in enumerate(
                (("in service", before, "#999"), ("candidate", r["candidate"], "#4c78a8"))
            ):
                if figures:
                    ax.bar(
                        [j + (i - 0.5) * 0.4 for j in range(len(sets))],
                        [figures.get(k, {}).get("macro_f1") or 0 for k in sets],
                        0.4,
                        label=who,
                        color=color,
                    )
            ax.set_xticks(range(len(sets)), [f"{k} held-out" for k in sets])
            ax.set_ylabel("macro-F1")
            ax.set_ylim(0, 1)
            ax.set_title("Gate: higher is better")
            ax.legend()
            blocks.append(image(fig, f"{name} gate"))
            rows = [
                [f"{k}: {figure}", (before.get(k) or {}).get(figure), v]
                for k, figures in r["candidate"].items()
                for figure, v in figures.items()
            ]
            rows += [
                [f"{k}: messages only it labels right", c["worse_on"], c["better_on"]]
                for k, c in (r.get("gate") or {}).items()
            ]
            blocks.append(table(["figure", "in service", "candidate"], rows))
        elif r.get("baseline") and r.get("candidate"):
            sets = ["held_out", "regression"]
            fig, ax = pyplot.subplots(figsize=(5, 3))
            x = range(len(sets))
            ax.bar(
                [i - 0.2 for i in x],
                [r["baseline"][k]["loss"] for k in sets],
                0.4,
                label="in service",
                color="#999",
            )
            ax.bar(
                [i + 0.2 for i in x],
                [r["candidate"][k]["loss"] for k in sets],
                0.4,
                label="candidate",
                color="#4c78a8",
            )
            ax.set_xticks(list(x), sets)
            ax.set_ylabel("reply loss")
            ax.set_title("Gate: lower is better")
            ax.legend()
            blocks.append(image(fig, f"{name} gate"))
            rows = [
                [f"{k} loss", f"{r['baseline'][k]['loss']:.4f}", f"{r['candidate'][k]['loss']:.4f}"]
                for k in sets
            ]
            if "answers" in r["baseline"] and "answers" in r["candidate"]:
                rows.append(
                    [
                        "answer F1 (held-out prompts)",
                        r["baseline"]["answers"]["f1"],
                        r["candidate"]["answers"]["f1"],
                    ]
                )
            blocks.append(table(["set", "in service", "candidate"], rows))
        checked = r.get("in_service_check") or {}
        if checked.get("questions"):
            q = checked["questions"]
            blocks.append(
                table(
                    ["asked (candidate in service)", "in service F1", "candidate F1"],
                    [[x["asked"][:120], f"{x['f1'][0]:.2f}", f"{x['f1'][1]:.2f}"] for x in q],
                    title="Held-out questions asked again, the candidate in service",
                )
            )
        if checked.get("scenarios"):
            s = checked["scenarios"]
            blocks.append(
                Text(
                    f"Scenarios with the candidate in service: {s['candidate_passed']} of "
                    f"{s['checked']} passed ({s['in_service_passed']} with the adapters in "
                    f"service); broken {len(s['broken'])}, fixed {len(s['fixed'])}."
                )
            )
            for b in s["broken"]:
                blocks.append(
                    table(
                        ["in service", "candidate"],
                        [[b["in_service"], b["candidate"]]],
                        title=f"Broken by the candidate: {b['scenario']}",
                    )
                )
        sections.append(Section(f"{name}: {r.get('decision')}", blocks))
    if history is not None:
        try:
            sections.append(Section("Night by night", nights.blocks(nights.nights(history))))
        except Exception:  # tonight's report matters more than the curve
            log.exception("training report: could not draw the nights so far")
    title = f"Training cycle {report.get('cycle', '')}"
    atomic_write(out / "report.html", render(title, sections))
