"""``chinwag train``: one cycle now (``--now``), or the nightly schedule."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

import typer

from bot.progress import stage_bars
from bot.text import plural


def cycle_config(settings: Any) -> Any:
    """The validated ``[trainers]`` section (every mistake at once, as skills' sections)."""
    from trainers.cycle import CycleConfig

    return settings.section("trainers", CycleConfig)


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
        typer.echo(adapter_line(name, r))
    typer.echo(f"report: {Path(s.data_dir) / 'trainers' / 'reports' / report['cycle']}/report.html")
    return 0


def adapter_line(name: str, r: dict[str, Any]) -> str:
    """One adapter's outcome in a line: the decision and the figures the gate decided by."""
    line = f"{name}: {r['decision']}"
    if r.get("version"):
        line += f" {r['version']}"
    if r.get("candidate") and "held_out" not in r["candidate"]:  # a classifier
        before = r.get("baseline") or {}
        line += " (" + "; ".join(
            f"{k} accuracy "
            + (f"{before[k]['accuracy']:.3f} → " if k in before else "")
            + f"{figures['accuracy']:.3f} on {figures['n']}"
            for k, figures in r["candidate"].items()
        )
        line += f"; tuned on {r['train_labels']} labels)" if r.get("mode") == "tuned" else ")"
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
        gate = r.get("gate") or {}
        if "answer F1 in service" in gate:
            c = gate["answer F1 in service"]
            line += f" (in service {c['baseline']:.3f} → {c['candidate']:.3f})"
        if "scenarios passed" in gate:
            sc = (r.get("in_service_check") or {}).get("scenarios") or {}
            line += (
                f" (scenarios {sc.get('in_service_passed')} → {sc.get('candidate_passed')}"
                f" of {sc.get('checked')})"
            )
    if r.get("why"):
        line += f" — {r['why']}"
    return line
