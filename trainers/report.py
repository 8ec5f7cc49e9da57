"""Evaluation reports: ``report.json`` for machines and a self-contained ``report.html`` for people.

The HTML file embeds its plots (PNG, base64) and styles, so it can be mailed, attached to a CI
run or kept beside an adapter version and still open anywhere, offline. The page itself is
trainers/templates/report.html.j2 (see trainers/page.py); this module only chooses what to show.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bot.files import atomic_write
from trainers.page import (
    Cell,
    Exchanges,
    Image,
    Items,
    Section,
    figure_table,
    fmt,
    image,
    plt,
    render,
    table,
)


def _scalars(figures: dict[str, Any]) -> list[tuple[str, Any]]:
    return [
        (k, v)
        for k, v in figures.items()
        if isinstance(v, int | float | type(None)) and not isinstance(v, bool)
    ]


def _sentiment_plots(s: dict[str, Any]) -> list[Any]:
    pyplot = plt()
    out: list[Any] = []
    labels = s["labels"]
    fig, ax = pyplot.subplots(figsize=(4.2, 3.6))
    im = ax.imshow(s["confusion"], cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=30)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i, row in enumerate(s["confusion"]):
        for j, v in enumerate(row):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=9)
    fig.colorbar(im, ax=ax)
    ax.set_title("Confusion matrix")
    out.append(image(fig, "sentiment confusion matrix"))
    if s.get("roc_curves"):
        fig, ax = pyplot.subplots(figsize=(4.2, 3.6))
        for label, c in s["roc_curves"].items():
            ax.plot(c["fpr"], c["tpr"], label=label)
        ax.plot([0, 1], [0, 1], "--", color="#999", linewidth=0.8)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.set_title(f"ROC (one-vs-rest), AUC {fmt(s.get('roc_auc'))}")
        ax.legend()
        out.append(image(fig, "sentiment ROC curves"))
    out.append(
        figure_table(
            [
                (f"{label} {m}", s["per_class"][label][m])
                for label in labels
                for m in ("precision", "recall", "f1")
            ]
        )
    )
    if s.get("mistakes"):
        out.append(
            table(
                ["text", "true", "predicted", "confidence"],
                [
                    [m["text"][:200], m["true"], m["predicted"], f"{m['confidence']:.2f}"]
                    for m in s["mistakes"]
                ],
                title="Most confident mistakes",
            )
        )
    return out


def _retrieval_plots(s: dict[str, Any]) -> list[Any]:
    ks = [k for k in s if k.startswith("recall@")]
    fig, ax = plt().subplots(figsize=(4.5, 3.2))
    ax.plot([int(k.split("@")[1]) for k in ks], [s[k] for k in ks], marker="o")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("k")
    ax.set_ylabel("recall@k")
    ax.set_title(f"Retrieval: recall@k (MRR {fmt(s.get('mrr'))})")
    return [image(fig, "retrieval recall at k")]


def _bars(title: str, values: dict[str, float | None], alt: str) -> list[Image]:
    items = [(k, v) for k, v in values.items() if v is not None]
    if not items:
        return []
    fig, ax = plt().subplots(figsize=(5.5, 3.2))
    ax.bar([k for k, _ in items], [v for _, v in items], color="#4c78a8")
    ax.set_ylim(0, 1.05)
    ax.set_title(title)
    ax.tick_params(axis="x", rotation=20)
    return [image(fig, alt)]


def _latency_plot(latency: dict[str, dict[str, Any]], title: str) -> list[Image]:
    if not latency:
        return []
    fig, ax = plt().subplots(figsize=(5, 3))
    skills = list(latency)
    x = range(len(skills))
    ax.bar([i - 0.2 for i in x], [latency[s]["p50"] or 0 for s in skills], 0.4, label="p50")
    ax.bar([i + 0.2 for i in x], [latency[s]["p95"] or 0 for s in skills], 0.4, label="p95")
    ax.set_xticks(list(x), skills)
    ax.set_ylabel("ms")
    ax.set_title(title)
    ax.legend()
    return [image(fig, title)]


def _dialogue_plots(s: dict[str, Any]) -> list[Any]:
    out: list[Any] = []
    if s.get("reply_lengths"):
        fig, ax = plt().subplots(figsize=(4.5, 3))
        ax.hist(s["reply_lengths"], bins=15, color="#72b7b2")
        ax.set_xlabel("words per reply")
        ax.set_title("Reply length")
        out.append(image(fig, "dialogue reply lengths"))
    out += _bars(
        "Diversity and grounding",
        {
            "distinct-1": s.get("distinct_1"),
            "distinct-2": s.get("distinct_2"),
            "repetition": s.get("repetition_rate"),
            "groundedness": s.get("groundedness"),
        },
        "dialogue diversity and grounding",
    )
    out += _latency_plot(s.get("latency_ms", {}), "Dialogue latency by skill")
    if s.get("samples"):
        out.append(Exchanges([(x["prompt"], x["reply"]) for x in s["samples"][:5]]))
    return out


def _qa_plots(s: dict[str, Any]) -> list[Any]:
    out: list[Any] = _bars(
        "QA",
        {
            "containment": s.get("containment"),
            "F1": s.get("f1"),
            "citations": s.get("citation_accuracy"),
            "abstain P": s.get("abstention_precision"),
            "abstain R": s.get("abstention_recall"),
        },
        "qa figures",
    )
    out += _latency_plot(s.get("latency_ms", {}), "QA latency by skill")
    wrong = [c for c in s.get("cases", []) if c.get("f1", 1) < 0.3 or c.get("cited_right") is False]
    if wrong:
        out.append(
            table(
                ["question", "reference", "reply"],
                [[c["question"], c.get("reference", ""), c["reply"][:300]] for c in wrong[:15]],
                title="Weakest answers",
            )
        )
    return out


def _deltas(rows: list[dict[str, Any]]) -> list[Any]:
    if not rows:
        return []
    fig, ax = plt().subplots(figsize=(6.5, max(2.5, 0.28 * len(rows))))
    ax.barh(
        [r["metric"] for r in rows],
        [r["delta"] for r in rows],
        color=["#1a7f37" if r["better"] else "#cf222e" for r in rows],
    )
    ax.axvline(0, color="#555", linewidth=0.8)
    ax.set_title("Change against the baseline (green: better)")
    return [
        image(fig, "deltas against the baseline"),
        table(
            ["figure", "baseline", "now", "delta"],
            [
                [
                    r["metric"],
                    r["baseline"],
                    r["value"],
                    Cell(f"{r['delta']:+.3f}", "better" if r["better"] else "worse"),
                ]
                for r in rows
            ],
        ),
    ]


_PLOTS = {
    "sentiment": _sentiment_plots,
    "retrieval": _retrieval_plots,
    "qa": _qa_plots,
    "dialogue": _dialogue_plots,
}


def render_html(report: dict[str, Any]) -> str:
    sections: list[Section] = []
    if report.get("comparison"):
        sections.append(Section("Against the baseline", _deltas(report["comparison"])))
    for suite, figures in report.get("suites", {}).items():
        blocks: list[Any] = [figure_table(_scalars(figures))]
        plots = _PLOTS.get(suite)
        if plots is not None:
            blocks += plots(figures)
        if suite == "scenarios" and figures.get("failures"):
            blocks.append(
                Items([(f["name"], f"({f['file']}): {f['why']}") for f in figures["failures"]])
            )
        sections.append(Section(suite, blocks, anchor=suite))
    subtitle = f"{report.get('created', '')} · {json.dumps(report.get('context', {}))}"
    return render(f"chinwag evaluation {report.get('created', '')}", sections, subtitle)


def write_report(report: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """``report.json`` and ``report.html`` in ``out_dir`` (each written atomically)."""
    report.setdefault("created", datetime.now(UTC).isoformat(timespec="seconds"))
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, html_path = out_dir / "report.json", out_dir / "report.html"
    atomic_write(json_path, json.dumps(report, indent=2, default=str).encode())
    atomic_write(html_path, render_html(report).encode())
    return json_path, html_path
