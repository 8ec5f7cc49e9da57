"""The gate's last check: the candidate put in service on a throwaway bot, as users would meet it.

Losses and the answer check measure the words a candidate writes for a prompt. Users meet it
through the whole bot: routing, the QA skill's retrieval and support checks (a generation that
fails them becomes a quote), citations, abstention, the dialogue tidy-up. A candidate can pass
every loss and still change what users read for the worse, or fail what an operator wrote
down as required. So the candidate is put in service and

- **the held-out questions** are asked again, as their users wrote them, each in a chat of its
  own; the reply (without its source list) is scored against the reply the user liked or the
  operator wrote (token F1), and compared pair by pair with the adapters in service answering
  the same questions — the sign test of :mod:`trainers.gate`;
- **the scenario files** are run — chinwag's shipped ones by default, the operator's own with
  ``trainers.gate_scenarios``. A scenario that passes in service and fails with the candidate
  is run again (``confirm`` times): sampled replies and a busy machine must not reject a good
  adapter, so only one that fails every time counts, and one is enough to hold the candidate
  back — scenarios are specifications, not a sample to average. Time limits
  (``max_latency_ms``) are left out: an adapter does not change how fast the machine is, and
  the nightly cycle shares it with the bot.

Each run is a throwaway bot: scratch conversation log, the configured knowledge index, the local
backend (the gate judges the adapter, not the serving engine — a vLLM deployment does not start
a second server for it), the candidate pinned in place of its adapter.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bot.config import AdapterSettings
from bot.simulation.chat import ChatUser
from bot.simulation.runner import ScenarioResult, scratch_settings, simulate
from bot.simulation.scenarios import SHIPPED, Scenario, load
from trainers.gate import Comparison, compare, sign_test
from trainers.metrics import token_f1

log = logging.getLogger(__name__)

#: Questions asked at once: enough to batch on the model, few enough that none is turned away
#: "busy" by the bot's own admission control on a small machine.
ASK_CONCURRENCY = 4

Served = tuple[tuple[str, str], ...]
Pin = tuple[str, Path, str]


@dataclass(frozen=True)
class ScenarioComparison(Comparison):
    """A :class:`Comparison` whose reason names the scenarios the candidate broke."""

    broken: tuple[str, ...] = ()

    def why(self) -> str:
        base = (
            f"{self.figure} {self.candidate:.0%} vs {self.baseline:.0%} in service "
            f"(broken {self.worse_on}, fixed {self.better_on})"
        )
        return base + (": " + "; ".join(self.broken) if self.broken else "")


def gate_scenarios(paths: Sequence[Path] | None) -> list[Scenario]:
    """The scenarios to hold candidates to: ``None`` is chinwag's shipped set, ``[]`` none."""
    return load([SHIPPED] if paths is None else list(paths))


def _key(s: Scenario) -> str:
    return f"{s.name} ({s.path.name if s.path else '?'}:{s.line or '?'})"


def _untimed(s: Scenario) -> Scenario:
    turns = [
        t.model_copy(update={"expect": t.expect.model_copy(update={"max_latency_ms": None})})
        for t in s.turns
    ]
    return s.model_copy(update={"turns": turns})


async def _ask(bot: Any, questions: Sequence[str]) -> list[str]:
    gate = asyncio.Semaphore(ASK_CONCURRENCY)

    async def one(i: int, question: str) -> str:
        async with gate:
            user = ChatUser(bot, chat_id=f"gate-{i}", user_id=f"gate-user-{i}")
            replies = await user.send(question)
        # The answer as the skill wrote it, without decoration (QA's source list).
        return "\n".join(str(r.metadata.get("answer") or r.text) for r in replies)

    return list(await asyncio.gather(*(one(i, q) for i, q in enumerate(questions))))


def _serve(
    settings: Any, scenarios: list[Scenario], questions: Sequence[str], pin: Pin | None
) -> tuple[list[ScenarioResult], list[str]]:
    """Scenario results and answers from a throwaway bot with ``pin`` in service.

    The questions are asked on the bot the scenarios ran on (the configured index): one model
    load a side, not two."""

    async def run(tmp: Path) -> tuple[list[ScenarioResult], list[str]]:
        run_settings = scratch_settings(settings, tmp)
        run_settings.models.backend = "local"
        if pin is not None:
            name, path, version = pin
            run_settings.models.adapters = {
                **run_settings.models.adapters,
                name: AdapterSettings(path=path, version=version),
            }
        answers: list[str] = []

        async def ask(bot: Any) -> None:
            answers.extend(await _ask(bot, questions))

        if not scenarios and not questions:
            return [], []
        results = await simulate(
            run_settings,
            scenarios,
            concurrency=4,
            workdir=tmp,
            then=ask if questions else None,
        )
        return results, answers

    with tempfile.TemporaryDirectory(prefix="chinwag-gate-") as tmp:
        return asyncio.run(run(Path(tmp)))


@dataclass
class InServiceCheck:
    """One cycle's in-service check; the scenarios' in-service results are reused while the
    adapters in service stay the same."""

    settings: Any
    scenarios: list[Scenario]
    confirm: int = 2
    _in_service: dict[Served, dict[str, ScenarioResult]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.scenarios = [_untimed(s) for s in self.scenarios]

    def check(
        self,
        name: str,
        path: Path,
        version: str,
        served: Served,
        questions: Sequence[tuple[str, str]] = (),
        *,
        margin: float = 0.0,
        alpha: float = 0.05,
        better_alpha: float = 0.05,
    ) -> tuple[list[Comparison], dict[str, Any]]:
        """The candidate ``name`` at ``path`` against the adapters ``served`` now.

        ``questions``: (what the user wrote, the reply they liked or the operator wrote).
        """
        asked = [q for q, _ in questions]
        cached = served in self._in_service
        results, before_answers = _serve(
            self.settings, [] if cached else self.scenarios, asked, None
        )
        if not cached:
            self._in_service[served] = {_key(r.scenario): r for r in results}
        before = self._in_service[served]
        pin = (name, path, f"{version} (candidate)")
        results, after_answers = _serve(self.settings, self.scenarios, asked, pin)
        after = {_key(r.scenario): r for r in results}
        checks: list[Comparison] = []
        detail: dict[str, Any] = {}
        if questions:
            targets = [t for _, t in questions]
            f1_before = [token_f1(a, t) for a, t in zip(before_answers, targets, strict=True)]
            f1_after = [token_f1(a, t) for a, t in zip(after_answers, targets, strict=True)]
            checks.append(
                compare(
                    "answer F1 in service",
                    f1_before,
                    f1_after,
                    higher_is_better=True,
                    margin=margin,
                    alpha=alpha,
                    better_alpha=better_alpha,
                )
            )
            detail["questions"] = [
                {"asked": q, "target": t, "in_service": a, "candidate": b, "f1": [fa, fb]}
                for (q, t), a, b, fa, fb in zip(
                    questions, before_answers, after_answers, f1_before, f1_after, strict=True
                )
            ]
        if self.scenarios:
            comparison, detail["scenarios"] = self._scenarios(name, before, after, pin)
            checks.append(comparison)
        return checks, detail

    def _scenarios(
        self,
        name: str,
        before: dict[str, ScenarioResult],
        after: dict[str, ScenarioResult],
        pin: Pin,
    ) -> tuple[ScenarioComparison, dict[str, Any]]:
        suspects = [k for k, r in after.items() if r.failed and before[k].passed]
        for _ in range(self.confirm):
            if not suspects:
                break
            again = [after[k].scenario for k in suspects]
            rerun = {_key(r.scenario): r for r in _serve(self.settings, again, (), pin)[0]}
            cleared = [k for k in suspects if rerun[k].passed]
            if cleared:
                log.info("%s candidate passed on another try: %s", name, "; ".join(cleared))
            suspects = [k for k in suspects if not rerun[k].passed]
        fixed = [k for k, r in after.items() if r.passed and before[k].failed]
        checked = [k for k in after if after[k].skipped is None and before[k].skipped is None]

        def rate(results: dict[str, ScenarioResult]) -> float:
            return sum(results[k].passed for k in checked) / len(checked) if checked else 1.0

        comparison = ScenarioComparison(
            "scenarios passed",
            rate(before),
            rate(after),
            len(suspects),
            len(fixed),
            sign_test(len(suspects), len(fixed)),
            bool(suspects),
            broken=tuple(suspects),
        )
        return comparison, {
            "scenarios": len(after),
            "checked": len(checked),
            "in_service_passed": sum(before[k].passed for k in checked),
            "candidate_passed": sum(after[k].passed for k in checked),
            "broken": [
                {
                    "scenario": k,
                    "in_service": before[k].transcript(),
                    "candidate": after[k].transcript(),
                }
                for k in suspects
            ],
            "fixed": fixed,
            "failing_in_service": [k for k in checked if before[k].failed],
        }
