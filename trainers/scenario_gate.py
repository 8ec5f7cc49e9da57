"""The gate's scenario check: the candidate put in service and held to the bot's scenarios.

Losses and answer F1 measure the words a candidate writes for a prompt. Users meet it through
the whole bot: routing, the QA skill's support checks and citations, abstention, the dialogue
tidy-up. A candidate that writes plausible words the QA skill then rejects (so every answer
falls back to a quote), or that makes dialogue speak for the user, can pass every loss and
still fail what an operator wrote down as required. Scenario files are where operators write
that down (docs/evaluation.md), so the gate runs them — chinwag's shipped scenarios by default,
the operator's own with ``trainers.gate_scenarios``.

Each run is a throwaway bot (scratch conversation log, the configured knowledge index, the
local backend): once with the adapters in service, once with the candidate pinned in place of
its adapter. A scenario that passes in service and fails with the candidate is run again
(``confirm`` times): sampled replies and a busy machine must not reject a good adapter, so only
a scenario that fails every time counts. Time limits (``max_latency_ms``) are left out — an
adapter does not change how fast the machine is, and the nightly cycle shares it with the bot.
One confirmed regression holds the candidate back: scenarios are specifications, not a sample
to average.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bot.config import AdapterSettings
from bot.simulation.runner import ScenarioResult, scratch_settings, simulate
from bot.simulation.scenarios import SHIPPED, Scenario, load
from trainers.gate import Comparison, sign_test

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScenarioComparison(Comparison):
    """A :class:`Comparison` whose reason names the scenarios the candidate broke."""

    regressed: tuple[str, ...] = ()

    def why(self) -> str:
        base = (
            f"{self.figure} {self.candidate:.0%} vs {self.baseline:.0%} in service "
            f"(broken {self.worse_on}, fixed {self.better_on})"
        )
        if self.regressed:
            base += ": " + "; ".join(self.regressed)
        return base


def gate_scenarios(paths: list[Path] | None) -> list[Scenario]:
    """The scenarios to hold candidates to: ``None`` is chinwag's shipped set, ``[]`` none."""
    return load([SHIPPED] if paths is None else paths)


def _key(s: Scenario) -> str:
    return f"{s.name} ({s.path.name if s.path else '?'}:{s.line or '?'})"


def _untimed(s: Scenario) -> Scenario:
    turns = [
        t.model_copy(update={"expect": t.expect.model_copy(update={"max_latency_ms": None})})
        for t in s.turns
    ]
    return s.model_copy(update={"turns": turns})


def _run(
    settings: Any, scenarios: list[Scenario], pin: tuple[str, Path, str] | None
) -> list[ScenarioResult]:
    with tempfile.TemporaryDirectory(prefix="chinwag-gate-") as tmp:
        run_settings = scratch_settings(settings, Path(tmp))
        # The gate judges the adapter, not the serving engine: the same base model on the
        # local backend, so a vLLM deployment does not start a second server for it.
        run_settings.models.backend = "local"
        if pin is not None:
            name, path, version = pin
            run_settings.models.adapters = {
                **run_settings.models.adapters,
                name: AdapterSettings(path=path, version=version),
            }
        return asyncio.run(simulate(run_settings, scenarios, concurrency=4, workdir=Path(tmp)))


@dataclass
class ScenarioGate:
    """One cycle's scenario check; the in-service results are reused while nothing changes."""

    settings: Any
    scenarios: list[Scenario]
    confirm: int = 2
    _baseline: dict[tuple[tuple[str, str], ...], dict[str, ScenarioResult]] | None = None

    def __post_init__(self) -> None:
        self.scenarios = [_untimed(s) for s in self.scenarios]
        self._baseline = {}

    def _in_service(self, served: tuple[tuple[str, str], ...]) -> dict[str, ScenarioResult]:
        assert self._baseline is not None
        if served not in self._baseline:
            results = _run(self.settings, self.scenarios, None)
            self._baseline[served] = {_key(r.scenario): r for r in results}
        return self._baseline[served]

    def check(
        self, name: str, path: Path, version: str, served: tuple[tuple[str, str], ...]
    ) -> tuple[ScenarioComparison, dict[str, Any]]:
        """Compare the candidate ``name`` at ``path`` with the adapters ``served`` now."""
        before = self._in_service(served)
        pin = (name, path, f"{version} (candidate)")
        after = {_key(r.scenario): r for r in _run(self.settings, self.scenarios, pin)}
        suspects = [k for k, r in after.items() if r.failed and before[k].passed]
        for _ in range(self.confirm):
            if not suspects:
                break
            again = [after[k].scenario for k in suspects]
            rerun = {_key(r.scenario): r for r in _run(self.settings, again, pin)}
            cleared = [k for k in suspects if rerun[k].passed]
            if cleared:
                log.info("%s candidate: passed on a second try: %s", name, "; ".join(cleared))
            suspects = [k for k in suspects if not rerun[k].passed]
        fixed = [k for k, r in after.items() if r.passed and before[k].failed]
        checked = [k for k in after if after[k].skipped is None and before[k].skipped is None]
        rate = lambda rs: sum(rs[k].passed for k in checked) / len(checked) if checked else 1.0  # noqa: E731
        comparison = ScenarioComparison(
            "scenarios passed",
            rate(before),
            rate(after),
            len(suspects),
            len(fixed),
            sign_test(len(suspects), len(fixed)),
            bool(suspects),
            tuple(suspects),
        )
        detail = {
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
        return comparison, detail
