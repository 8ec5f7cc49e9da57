"""``chinwag eval …``: the default suite, or one suite on the operator's own data.

Every run writes ``report.json`` and a self-contained ``report.html`` with plots, and
``--baseline earlier/report.json`` adds the change of every figure.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from bot.progress import stage_bars

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
