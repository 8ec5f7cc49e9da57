"""The trainers as a chinwag plugin: ``chinwag eval …``, ``chinwag train``, ``chinwag adapters …``.

``chinwag eval`` with no sub-command runs the default suite (sentiment on the classifier's
held-out movies, dialogue on real conversation openers, plus QA/retrieval when ``--qa-data`` is
given and scenarios when ``--scenarios`` is); each sub-command runs one suite on the operator's
own data. Every run writes ``report.json`` and a self-contained ``report.html`` with plots, and
``--baseline earlier/report.json`` adds the change of every figure.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from bot import hookimpl
from bot.text import plural

eval_app = typer.Typer(
    help="Evaluate the bot: figures, plots and an HTML report.", invoke_without_command=True
)

Out = Annotated[
    Path | None,
    typer.Option("--out", help="Report directory (default: ./chinwag-eval/<timestamp>)."),
]
Baseline = Annotated[
    Path | None, typer.Option("--baseline", help="An earlier report.json to compare with.")
]


Suite = Callable[[Any, Any, Path], Awaitable[dict[str, Any]]]


@contextlib.contextmanager
def stage_bars(
    console: Any, *, transient: bool = False
) -> Iterator[Callable[[str, int, int], None]]:
    """A ``progress(stage, done, total)`` callback drawing one bar per stage (eval suites,
    training steps) — the shape every long-running trainers function reports in."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    if not console.is_terminal:
        # Piped (cron, CI, a bench's log): rich draws nothing until the end, so say how far
        # it is in plain lines instead — each stage's start and end, and at most every 30 s.
        with _progress_lines(console) as progress:
            yield progress
        return
    with Progress(
        TextColumn("{task.description:>10}"),
        BarColumn(),
        MofNCompleteColumn(),
        console=console,
        transient=transient,
    ) as bars:
        tasks: dict[str, Any] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bars.add_task(stage, total=total)
            bars.update(tasks[stage], completed=done, total=total)

        yield progress


@contextlib.contextmanager
def _progress_lines(
    console: Any, every_s: float = 30.0
) -> Iterator[Callable[[str, int, int], None]]:
    import time

    started: dict[str, float] = {}
    said: dict[str, float] = {}

    def progress(stage: str, done: int, total: int) -> None:
        now = time.monotonic()
        first = stage not in started
        start = started.setdefault(stage, now)
        finished = total > 0 and done >= total
        if not (first or finished or now - said.get(stage, start) >= every_s):
            return
        said[stage] = now
        line = f"{stage}: {done}/{total}"
        if 0 < done < total:
            left = (now - start) / done * (total - done)
            line += f" ({done / total:.0%}, about {_duration(left)} left)"
        elif finished and now - start >= 1:
            line += f" (done in {_duration(now - start)})"
        console.print(line, markup=False, highlight=False)

    yield progress


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


#: ``--out`` / ``--baseline`` given to ``chinwag eval`` before a sub-command.
_GROUP: dict[str, Path | None] = {}


def _run(suites: dict[str, Suite], out: Path | None, baseline: Path | None) -> None:
    """Build the bot once, run ``suites`` on it with progress bars, write and summarise."""
    from datetime import UTC, datetime

    from bot.logs import quiet_libraries

    quiet_libraries()  # our bars only
    out = out or _GROUP.get("out")
    baseline = baseline or _GROUP.get("baseline")

    from rich.console import Console

    from bot.cli import fail, run_async, settings
    from bot.core import Bot
    from bot.simulation.runner import scratch_settings
    from trainers.evaluate import DataError, compare
    from trainers.report import write_report

    base = None
    if baseline is not None:
        try:
            base = json.loads(baseline.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise fail(f"{baseline}: not a readable report.json: {exc}") from None
    s = settings(default_level="WARNING")
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    out = out or Path("chinwag-eval") / stamp
    console = Console(stderr=True)

    async def main() -> dict[str, Any]:
        report: dict[str, Any] = {"suites": {}, "context": {"data_dir": str(s.data_dir)}}
        with tempfile.TemporaryDirectory(prefix="chinwag-eval-") as tmp:
            scratch = scratch_settings(s, Path(tmp))
            async with Bot(scratch) as bot:
                await bot.warmed()
                report["context"]["base_model"] = bot.settings.models.base_model
                report["context"]["adapters"] = {
                    name: (e.version if (e := bot.models.registry.current(name)) else None)
                    for name in bot.models.registry.names()
                }
                with stage_bars(console, transient=True) as progress:
                    for name, suite in suites.items():
                        report["suites"][name] = await suite(bot, progress, Path(tmp))
        return report

    try:
        report = run_async(main)
    except DataError as exc:
        raise fail(str(exc)) from None
    if base is not None:
        report["comparison"] = compare(report, base)
        report["context"]["baseline"] = str(baseline)
    json_path, html_path = write_report(report, out)
    _summarise(console, report)
    typer.echo(f"report: {html_path}  (data: {json_path})")


_HEADLINE = {
    "sentiment": ("accuracy", "macro_f1", "roc_auc"),
    "retrieval": ("recall@1", "recall@5", "mrr"),
    "qa": (
        "containment",
        "f1",
        "citation_accuracy",
        "abstention_precision",
        "abstention_recall",
        "judge_vs_reference",
    ),
    "dialogue": ("distinct_1", "distinct_2", "repetition_rate", "groundedness"),
    "scenarios": ("passed", "skipped", "n", "pass_rate"),
}


def _summarise(console: Any, report: dict[str, Any]) -> None:
    for suite, figures in report["suites"].items():
        shown = ", ".join(
            f"{k} {figures[k]:.3f}" if isinstance(figures[k], float) else f"{k} {figures[k]}"
            for k in _HEADLINE.get(suite, ())
            if figures.get(k) is not None
        )
        typer.echo(f"{suite}: {shown}")
    for row in report.get("comparison", []):
        if abs(row["delta"]) > 1e-9:
            mark = "better" if row["better"] else "worse"
            typer.echo(f"  {row['metric']}: {row['baseline']:.3f} → {row['value']:.3f} ({mark})")


def _sentiment_suite(data: Path | None, limit: int) -> Suite:
    async def suite(bot: Any, progress: Any, _tmp: Path) -> dict[str, Any]:
        from trainers.evaluate import default_sentiment_data, eval_sentiment, read_labelled_csv

        texts, labels = read_labelled_csv(data) if data else default_sentiment_data(limit)
        return await eval_sentiment(bot, texts, labels, progress)

    return suite


JudgeUrl = Annotated[
    str | None,
    typer.Option(
        "--judge-url",
        help="An OpenAI-compatible server for the LLM-as-judge panel (off by default).",
    ),
]
JudgeModel = Annotated[str, typer.Option("--judge-model", help="The judges' model name.")]
JudgeKey = Annotated[
    str | None, typer.Option("--judge-key", envvar="CHINWAG_JUDGE_API_KEY", help="Its API key.")
]


def _panel(url: str | None, model: str, key: str | None) -> Any:
    if url is None:
        return None
    from trainers.judge import JudgePanel

    return JudgePanel(url, model, api_key=key)


def _qa_suites(data: Path, panel: Any = None) -> dict[str, Suite]:
    from trainers.evaluate import eval_qa, eval_retrieval, read_qa_jsonl

    rows = read_qa_jsonl(data)  # bad rows are reported before anything loads

    async def retrieval(bot: Any, progress: Any, _tmp: Path) -> dict[str, Any]:
        return await eval_retrieval(bot, rows, progress=progress)

    async def qa(bot: Any, progress: Any, _tmp: Path) -> dict[str, Any]:
        result = await eval_qa(bot, rows, progress)
        if panel is not None:
            from trainers.judge import judge_against_references

            try:
                cases = [c for c in result["cases"] if c.get("reference")]
                result.update(await judge_against_references(panel, cases))
            finally:
                await panel.close()
        return result

    return {"retrieval": retrieval, "qa": qa}


def _dialogue_suite(prompts: Path | None, n: int) -> Suite:
    from bot.simulation.users import read_questions
    from trainers.evaluate import default_dialogue_prompts

    lines = read_questions(prompts) if prompts else default_dialogue_prompts(n)

    async def suite(bot: Any, progress: Any, _tmp: Path) -> dict[str, Any]:
        from trainers.evaluate import eval_dialogue

        return await eval_dialogue(bot, lines, progress)

    return suite


def _scenario_suite(paths: list[Path]) -> Suite:
    async def suite(bot: Any, _progress: Any, tmp: Path) -> dict[str, Any]:
        from trainers.evaluate import eval_scenarios

        return await eval_scenarios(bot.settings, paths, tmp)

    return suite


def _guard(build: Callable[[], Any]) -> Any:
    from bot.cli import fail
    from bot.simulation.scenarios import ScenarioError
    from trainers.evaluate import DataError

    try:
        return build()
    except (DataError, ScenarioError) as exc:
        raise fail(str(exc)) from None


@eval_app.callback()
def eval_all(
    ctx: typer.Context,
    out: Out = None,
    baseline: Baseline = None,
    qa_data: Annotated[
        Path | None, typer.Option("--qa-data", help="QA/retrieval questions (JSONL).")
    ] = None,
    scenarios: Annotated[
        list[Path] | None, typer.Option("--scenarios", help="Scenario files or directories.")
    ] = None,
    dialogue_prompts: Annotated[int, typer.Option(help="Chitchat openers for dialogue.")] = 20,
    sentiment_limit: Annotated[int, typer.Option(help="Held-out sentiment examples.")] = 600,
    judge_url: JudgeUrl = None,
    judge_model: JudgeModel = "judge",
    judge_key: JudgeKey = None,
) -> None:
    """Run the default evaluation suite (or one suite: see the sub-commands)."""
    if ctx.invoked_subcommand is not None:
        # `chinwag eval --out DIR qa …`: the group's options hold for the sub-command too.
        _GROUP.update(out=out, baseline=baseline)
        return
    suites: dict[str, Suite] = {"sentiment": _sentiment_suite(None, sentiment_limit)}
    if qa_data is not None:
        panel = _panel(judge_url, judge_model, judge_key)
        suites.update(_guard(lambda: _qa_suites(qa_data, panel)))
    suites["dialogue"] = _dialogue_suite(None, dialogue_prompts)
    if scenarios:
        _guard(lambda: _check_scenarios(scenarios))
        suites["scenarios"] = _scenario_suite(scenarios)
    _run(suites, out, baseline)


def _check_scenarios(paths: list[Path]) -> None:
    from bot.simulation import load

    load(paths)


@eval_app.command("sentiment")
def eval_sentiment_cmd(
    data: Annotated[
        Path | None, typer.Option(help="CSV with text,label (default: the held-out split).")
    ] = None,
    limit: Annotated[int, typer.Option(help="Held-out examples when no --data.")] = 600,
    out: Out = None,
    baseline: Baseline = None,
) -> None:
    """Accuracy, per-class and macro P/R/F1, ROC-AUC and confusion matrix of the classifier."""
    if data is not None:
        from trainers.evaluate import read_labelled_csv

        _guard(lambda: read_labelled_csv(data))
    _run({"sentiment": _sentiment_suite(data, limit)}, out, baseline)


@eval_app.command("qa")
def eval_qa_cmd(
    data: Annotated[
        Path, typer.Option(help="JSONL: question, answer (null: should abstain), source.")
    ],
    out: Out = None,
    baseline: Baseline = None,
    judge_url: JudgeUrl = None,
    judge_model: JudgeModel = "judge",
    judge_key: JudgeKey = None,
) -> None:
    """Retrieval recall@k/MRR, answer containment/F1, citations and abstention (with an LLM
    judge panel too when --judge-url is given)."""
    panel = _panel(judge_url, judge_model, judge_key)
    _run(_guard(lambda: _qa_suites(data, panel)), out, baseline)


@eval_app.command("dialogue")
def eval_dialogue_cmd(
    prompts: Annotated[Path | None, typer.Option(help="Opening lines, one per line.")] = None,
    n: Annotated[int, typer.Option(help="Chitchat openers when no --prompts.")] = 20,
    out: Out = None,
    baseline: Baseline = None,
) -> None:
    """Distinct-1/2, repetition, reply length, groundedness and latency of conversation."""
    _run({"dialogue": _dialogue_suite(prompts, n)}, out, baseline)


@eval_app.command("scenarios")
def eval_scenarios_cmd(
    paths: Annotated[list[Path], typer.Argument(help="Scenario files or directories.")],
    out: Out = None,
    baseline: Baseline = None,
) -> None:
    """Pass rate of scenario files, in the report beside the other figures."""
    _guard(lambda: _check_scenarios(paths))
    _run({"scenarios": _scenario_suite(paths)}, out, baseline)


# -- training and the adapter registry ----------------------------------------------------------

adapters_app = typer.Typer(help="Trained adapter versions: list, inspect, promote, roll back.")


@hookimpl
def register_commands(cli: typer.Typer) -> None:
    cli.add_typer(eval_app, name="eval")
    cli.add_typer(adapters_app, name="adapters")
    cli.command("train")(train)


@hookimpl
def startup(bot: Any) -> None:
    """A broken ``[trainers]`` section stops the bot at start, not at 3 am."""
    cycle_config(bot.settings)


@hookimpl
def register_services(register: Any, settings: Any) -> None:
    """The nightly schedule runs as ``chinwag train`` beside ``chinwag run`` (its own process:
    training never shares the bot's event loop, memory or fate)."""
    if (settings.trainers or {}).get("schedule", "default"):
        register("train", "training schedule")


def cycle_config(settings: Any) -> Any:
    from pydantic import ValidationError

    from bot.config import ConfigError, format_validation_error
    from trainers.cycle import CycleConfig

    try:
        return CycleConfig.model_validate(settings.trainers or {})
    except ValidationError as exc:  # every mistake at once, the way skills' sections report
        raise ConfigError(format_validation_error(exc, "[trainers]", prefix="trainers")) from None


def _registry() -> Any:
    from bot.cli import settings
    from bot.models.registry import AdapterRegistry

    s = settings(default_level="WARNING")
    return AdapterRegistry(s.models.registry_dir or AdapterRegistry.for_data_dir(s.data_dir).root)


def _registry_call(fn: Callable[[], Any]) -> Any:
    from bot.cli import fail
    from bot.models.registry import RegistryError

    try:
        return fn()
    except RegistryError as exc:
        raise fail(str(exc), 1) from None


@adapters_app.command("list")
def adapters_list(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Every adapter, its versions, and which one is in service."""
    registry = _registry()
    rows = []
    for name in registry.names():
        current = registry.current(name)
        for v in registry.versions(name):
            rows.append(
                {
                    "adapter": name,
                    "version": v.version,
                    "in_service": bool(current and current.version == v.version),
                    "kind": v.kind,
                    "created": v.meta.get("created"),
                    "metrics": v.meta.get("metrics", {}),
                }
            )
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        typer.echo("no adapters yet")
    for r in rows:
        mark = "*" if r["in_service"] else " "
        figures = ", ".join(
            f"{k} {v:.4f}" for k, v in r["metrics"].items() if isinstance(v, int | float)
        )
        typer.echo(f"{mark} {r['adapter']:<12} {r['version']:<5} {r['created'] or ''}  {figures}")
    if rows:
        typer.echo("* in service")


@adapters_app.command("show")
def adapters_show(name: str, version: Annotated[str | None, typer.Argument()] = None) -> None:
    """One version's metadata (the one in service by default) and the adapter's history."""
    registry = _registry()

    def show() -> dict[str, Any]:
        entry = registry.get(name, version) if version else registry.current(name)
        if entry is None:
            from bot.models.registry import RegistryError

            raise RegistryError(f"adapter {name!r} has no version in service")
        return {
            "path": str(entry.path),
            "meta": entry.meta,
            "history": registry.history(name),
        }

    typer.echo(json.dumps(_registry_call(show), indent=2, default=str))


@adapters_app.command("promote")
def adapters_promote(name: str, version: str) -> None:
    """Put VERSION in service; a running bot swaps to it within seconds."""
    entry = _registry_call(lambda: _registry().promote(name, version, reason="by hand"))
    typer.echo(f"{name} {entry.version} is in service")


@adapters_app.command("rollback")
def adapters_rollback(name: str) -> None:
    """Put the version that was in service before the current one back."""
    entry = _registry_call(lambda: _registry().rollback(name))
    typer.echo(f"{name} rolled back to {entry.version}")


def train(
    now: Annotated[bool, typer.Option("--now", help="Run one cycle now and exit.")] = False,
) -> None:
    """Run the training cycle: now (--now), or on the configured schedule."""
    from bot.cli import fail, settings

    # One cycle now reports in its own bars and summary; the schedule logs as a service does.
    s = settings(default_level="WARNING" if now else None)
    try:
        config = cycle_config(s)
    except Exception as exc:
        raise fail(str(exc)) from None
    if now:
        if config.nice:
            import os

            os.nice(config.nice)  # serving first: the bot outranks training for the CPU
        raise typer.Exit(_cycle_now(s, config))
    from trainers.schedule import run_schedule

    if not config.schedule:
        raise fail("trainers.schedule is empty: nothing to schedule (use --now)")
    run_schedule(s, config)


def _cycle_now(s: Any, config: Any) -> int:
    from rich.console import Console

    from trainers.cycle import CycleBusy, run_cycle

    console = Console(stderr=True)
    with stage_bars(console) as progress:
        try:
            report = run_cycle(s, config, progress=progress)
        except CycleBusy as exc:
            typer.echo(f"error: {exc}", err=True)
            return 3
        except Exception as exc:  # say why in one line; the traceback goes to the log
            logging.getLogger("trainers").exception("the training cycle failed")
            typer.echo(f"error: the training cycle failed: {type(exc).__name__}: {exc}", err=True)
            return 1
    d = report["dataset"]
    typer.echo(
        f"dataset: {d['train']} train, {d['held_out']} held out "
        f"from {plural(d['conversations'], 'conversation')}; dropped {d['dropped']}"
    )
    for name, r in report["adapters"].items():
        line = f"{name}: {r['decision']}"
        if r.get("version"):
            line += f" {r['version']}"
        if r.get("candidate") and "held_out" not in r["candidate"]:
            line += " (" + ", ".join(f"{k} {v:.3f}" for k, v in r["candidate"].items() if v) + ")"
        elif r.get("candidate"):
            line += " (held-out loss {:.4f} → {:.4f}, regression {:.4f} → {:.4f})".format(
                r["baseline"]["held_out"]["loss"],
                r["candidate"]["held_out"]["loss"],
                r["baseline"]["regression"]["loss"],
                r["candidate"]["regression"]["loss"],
            )
            if "answers" in r["candidate"] and "answers" in r["baseline"]:
                line += " (answer F1 {:.3f} → {:.3f})".format(
                    r["baseline"]["answers"]["f1"], r["candidate"]["answers"]["f1"]
                )
        if r.get("why"):
            line += f" — {r['why']}"
        typer.echo(line)
    typer.echo(f"report: {Path(s.data_dir) / 'trainers' / 'reports' / report['cycle']}/report.html")
    return 0
