"""Evaluation reports: ``report.json`` for machines and a self-contained ``report.html`` for people.

The HTML file embeds its plots (PNG, base64) and styles, so it can be mailed, attached to a CI
run or kept beside an adapter version and still open anywhere, offline. Plots are drawn with
matplotlib's non-interactive backend (no display needed on servers).
"""

from __future__ import annotations

import base64
import html
import io
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bot.files import atomic_write

_CSS = """
body{font:15px/1.5 system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ddd;padding:.25em .6em;
text-align:right}th{background:#f5f5f5}td:first-child,th:first-child{text-align:left}
.better{color:#1a7f37}.worse{color:#cf222e}img{max-width:100%;margin:.5em 0}
.muted{color:#777}pre{white-space:pre-wrap;background:#f7f7f7;padding:.5em}
"""


def _fig_to_img(fig: Any, alt: str) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    data = base64.b64encode(buf.getvalue()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3f}"
    return html.escape(str(value))


def _table(rows: list[tuple[str, Any]]) -> str:
    body = "".join(f"<tr><td>{html.escape(k)}</td><td>{_fmt(v)}</td></tr>" for k, v in rows)
    return f"<table><tr><th>figure</th><th>value</th></tr>{body}</table>"


def _scalars(figures: dict[str, Any]) -> list[tuple[str, Any]]:
    return [
        (k, v)
        for k, v in figures.items()
        if isinstance(v, int | float | type(None)) and not isinstance(v, bool)
    ]


def _sentiment_plots(s: dict[str, Any]) -> str:
    plt = _plt()
    out = []
    labels = s["labels"]
    fig, ax = plt.subplots(figsize=(4.2, 3.6))
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
    out.append(_fig_to_img(fig, "sentiment confusion matrix"))
    if s.get("roc_curves"):
        fig, ax = plt.subplots(figsize=(4.2, 3.6))
        for label, c in s["roc_curves"].items():
            ax.plot(c["fpr"], c["tpr"], label=label)
        ax.plot([0, 1], [0, 1], "--", color="#999", linewidth=0.8)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.set_title(f"ROC (one-vs-rest), AUC {_fmt(s.get('roc_auc'))}")
        ax.legend()
        out.append(_fig_to_img(fig, "sentiment ROC curves"))
    per_class = [
        (f"{label} {m}", s["per_class"][label][m])
        for label in labels
        for m in ("precision", "recall", "f1")
    ]
    mistakes = "".join(
        f"<tr><td>{html.escape(m['text'][:200])}</td><td>{m['true']}</td><td>{m['predicted']}"
        f"</td><td>{m['confidence']:.2f}</td></tr>"
        for m in s.get("mistakes", [])
    )
    if mistakes:
        mistakes = (
            "<h3>Most confident mistakes</h3><table><tr><th>text</th><th>true</th>"
            f"<th>predicted</th><th>confidence</th></tr>{mistakes}</table>"
        )
    return "".join(out) + _table(per_class) + mistakes


def _retrieval_plots(s: dict[str, Any]) -> str:
    plt = _plt()
    ks = [k for k in s if k.startswith("recall@")]
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    ax.plot([int(k.split("@")[1]) for k in ks], [s[k] for k in ks], marker="o")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("k")
    ax.set_ylabel("recall@k")
    ax.set_title(f"Retrieval: recall@k (MRR {_fmt(s.get('mrr'))})")
    return _fig_to_img(fig, "retrieval recall at k")


def _bars(title: str, values: dict[str, float | None], alt: str) -> str:
    plt = _plt()
    items = [(k, v) for k, v in values.items() if v is not None]
    if not items:
        return ""
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    ax.bar([k for k, _ in items], [v for _, v in items], color="#4c78a8")
    ax.set_ylim(0, 1.05)
    ax.set_title(title)
    ax.tick_params(axis="x", rotation=20)
    return _fig_to_img(fig, alt)


def _latency_plot(table: dict[str, dict[str, Any]], title: str) -> str:
    plt = _plt()
    if not table:
        return ""
    fig, ax = plt.subplots(figsize=(5, 3))
    skills = list(table)
    x = range(len(skills))
    ax.bar([i - 0.2 for i in x], [table[s]["p50"] or 0 for s in skills], 0.4, label="p50")
    ax.bar([i + 0.2 for i in x], [table[s]["p95"] or 0 for s in skills], 0.4, label="p95")
    ax.set_xticks(list(x), skills)
    ax.set_ylabel("ms")
    ax.set_title(title)
    ax.legend()
    return _fig_to_img(fig, title)


def _dialogue_plots(s: dict[str, Any]) -> str:
    plt = _plt()
    out = []
    if s.get("reply_lengths"):
        fig, ax = plt.subplots(figsize=(4.5, 3))
        ax.hist(s["reply_lengths"], bins=15, color="#72b7b2")
        ax.set_xlabel("words per reply")
        ax.set_title("Reply length")
        out.append(_fig_to_img(fig, "dialogue reply lengths"))
    out.append(
        _bars(
            "Diversity and grounding",
            {
                "distinct-1": s.get("distinct_1"),
                "distinct-2": s.get("distinct_2"),
                "repetition": s.get("repetition_rate"),
                "groundedness": s.get("groundedness"),
            },
            "dialogue diversity and grounding",
        )
    )
    out.append(_latency_plot(s.get("latency_ms", {}), "Dialogue latency by skill"))
    samples = "".join(
        f"<p><b>user:</b> {html.escape(x['prompt'])}<br><b>bot:</b> {html.escape(x['reply'])}</p>"
        for x in s.get("samples", [])[:5]
    )
    return "".join(out) + (f"<h3>Samples</h3>{samples}" if samples else "")


def _qa_plots(s: dict[str, Any]) -> str:
    out = _bars(
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
        rows = "".join(
            f"<tr><td>{html.escape(c['question'])}</td><td>{html.escape(c.get('reference', ''))}"
            f"</td><td>{html.escape(c['reply'][:300])}</td></tr>"
            for c in wrong[:15]
        )
        out += (
            "<h3>Weakest answers</h3><table><tr><th>question</th><th>reference</th>"
            f"<th>reply</th></tr>{rows}</table>"
        )
    return out


def _deltas(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, max(2.5, 0.28 * len(rows))))
    ax.barh(
        [r["metric"] for r in rows],
        [r["delta"] for r in rows],
        color=["#1a7f37" if r["better"] else "#cf222e" for r in rows],
    )
    ax.axvline(0, color="#555", linewidth=0.8)
    ax.set_title("Change against the baseline (green: better)")
    body = "".join(
        f"<tr><td>{html.escape(r['metric'])}</td><td>{_fmt(r['baseline'])}</td>"
        f'<td>{_fmt(r["value"])}</td><td class="{"better" if r["better"] else "worse"}">'
        f"{r['delta']:+.3f}</td></tr>"
        for r in rows
    )
    return _fig_to_img(fig, "deltas against the baseline") + (
        f"<table><tr><th>figure</th><th>baseline</th><th>now</th><th>delta</th></tr>{body}</table>"
    )


_PLOTS = {
    "sentiment": _sentiment_plots,
    "retrieval": _retrieval_plots,
    "qa": _qa_plots,
    "dialogue": _dialogue_plots,
}


def render_html(report: dict[str, Any]) -> str:
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>chinwag evaluation {html.escape(report.get('created', ''))}</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>chinwag evaluation</h1>",
        f"<p class='muted'>{html.escape(report.get('created', ''))} · "
        f"{html.escape(json.dumps(report.get('context', {})))}</p>",
    ]
    if report.get("comparison"):
        parts.append("<h2>Against the baseline</h2>" + _deltas(report["comparison"]))
    for suite, figures in report.get("suites", {}).items():
        parts.append(f"<h2 id='{html.escape(suite)}'>{html.escape(suite)}</h2>")
        parts.append(_table(_scalars(figures)))
        plots = _PLOTS.get(suite)
        if plots is not None:
            parts.append(plots(figures))
        if suite == "scenarios" and figures.get("failures"):
            items = "".join(
                f"<li><b>{html.escape(f['name'])}</b> ({html.escape(f['file'])}): "
                f"{html.escape(f['why'])}</li>"
                for f in figures["failures"]
            )
            parts.append(f"<ul>{items}</ul>")
    parts.append("</body></html>")
    return "".join(parts)


def write_report(report: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """``report.json`` and ``report.html`` in ``out_dir`` (each written atomically)."""
    report.setdefault("created", datetime.now(UTC).isoformat(timespec="seconds"))
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, html_path = out_dir / "report.json", out_dir / "report.html"
    atomic_write(json_path, json.dumps(report, indent=2, default=str).encode())
    atomic_write(html_path, render_html(report).encode())
    return json_path, html_path
