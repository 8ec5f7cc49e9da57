"""Night by night: each adapter's figures over every training cycle so far.

One cycle's report says whether tonight's candidate beat the version in service; whether the
bot has been getting better over the weeks is the question an operator asks next, and the
answer is spread over every night's ``report.json``. This reads them back and draws the
deployment's own learning curve into the cycle's report (``trainers/cycle.py``), the figures
by which each gate decided.

Each night's figures are on that night's held-out examples (plus earlier nights' when
``gate_earlier_held_out``), so the two versions compare within a night; across nights the
set grows and changes, which the page says.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("trainers.history")


@dataclass(frozen=True, slots=True)
class Night:
    """One adapter in one cycle: the gate's headline figure for both versions, and the outcome."""

    cycle: str
    decision: str
    figure: str | None
    in_service: float | None
    candidate: float | None
    higher_is_better: bool
    examples: int | None
    version: str | None
    why: str

    @property
    def when(self) -> str:
        """``20261205-120342`` as ``12-05 12:03:42`` (a cycle id is its start, UTC; a second
        cycle in the same second is ``…-2``)."""
        c, again = self.cycle[:15], self.cycle[15:]
        if len(c) == 15 and c[8] == "-" and c.replace("-", "").isdigit():
            return f"{c[4:6]}-{c[6:8]} {c[9:11]}:{c[11:13]}:{c[13:15]}{again}"
        return self.cycle


def headline(r: dict[str, Any]) -> tuple[str, float | None, float | None, bool] | None:
    """The figure an adapter's gate is read by: (name, in service, candidate, higher is better).

    A classifier: macro-F1 on the operators' held-out labels where there are any, else on its
    original held-out set. A generative adapter: answer F1 on the held-out prompts where it has
    answers to score (``qa``), else the held-out reply loss. None when the night trained nothing.
    """
    cand, base = r.get("candidate"), r.get("baseline") or {}
    if not cand:
        return None
    if "held_out" not in cand:  # a classifier: figures per held-out set
        name = "operators" if "operators" in cand else next(iter(cand))
        return (
            f"macro-F1, {name} held-out",
            (base.get(name) or {}).get("macro_f1"),
            cand[name].get("macro_f1"),
            True,
        )
    if "answers" in cand:
        return (
            "answer F1, held-out prompts",
            (base.get("answers") or {}).get("f1"),
            cand["answers"].get("f1"),
            True,
        )
    return (
        "reply loss, held-out",
        (base.get("held_out") or {}).get("loss"),
        cand["held_out"].get("loss"),
        False,
    )


def nights(reports_dir: Path) -> dict[str, list[Night]]:
    """Every adapter's nights, oldest first, from the cycle reports under ``reports_dir``.

    A report that cannot be read (a crash before it was written whole, an edit) is skipped
    with a warning: the curve shows the other nights rather than nothing.
    """
    found: dict[str, list[Night]] = {}
    for path in sorted(reports_dir.glob("*/report.json")):
        try:
            report = json.loads(path.read_text(encoding="utf-8"))
            adapters = report["adapters"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("history: skipping %s (%s)", path, exc)
            continue
        for name, r in adapters.items():
            if not isinstance(r, dict):
                continue
            figure = headline(r)
            label, before, after, higher = figure or (None, None, None, True)
            examples = r.get("train") if "train" in r else r.get("train_labels")
            found.setdefault(name, []).append(
                Night(
                    str(report.get("cycle") or path.parent.name),
                    str(r.get("decision") or "unknown"),
                    label,
                    before,
                    after,
                    higher,
                    examples if isinstance(examples, int) else None,
                    r.get("version"),
                    str(r.get("why") or ""),
                )
            )
    return found


def blocks(history: dict[str, list[Night]]) -> list[Any]:
    """The page's "night by night" blocks: per adapter a plot of the gate's figure for the
    version in service and the candidate, each night, and the table behind it."""
    from trainers.page import Text, image, plt, table

    out: list[Any] = [
        Text(
            "Each night's figures are on that night's held-out examples (and earlier nights', "
            "never trained on): compare the two versions within a night. The line is the "
            "version in service; a candidate is green where it was promoted, red where the "
            "gate kept it out.",
            muted=True,
        )
    ]
    pyplot = plt()
    colours = {"promoted": "#2e7d32", "rejected": "#c62828"}
    for name, rows in history.items():
        scored = [n for n in rows if n.figure is not None]
        if scored:
            fig, ax = pyplot.subplots(figsize=(6, 3))
            xs = list(range(len(rows)))
            at = {id(n): x for n, x in zip(rows, xs, strict=True)}
            ax.plot(
                [at[id(n)] for n in scored if n.in_service is not None],
                [n.in_service for n in scored if n.in_service is not None],
                marker="o",
                color="#777",
                label="in service",
            )
            for decision, colour in colours.items():
                picked = [n for n in scored if n.decision == decision and n.candidate is not None]
                if picked:
                    paired = [n for n in picked if n.in_service is not None]
                    ax.vlines(  # each night's step from the version in service
                        [at[id(n)] for n in paired],
                        [n.in_service for n in paired],
                        [n.candidate for n in paired],
                        colors=colour,
                        alpha=0.35,
                    )
                    ax.scatter(
                        [at[id(n)] for n in picked],
                        [n.candidate for n in picked],
                        color=colour,
                        marker="o" if decision == "promoted" else "x",
                        zorder=3,
                        label=f"candidate, {decision}",
                    )
            ax.set_xticks(xs, [n.when for n in rows], rotation=30, ha="right", fontsize=8)
            figure = scored[-1].figure or ""
            ax.set_ylabel(figure)
            better = "higher" if scored[-1].higher_is_better else "lower"
            ax.set_title(f"{name}: {figure} ({better} is better)")
            ax.legend(fontsize=8)
            out.append(image(fig, f"{name} night by night"))
        out.append(
            table(
                ["night", "decision", "figure", "in service", "candidate", "trained on", "why"],
                [
                    [
                        n.when,
                        f"{n.decision} {n.version or ''}".strip(),
                        n.figure,
                        n.in_service,
                        n.candidate,
                        n.examples,
                        n.why[:160],
                    ]
                    for n in rows
                ],
                title=f"{name}, night by night",
            )
        )
    return out
