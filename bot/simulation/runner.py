"""Running scenarios through the real core and reporting the outcome.

Each scenario gets its own chat (ids unique to the run), so independent scenarios run
concurrently on one bot, as real chats do. A scenario stops at its first failing turn: later
turns build on that answer, and their failures would only repeat the first one. The failure
report shows the conversation so far, which is what a reader needs to see why.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bot.core import Bot
from bot.messages import Reply
from bot.simulation.chat import ChatUser
from bot.simulation.scenarios import Expect, Scenario

RATINGS = {"good": 1, "bad": -1}
#: The service (and configuration section) a scenario's ``knowledge`` documents go to: a
#: role any plugin may fill — the built-in knowledge plugin does.
KNOWLEDGE = "knowledge"


@dataclass
class TurnResult:
    user: str
    said: str
    replies: list[Reply]
    sentiment: str | None = None
    failures: list[str] = field(default_factory=list)


@dataclass
class ScenarioResult:
    scenario: Scenario
    turns: list[TurnResult] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0
    #: Why the scenario could not be checked on this bot (a component it needs is missing).
    skipped: str | None = None

    @property
    def passed(self) -> bool:
        return (
            self.skipped is None and self.error is None and not any(t.failures for t in self.turns)
        )

    @property
    def failed(self) -> bool:
        return self.skipped is None and not self.passed

    @property
    def failures(self) -> list[str]:
        found = [f for t in self.turns for f in t.failures]
        return found + ([self.error] if self.error else [])

    def transcript(self) -> str:
        """The conversation so far, failures marked under the turn they belong to."""
        lines = []
        for i, t in enumerate(self.turns, 1):
            mood = f"  [{t.sentiment}]" if t.sentiment else ""
            lines.append(f"  {i}. {t.user}: {t.said}{mood}")
            for r in t.replies or []:
                ms = f", {r.latency_ms:.0f} ms" if r.latency_ms is not None else ""
                text = r.text if len(r.text) < 600 else r.text[:600] + " …"
                lines.append(f"     bot ({r.skill}{ms}): " + text.replace("\n", "\n       "))
            if not t.replies:
                lines.append("     bot: (no reply)")
            lines.extend(f"     ✗ {f}" for f in t.failures)
        if self.error:
            lines.append(f"  ✗ {self.error}")
        return "\n".join(lines)


def check(expect: Expect, replies: list[Reply], sentiment: str | None) -> list[str]:
    """The expectations of one turn that the replies do not meet, in words."""
    failures: list[str] = []
    text = "\n".join(r.text for r in replies)
    skills = {r.skill for r in replies}
    if expect.skill is not None:
        if expect.skill == "none":
            if replies:
                failures.append(
                    f"expected no reply, got one from {sorted(s or '?' for s in skills)}"
                )
        elif expect.skill not in skills:
            got = sorted(s or "?" for s in skills) or "no reply"
            failures.append(f"expected skill {expect.skill!r}, answered by {got}")
    low = text.casefold()
    failures += [
        f"reply does not contain {c!r}" for c in expect.contains if c.casefold() not in low
    ]
    failures += [f"reply contains {c!r}" for c in expect.not_contains if c.casefold() in low]
    if expect.matches is not None and not re.search(expect.matches, text, re.I | re.S):
        failures.append(f"reply does not match /{expect.matches}/")
    sources = [s for r in replies for s in r.sources]
    if expect.cites is True and not sources:
        failures.append("reply cites no source")
    elif expect.cites is False and sources:
        failures.append(f"reply cites {sources[0].title!r}, expected no source")
    elif isinstance(expect.cites, str):
        needle = expect.cites.casefold()
        if not any(needle in f"{s.title} {s.location}".casefold() for s in sources):
            titles = [s.title for s in sources] or "nothing"
            failures.append(f"no cited source matches {expect.cites!r} (cited {titles})")
    if expect.abstains is not None:
        abstained = any(r.metadata.get("abstained") for r in replies)
        if abstained != expect.abstains:
            failures.append("expected an abstention" if expect.abstains else "the bot abstained")
    if expect.sentiment is not None and sentiment != expect.sentiment:
        failures.append(f"user's message labelled {sentiment!r}, expected {expect.sentiment!r}")
    if expect.max_latency_ms is not None:
        slow = [r.latency_ms for r in replies if (r.latency_ms or 0) > expect.max_latency_ms]
        if slow:
            failures.append(
                f"took {max(s or 0 for s in slow):.0f} ms, limit {expect.max_latency_ms:.0f} ms"
            )
    return failures


async def run_scenario(
    bot: Bot, scenario: Scenario, *, run_id: str | None = None
) -> ScenarioResult:
    run_id = run_id or uuid.uuid4().hex[:8]
    chat_id = f"{_slug(scenario.name)}-{run_id}"
    setup = scenario.chat
    users = {
        name: ChatUser(
            bot,
            platform=setup.platform,
            chat_id=chat_id,
            user_id=f"{name}-{chat_id}",
            user_name=name,
            chat_kind=setup.kind,
        )
        for name in setup.users
    }
    result = ScenarioResult(scenario)
    started = time.perf_counter()
    try:
        for turn in scenario.turns:
            name = turn.user or setup.users[0]
            user = users[name]
            replies = await user.send(turn.say)
            label = (user.sent[-1].metadata.get("sentiment") or {}).get("label")
            if turn.expect.sentiment is not None and label is None:
                await _late_labels(bot)  # a busy machine labels after the reply
                label = (user.sent[-1].metadata.get("sentiment") or {}).get("label")
            if turn.expect.sentiment is not None and label is None and _no_classifier(bot):
                result.skipped = NO_CLASSIFIER
                break
            outcome = TurnResult(name, turn.say, replies, label, check(turn.expect, replies, label))
            result.turns.append(outcome)
            if turn.rate is not None:
                rated = [r for r in replies if r.id is not None]
                if not rated:
                    outcome.failures.append(f"nothing to rate {turn.rate!r}: no logged reply")
                for r in rated:
                    assert r.id is not None
                    await bot.store.add_feedback(
                        r.id, setup.platform, user.user_id, RATINGS[turn.rate], source="simulated"
                    )
            if outcome.failures:
                break
    except Exception as exc:  # a crashed scenario is a failed one, with its reason shown
        result.error = f"{type(exc).__name__}: {exc}"
    result.seconds = time.perf_counter() - started
    return result


async def run_all(
    bot: Bot, scenarios: list[Scenario], *, concurrency: int = 8, on_done: Any = None
) -> list[ScenarioResult]:
    """Every scenario, ``concurrency`` at a time, results in the scenarios' order."""
    gate = asyncio.Semaphore(max(1, concurrency))
    run_id = uuid.uuid4().hex[:8]

    async def one(s: Scenario) -> ScenarioResult:
        async with gate:
            result = await run_scenario(bot, s, run_id=run_id)
        if on_done is not None:
            on_done(result)
        return result

    return list(await asyncio.gather(*(one(s) for s in scenarios)))


def scratch_settings(settings: Any, tmp: Path) -> Any:
    """Same bot — knowledge index, adapters, models — but a throwaway conversation log."""
    s = settings.model_copy(deep=True)
    s.models.registry_dir = settings.models.registry_dir or settings.data_dir / "adapters"
    s.database.url = f"sqlite+aiosqlite:///{tmp / 'simulate.sqlite3'}"
    s.rate_limit.enabled = False
    # A measurement must not change what it measures: no first-start training into the
    # operator's registry (the classifier in service, if any, is what gets evaluated).
    s.models.first_start_training = False
    return s


async def simulate(
    settings: Any,
    scenarios: list[Scenario],
    *,
    concurrency: int = 8,
    on_done: Any = None,
    workdir: Path,
    then: Callable[[Bot], Awaitable[None]] | None = None,
) -> list[ScenarioResult]:
    """Scenarios on bots built from ``settings``: one bot per distinct ``knowledge`` list.

    Scenarios without ``knowledge`` use the configured index; the others get an index of
    their own under ``workdir``, built from their documents before the first turn.
    ``then`` gets the bot on the configured index once its scenarios are done (one is
    started for it if no scenario needs it): more checks without loading the models again.
    """
    groups: dict[tuple[Path, ...], list[Scenario]] = {}
    if then is not None:
        groups[()] = []
    for s in scenarios:
        groups.setdefault(tuple(s.knowledge_paths()), []).append(s)
    results: dict[int, ScenarioResult] = {}
    for n, (docs, group) in enumerate(groups.items()):
        run_settings = settings
        if docs:
            # The scenario format's ``knowledge`` documents go to whichever plugin provides
            # the "knowledge" service, through its [knowledge] section's ``directory``.
            run_settings = settings.model_copy(deep=True)
            run_settings.sections.setdefault(KNOWLEDGE, {})["directory"] = str(
                workdir / f"knowledge-{n}"
            )
        async with Bot(run_settings) as bot:
            await bot.warmed()
            if docs:
                service = bot.services.get(KNOWLEDGE)
                if service is None:
                    raise RuntimeError("scenarios list knowledge but no knowledge plugin is loaded")
                await service.add(list(docs))
            for s, r in zip(
                group,
                await run_all(bot, group, concurrency=concurrency, on_done=on_done),
                strict=True,
            ):
                results[id(s)] = r
            if then is not None and not docs:
                await then(bot)
    return [results[id(s)] for s in scenarios]


#: A fresh install trains its sentiment classifier on first start (or ``chinwag train``); until
#: then a scenario expecting labels cannot be checked — which is not the bot failing it.
NO_CLASSIFIER = (
    "no sentiment classifier in service yet, so messages are not labelled (the first "
    "`chinwag run` trains one; or `chinwag train --now`)"
)


async def _late_labels(bot: Bot) -> None:
    """Wait for labels the sentiment observer could not give within its budget."""
    late = list(bot.services.get("sentiment.late", ()))
    if late:
        await asyncio.wait(late, timeout=120)


def _no_classifier(bot: Bot) -> bool:
    """The sentiment observer found no classifier to label with (it says so once)."""
    return bool(bot.services.get("sentiment.warned"))


def summary_line(results: list[ScenarioResult]) -> str:
    passed = sum(r.passed for r in results)
    failed = sum(r.failed for r in results)
    skipped = len(results) - passed - failed
    line = f"{passed} passed, {failed} failed"
    return line + (f", {skipped} skipped" if skipped else "")


def write_junit(results: list[ScenarioResult], path: Path) -> None:
    """JUnit XML, the format CI systems (GitLab, Jenkins, GitHub reporters) display."""
    suite = ET.Element(
        "testsuite",
        name="chinwag scenarios",
        tests=str(len(results)),
        failures=str(sum(r.failed for r in results)),
        skipped=str(sum(r.skipped is not None for r in results)),
        time=f"{sum(r.seconds for r in results):.3f}",
    )
    for r in results:
        case = ET.SubElement(
            suite,
            "testcase",
            classname=r.scenario.path.stem if r.scenario.path else "scenarios",
            name=r.scenario.name,
            time=f"{r.seconds:.3f}",
            file=str(r.scenario.path or ""),
            line=str(r.scenario.line or ""),
        )
        if r.skipped is not None:
            ET.SubElement(case, "skipped", message=r.skipped)
        elif not r.passed:
            failure = ET.SubElement(case, "failure", message=r.failures[0])
            failure.text = r.transcript()
    path.parent.mkdir(parents=True, exist_ok=True)
    root = ET.Element("testsuites")
    root.append(suite)
    ET.indent(root)
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.casefold()).strip("-")[:40] or "scenario"
