"""Progress for long work (ingest, evaluation suites, training steps): bars with an ETA on a
terminal, plain lines with an ETA when piped (cron, CI, a bench's log). One helper for every
plugin's long commands, so they all report alike."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any


@contextlib.contextmanager
def stage_bars(
    console: Any, *, transient: bool = False
) -> Iterator[Callable[[str, int, int], None]]:
    """A ``progress(stage, done, total)`` callback drawing one bar per stage (ingest stages,
    eval suites, training steps) — the shape every long-running function reports in."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

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
        TimeRemainingColumn(),
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
        if 0 < done < total and not first:  # a first report has no pace to go by yet
            left = (now - start) / done * (total - done)
            line += f" ({done / total:.0%}, about {duration(left)} left)"
        elif finished and now - start >= 1:
            line += f" (done in {duration(now - start)})"
        console.print(line, markup=False, highlight=False)

    yield progress


def duration(seconds: float) -> str:
    """``45 s``, ``12 min``, ``1.5 h``: how long, the way a person would say it."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
