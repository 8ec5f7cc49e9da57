"""``chinwag simulate``: what the operator sees — progress per scenario, failures with the
conversation so far, a closing ``N passed, N failed`` line, and an exit status CI can use."""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path

import typer

from bot.config import ConfigError, Settings
from bot.simulation import runner
from bot.simulation import users as sim_users
from bot.simulation.scenarios import ScenarioError, load


async def run_simulation(
    settings: Settings,
    paths: list[Path],
    *,
    junit: Path | None = None,
    concurrency: int = 8,
    record: bool = False,
    users: int = 0,
    turns: int = 4,
    persona: str = "mixed",
    questions: Path | None = None,
    url: str | None = None,
    token: str | None = None,
    seed: int = 0,
) -> int:
    """Returns the exit status: 0 all passed, 1 a failure, 2 unusable input."""
    try:
        scenarios = load(paths) if paths else []
    except ScenarioError as exc:
        typer.echo(f"error: {exc}", err=True)
        return 2
    if persona not in (*sim_users.PERSONAS, "mixed"):
        typer.echo(f"error: unknown persona {persona!r}", err=True)
        return 2
    with tempfile.TemporaryDirectory(prefix="chinwag-simulate-") as tmp:
        run_settings = settings if record else runner.scratch_settings(settings, Path(tmp))
        failed = 0
        if scenarios:
            typer.echo(f"running {len(scenarios)} scenarios")
            results = await runner.simulate(
                run_settings,
                scenarios,
                concurrency=concurrency,
                on_done=_progress,
                workdir=Path(tmp),
            )
            failures = [r for r in results if r.failed]
            for r in failures:
                where = f"{r.scenario.path}:{r.scenario.line}"
                typer.echo(f"\nFAILED {r.scenario.name} ({where})\n{r.transcript()}")
            if junit is not None:
                runner.write_junit(results, junit)
                typer.echo(f"JUnit XML: {junit}")
            typer.echo(runner.summary_line(results))
            failed += len(failures)
        if users:
            report = await _run_users(
                run_settings, users, turns, persona, questions, url, token, seed, concurrency
            )
            typer.echo(json.dumps(report.summary()))
            failed += len(report.errors)
            for err in report.errors[:10]:
                typer.echo(f"error: {err}", err=True)
    return 1 if failed else 0


def _progress(result: runner.ScenarioResult) -> None:
    if result.skipped is not None:
        typer.echo(f"  skip {result.scenario.name}: {result.skipped}")
        return
    mark = "ok  " if result.passed else "FAIL"
    typer.echo(f"  {mark} {result.scenario.name} ({result.seconds:.1f} s)")


async def _run_users(
    settings: Settings,
    n: int,
    turns: int,
    persona: str,
    questions: Path | None,
    url: str | None,
    token: str | None,
    seed: int,
    concurrency: int,
) -> sim_users.LoadReport:
    qs = sim_users.read_questions(questions)
    typer.echo(f"simulating {n} users × {turns} turns ({persona})")
    run = functools.partial(
        sim_users.run_users,
        users=n,
        turns=turns,
        persona=persona,
        questions=qs,
        seed=seed,
        concurrency=concurrency,
    )
    if url is not None:
        import aiohttp

        if not token:
            raise ConfigError("--url needs --token (or CHINWAG_API_TOKEN)")
        async with aiohttp.ClientSession() as session:
            return await run(*sim_users.over_http(session, url, token))
    from bot.core import Bot

    async with Bot(settings) as bot:
        await bot.warmed()
        return await run(*sim_users.in_process(bot))
