"""Sentiment on every inbound message, ``/mood``, and escalation to a human.

An observer labels each message negative / neutral / positive through the runtime's
``sentiment`` classifier (MiniLM + LoRA, batched across chats) and stores the label with the
message. Several negative messages in a row from one user call the ``escalate`` hook once; the
built-in implementation below notifies the configured admin chats. When no sentiment adapter
exists yet, the first start trains one (trainers/sentiment.py), showing progress.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, Field

from bot import Command, Context, Escalation, Message, Reply, Skill, hookimpl
from bot.models.classifier import NoClassifier, describe
from bot.process import die_with_parent
from bot.progress import duration

log = logging.getLogger(__name__)

#: Labels that missed the observer's budget still arrive (stored when ready), up to this many
#: at once and within this long.
LATE_LABELS = 1024
LATE_WITHIN_S = 120.0

EMOJI = {"negative": "😞", "neutral": "😐", "positive": "😊"}


class SentimentConfig(BaseModel):
    model_config = {"extra": "forbid"}

    classifier: str = "sentiment"
    #: Train the first adapter at start-up when none exists (takes minutes; progress shown).
    train_if_missing: bool = True
    #: Train in a child process while the bot already answers (labels start once it is done);
    #: off: start-up waits for the adapter.
    train_in_background: bool = True
    #: Options for that first training (see trainers/sentiment.py: epochs, rank, …).
    training: dict[str, Any] = {}
    #: Scheduling priority of that training process: the bot's replies come first.
    training_nice: int = Field(15, ge=0, le=19)
    #: Negative messages in a row from one user that call the escalate hook; 0 disables.
    escalate_after: int = Field(3, ge=0)
    #: A message counts as negative for escalation only with at least this confidence.
    negative_min_score: float = Field(0.5, ge=0, le=1)
    #: Chats the built-in escalation notice goes to, as "platform:chat_id".
    notify: list[str] = []
    #: Messages ``/mood`` summarises.
    mood_window: int = Field(20, ge=1, le=500)


@dataclass(slots=True)
class _Streak:
    count: int = 0
    texts: list[str] = field(default_factory=list)


class SentimentSkill(Skill):
    """Both a skill (``/mood``) and an observer (labels every message)."""

    name = "sentiment"
    description = "Reads the mood of the conversation and calls a human when it turns sour."
    commands = (
        Command("mood", "How this chat has been feeling lately"),
        Command(
            "label",
            "Confirm or correct the sentiment of the previous message (negative, neutral, "
            "positive)",
            admin_only=True,
        ),
    )
    config_model = SentimentConfig
    priority = 60
    threshold = 2.0  # commands only

    # One object serves every Bot in the process (plugins are modules), so per-bot state —
    # the configuration and the negative streaks — lives on the bot, never on the skill.

    @staticmethod
    def _config(bot: Any) -> SentimentConfig:
        entry = bot.skill("sentiment")
        return entry.config if entry is not None and entry.config else SentimentConfig()

    @staticmethod
    def _streaks(bot: Any) -> OrderedDict[str, _Streak]:
        return bot.services.setdefault("sentiment.streaks", OrderedDict())

    async def setup(self, bot: Any, config: SentimentConfig) -> None:
        registry = bot.models.registry
        current = registry.current(config.classifier)
        if not bot.settings.models.first_start_training:
            config = config.model_copy(update={"train_if_missing": False})

        def warm() -> asyncio.Task[bool]:
            """Load the version in service now, so the first message does not pay for it."""
            warming = asyncio.create_task(bot.models.classifiers.warm(config.classifier))
            bot.services["sentiment.warming"] = warming
            return warming

        if current is not None:
            bot.warmups.append(warm())
            if current.meta.get("stage") != "head" or not config.train_if_missing:
                return
            # Only the quick first classifier serves: a start that was stopped before its
            # training ended goes on with it (from its last checkpoint), in the background.
            log.info(
                "sentiment %s is the quick first classifier: training a better one",
                current.version,
            )
        elif not config.train_if_missing:
            log.warning(
                "no %r classifier in service and first-start training is off: messages will not "
                "be labelled",
                config.classifier,
            )
            return

        def on_ready(_version: str) -> None:
            warm()  # the quick classifier is published: serve it while training goes on

        async def train_then_load() -> bool:
            ok = await train_in_subprocess(registry.root, config, on_ready=on_ready)
            return ok and await bot.models.classifiers.warm(config.classifier)

        training = train_then_load()
        if config.train_in_background or current is not None:
            # The bot answers meanwhile; labels start once the adapter is promoted (the
            # runtime picks promotions up by itself).
            bot.services["sentiment.training"] = asyncio.create_task(training)
        else:
            await training

    # -- observer --------------------------------------------------------------------------

    async def observe(self, message: Message, ctx: Context) -> None:
        text = message.text.strip()
        if not text or text.startswith("/"):
            return
        config = self._config(ctx.bot)
        bot = ctx.bot
        labelling = asyncio.ensure_future(bot.models.classify([text], config.classifier))
        # Within the core's observer budget when the machine allows; otherwise the message
        # goes on unlabelled for now and its label is stored when it is ready — a busy machine
        # or a classifier still loading must not leave messages unlabelled for good.
        budget = 0.8 * bot.settings.bot.observer_timeout_s
        done, _ = await asyncio.wait({labelling}, timeout=budget)
        if not done:
            pending = bot.services.setdefault("sentiment.late", set())
            if len(pending) >= LATE_LABELS:  # bounded: past that, labels are dropped
                labelling.cancel()
                log.warning(
                    "sentiment: %d labels already late; this message stays unlabelled", len(pending)
                )
                return
            task = asyncio.ensure_future(self._label_late(message, ctx, config, labelling))
            pending.add(task)
            task.add_done_callback(pending.discard)
            return
        await self._apply(message, ctx, config, labelling)

    async def _apply(
        self, message: Message, ctx: Context, config: SentimentConfig, labelling: Any
    ) -> bool:
        try:
            (result,) = labelling.result()
        except NoClassifier:
            if not ctx.bot.services.get("sentiment.warned"):
                log.warning("sentiment: no classifier in service; messages are not labelled")
                ctx.bot.services["sentiment.warned"] = True
            return False
        message.metadata["sentiment"] = describe(result)
        await self._track(message, result.label, result.score, ctx, config)
        return True

    async def _label_late(
        self, message: Message, ctx: Context, config: SentimentConfig, labelling: Any
    ) -> None:
        try:
            await asyncio.wait({labelling}, timeout=LATE_WITHIN_S)
            if not labelling.done():
                labelling.cancel()
                log.warning(
                    "sentiment: no label within %.0fs; message left unlabelled", LATE_WITHIN_S
                )
                return
            if await self._apply(message, ctx, config, labelling) and message.id is not None:
                ctx.bot.store.update_metadata_nowait(message.id, message.metadata)
        except Exception:
            log.exception("sentiment: a late label failed")

    async def _track(
        self, message: Message, label: str, score: float, ctx: Context, config: SentimentConfig
    ) -> None:
        after = config.escalate_after
        if after <= 0:
            return
        streaks = self._streaks(ctx.bot)
        key = f"{message.chat_key}:{message.user_id}"
        streak = streaks.pop(key, None) or _Streak()
        streaks[key] = streak
        while len(streaks) > 10_000:
            streaks.popitem(last=False)
        if label != "negative" or score < config.negative_min_score:
            streak.count, streak.texts = 0, []
            return
        streak.count += 1
        streak.texts = [*streak.texts, message.text][-after:]
        if streak.count == after:  # exactly once per run of negative messages
            message.metadata["escalated"] = True
            await ctx.bot.escalate(
                Escalation(
                    platform=message.platform,
                    chat_id=message.chat_id,
                    user_id=message.user_id,
                    user_name=message.user_name,
                    chat_title=message.chat_title,
                    reason=f"{after} negative messages in a row",
                    messages=list(streak.texts),
                )
            )

    # -- /mood -----------------------------------------------------------------------------

    async def handle(self, message: Message, ctx: Context) -> Reply:
        if ctx.command == "label":
            return await self._label(message, ctx)
        window = ctx.config.mood_window
        turns = await ctx.bot.store.last_turns(
            message.platform, message.chat_id, window * 3, before_id=message.id
        )
        labelled = [
            t.meta["sentiment"]
            for t in turns
            if t.direction == "in" and isinstance(t.meta.get("sentiment"), dict)
        ][-window:]
        if not labelled:
            return Reply("I haven't read enough messages here to tell the mood yet.")
        counts = {k: sum(1 for s in labelled if s["label"] == k) for k in EMOJI}
        values = [_valence(s) for s in labelled]
        average = sum(values) / len(values)
        trend = ""
        if len(values) >= 4:
            half = len(values) // 2
            delta = sum(values[half:]) / (len(values) - half) - sum(values[:half]) / half
            trend = (
                ", getting better"
                if delta > 0.2
                else ", getting worse"
                if delta < -0.2
                else ", steady"
            )
        parts = " · ".join(f"{EMOJI[k]} {counts[k]} {k}" for k in EMOJI)
        return Reply(
            f"Mood of the last {len(labelled)} messages: {parts} (average {average:+.2f}{trend}).",
            metadata={"mood": counts, "average": round(average, 3)},
        )

    async def _label(self, message: Message, ctx: Context) -> Reply:
        """``/label positive``: the operator's label for the previous user message.

        Stored as feedback on that message (``source = "label"``); the training cycle learns
        from these beside the original data, so the classifier adapts to this bot's users.
        """
        label = ctx.args.strip().lower()
        if label not in EMOJI:
            return Reply("Usage: /label negative|neutral|positive", kind="notice")
        turns = await ctx.bot.store.last_turns(
            message.platform, message.chat_id, 20, before_id=message.id
        )
        target = next(
            (t for t in reversed(turns) if t.direction == "in" and not t.text.startswith("/")),
            None,
        )
        if target is None:
            return Reply("There's no earlier message here to label.", kind="notice")
        await ctx.bot.store.add_feedback(
            target.id, message.platform, message.user_id, 0, correction=label, source="label"
        )
        was = (target.meta.get("sentiment") or {}).get("label")
        verdict = "confirmed" if was == label else f"corrected from {was}" if was else "labelled"
        return Reply(f"{EMOJI[label]} {verdict}: “{target.text[:80]}” is {label}.")


def _valence(s: dict[str, Any]) -> float:
    scores = s.get("scores") or {}
    return float(scores.get("positive", 0.0)) - float(scores.get("negative", 0.0))


def _child_setup(nice: int) -> None:
    """In the trainer child before exec: lower its priority, and let it die with the bot
    (even a SIGKILLed bot: no orphan trainer holding the lock the next start waits on)."""
    die_with_parent()
    if nice:
        os.nice(nice)


async def train_in_subprocess(
    registry_root: Any,
    config: SentimentConfig,
    on_ready: Callable[[str], None] | None = None,
) -> bool:
    """Train the first adapter in a child process (``python -m trainers.sentiment``).

    A child process, not a thread: training saturates the CPU and holds the GIL in places, and
    it must never stall the event loop or take the bot down if it crashes. The child promotes
    a quick classifier (frozen encoder + fitted head) within about a minute — ``on_ready`` gets
    its version — then trains LoRA, resumable from checkpoints. Progress is logged every 10 %
    with an estimate of the time left; returns whether an adapter is in service afterwards.
    """
    import json

    log.info("sentiment: preparing a first classifier (about a minute), then a better one")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "trainers.sentiment",
        "--registry",
        str(registry_root),
        "--options",
        json.dumps(config.training),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        preexec_fn=functools.partial(_child_setup, config.training_nice),
    )
    shown: dict[str, int] = {}
    began: dict[str, tuple[float, int]] = {}  # stage → (when, done) at its first report
    said: list[str] = []  # its last words, for the log when it fails
    try:
        assert proc.stdout is not None
        async for raw in proc.stdout:
            line = raw.decode(errors="replace").strip()
            parts = line.split()
            if parts[:1] == ["progress"] and len(parts) == 4:
                stage, done, total = parts[1], int(parts[2]), int(parts[3])
                now = time.monotonic()
                since, first = began.setdefault(stage, (now, done))
                pct = 100 * done // total if total else 100
                if pct // 10 != shown.get(stage, -1) // 10 or done == total:
                    shown[stage] = pct
                    left = ""
                    if first < done < total:
                        seconds = (now - since) / (done - first) * (total - done)
                        left = f", about {duration(seconds)} left"
                    log.info("sentiment training: %s %d/%d (%d%%%s)", stage, done, total, pct, left)
            elif parts[:1] == ["ready"] and len(parts) >= 3:
                log.info(
                    "sentiment %s serves from now (held-out accuracy %s); "
                    "training a better one in the background",
                    parts[1],
                    parts[2],
                )
                if on_ready is not None:
                    on_ready(parts[1])
            elif line:
                said = [*said[-2:], line]
                log.info("sentiment training: %s", line)
        _, err = await proc.communicate()
    except asyncio.CancelledError:
        proc.terminate()  # the registry is untouched: versions are published atomically
        await proc.wait()
        raise
    if proc.returncode != 0:
        # The reason is on stderr (a traceback) or, for a refusal such as "busy another
        # process is training", on stdout.
        tail = err.decode(errors="replace").strip().splitlines()[-3:] or said
        reason = " | ".join(tail) or "no output"
        log.error("sentiment training failed (exit %s): %s", proc.returncode, reason)
        return False
    return True


SKILL = SentimentSkill()


@hookimpl
def register_skills(register):
    register(SKILL)


@hookimpl
def register_observers(register):
    register(SKILL)


@hookimpl
def shutdown(bot):
    warming = bot.services.pop("sentiment.warming", None)
    if warming is not None and not warming.done():
        warming.cancel()
    for late in bot.services.pop("sentiment.late", set()):
        late.cancel()  # the store is closing: those messages stay unlabelled (logged as such)
    task = bot.services.pop("sentiment.training", None)
    if task is None or task.done():
        return None
    log.warning(
        "stopping while the sentiment adapter trains; the next start resumes from its last "
        "checkpoint"
    )

    async def stop_training() -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    return stop_training()


@hookimpl
def escalate(bot, event: Escalation):
    """The built-in escalation: a notice to every chat in ``[skills.sentiment] notify``."""
    entry = bot.skill("sentiment")
    targets = entry.config.notify if entry is not None and entry.config is not None else []
    if not targets:
        log.warning(
            "escalation in %s:%s (%s) but [skills.sentiment] notify lists no admin chats",
            event.platform,
            event.chat_id,
            event.reason,
        )
        return None
    who = event.user_name or event.user_id
    where = f"{event.platform}:{event.chat_id}" + (
        f" ({event.chat_title})" if event.chat_title else ""
    )
    quoted = "\n".join(f"  “{t[:200]}”" for t in event.messages)
    text = f"⚠️ {who} in {where} may need a human: {event.reason}.\n{quoted}"

    async def send() -> None:
        for target in targets:
            platform, _, chat_id = target.partition(":")
            await bot.push(platform, chat_id, Reply(text, kind="notice", skill="sentiment"))

    return send()
