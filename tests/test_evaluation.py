"""``chinwag eval``: standard metrics, operators' data files, and the report people read."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from trainers import metrics
from trainers.evaluate import DataError, compare, read_labelled_csv, read_qa_jsonl

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "scenarios"


# -- the metrics, against values worked out by hand ------------------------------------------


def test_classification_figures_match_a_hand_computed_case():
    # true: neg neg neu pos; predicted (arg-max): neg neu neu pos
    proba = np.array([[0.8, 0.1, 0.1], [0.3, 0.6, 0.1], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7]])
    r = metrics.classification_report([0, 0, 1, 2], proba, ["negative", "neutral", "positive"])
    assert r["accuracy"] == 0.75
    assert r["per_class"]["negative"] == pytest.approx(
        {"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2}
    )
    assert r["per_class"]["neutral"]["precision"] == 0.5
    assert r["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
    assert r["confusion"] == [[1, 1, 0], [0, 1, 0], [0, 0, 1]]


def test_retrieval_recall_at_k_and_mrr():
    r = metrics.retrieval_metrics([1, 3, None, 2], ks=(1, 3, 5))
    assert (r["recall@1"], r["recall@3"], r["recall@5"]) == (0.25, 0.75, 0.75)
    assert r["mrr"] == pytest.approx((1 + 1 / 3 + 0 + 1 / 2) / 4)


def test_answer_f1_and_containment_follow_squad():
    assert metrics.token_f1("The cat sat.", "a cat sat down") == pytest.approx(0.8)
    assert metrics.token_f1("dogs", "cats") == 0.0
    assert metrics.contains_answer("Open from 10 AM to 4 PM!", "10 am to 4 pm")
    assert not metrics.contains_answer("Open from 9 am", "10 am")


def test_abstention_diversity_and_repetition():
    assert metrics.abstention_metrics([True, True, False, False], [True, False, True, False]) == {
        "abstention_precision": 0.5,
        "abstention_recall": 0.5,
    }
    assert metrics.distinct_n(["a b a b"], 1) == 0.5
    assert metrics.distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)
    assert metrics.repetition_rate("a b c a b c") == 0.25
    assert metrics.percentile([1, 2, 3, 4], 50) == 2.5


def test_a_baseline_comparison_knows_which_way_is_better():
    now = {"suites": {"qa": {"f1": 0.6, "latency_ms": {"qa": {"p50": 900.0, "p95": 2000.0}}}}}
    before = {"suites": {"qa": {"f1": 0.5, "latency_ms": {"qa": {"p50": 800.0, "p95": 2500.0}}}}}
    rows = {r["metric"]: r for r in compare(now, before)}
    assert rows["qa.f1"]["delta"] == pytest.approx(0.1) and rows["qa.f1"]["better"]
    assert not rows["qa.latency_qa_p50_ms"]["better"]
    assert rows["qa.latency_qa_p95_ms"]["better"]


# -- operators' data files -------------------------------------------------------------------


def test_a_bad_label_names_the_file_and_line(tmp_path):
    path = tmp_path / "mine.csv"
    path.write_text("text,label\ngreat film,positive\nmeh,so-so\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{path}:3: label 'so-so' is not one of"):
        read_labelled_csv(path)
    path.write_text("sentence,label\nx,positive\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{path}:1: expected a header"):
        read_labelled_csv(path)


def test_a_broken_qa_line_names_the_file_and_line(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text('{"question": "ok?", "answer": "yes"}\n{"question": oops}\n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{path}:2: not JSON"):
        read_qa_jsonl(path)
    path.write_text('{"answer": "no question"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{path}:1: needs a 'question'"):
        read_qa_jsonl(path)


# -- the command and its report --------------------------------------------------------------


class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.pngs: list[bytes] = []
        self.headings: list[str] = []
        self._in_h2 = False

    def handle_starttag(self, tag, attrs):
        src = dict(attrs).get("src") or ""
        if tag == "img" and src.startswith("data:image/png;base64,"):
            self.pngs.append(base64.b64decode(src.split(",", 1)[1]))
        self._in_h2 = tag == "h2"

    def handle_data(self, data):
        if self._in_h2:
            self.headings.append(data)
            self._in_h2 = False


def chinwag(tmp_path, *args, env):
    base = {k: v for k, v in os.environ.items() if not k.startswith("CHINWAG_")}
    base.update(env)
    return subprocess.run(
        [sys.executable, "-m", "bot.cli", *map(str, args)],
        env=base,
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
    )


def test_eval_writes_figures_and_a_self_contained_html_report_and_compares_runs(
    tmp_path, sentiment_registry, chinwag_model_cache
):
    env = {
        "CHINWAG_DATA_DIR": str(tmp_path / "data"),
        "CHINWAG_MODELS__REGISTRY_DIR": str(sentiment_registry),
        "CHINWAG_MODELS__CACHE_DIR": str(chinwag_model_cache),
        "CHINWAG_SKILLS__SENTIMENT__TRAIN_IF_MISSING": "false",
    }
    added = chinwag(tmp_path, "knowledge", "add", EXAMPLES / "docs" / "library.md", env=env)
    assert added.returncode == 0, added.stderr
    qa = tmp_path / "qa.jsonl"
    qa.write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"question": "How many books can I borrow?", "answer": "12", "source": "library"},
                {"question": "How much do late returns cost?", "answer": "20 cents"},
                {"question": "What is the capital of Peru?", "answer": None},
            ]
        ),
        encoding="utf-8",
    )
    first = chinwag(
        tmp_path,
        "eval",
        "--qa-data",
        qa,
        "--scenarios",
        EXAMPLES / "commands.yaml",
        "--dialogue-prompts",
        "3",
        "--sentiment-limit",
        "60",
        "--out",
        tmp_path / "first",
        env=env,
    )
    assert first.returncode == 0, first.stdout + first.stderr
    report = json.loads((tmp_path / "first" / "report.json").read_text())
    suites = report["suites"]
    assert set(suites) == {"sentiment", "retrieval", "qa", "dialogue", "scenarios"}
    assert suites["sentiment"]["n"] == 60 and 0.5 < suites["sentiment"]["accuracy"] <= 1
    assert suites["retrieval"]["recall@5"] == 1.0
    assert suites["qa"]["citation_accuracy"] == 1.0
    assert suites["scenarios"]["pass_rate"] == 1.0
    assert suites["dialogue"]["n"] == 3 and suites["dialogue"]["distinct_1"] > 0
    assert "sentiment: accuracy" in first.stdout and "report:" in first.stdout

    page = _Images()
    page.feed((tmp_path / "first" / "report.html").read_text())
    assert {"sentiment", "retrieval", "qa", "dialogue", "scenarios"} <= set(page.headings)
    assert len(page.pngs) >= 6 and all(p.startswith(b"\x89PNG") for p in page.pngs)

    labelled = tmp_path / "mine.csv"
    labelled.write_text(
        'text,label\n"A dull, lifeless and boring film.",negative\n'
        '"A joyous, moving and beautifully acted triumph.",positive\n',
        encoding="utf-8",
    )
    second = chinwag(
        tmp_path,
        "eval",
        "sentiment",
        "--data",
        labelled,
        "--baseline",
        tmp_path / "first" / "report.json",
        "--out",
        tmp_path / "second",
        env=env,
    )
    assert second.returncode == 0, second.stdout + second.stderr
    compared = json.loads((tmp_path / "second" / "report.json").read_text())["comparison"]
    assert "sentiment.accuracy" in {r["metric"] for r in compared}
    assert "Against the baseline" in (tmp_path / "second" / "report.html").read_text()

    broken = chinwag(tmp_path, "eval", "qa", "--data", labelled, env=env)
    assert broken.returncode == 2 and f"{labelled}:1: not JSON" in broken.stderr


def test_eval_options_before_a_sub_command_apply_to_it(tmp_path):
    env = {"CHINWAG_DATA_DIR": str(tmp_path / "data"), "CHINWAG_PLUGINS": "help,trainers"}
    scenario = tmp_path / "help.yaml"
    scenario.write_text("name: help answers\nturns:\n  - say: /help\n    expect: {skill: help}\n")
    done = chinwag(tmp_path, "eval", "--out", tmp_path / "here", "scenarios", scenario, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "here" / "report.json").exists()
    assert "scenarios: passed 1, skipped 0, n 1" in done.stdout


# -- the LLM-as-judge panel ------------------------------------------------------------------


@pytest.fixture
async def judge_server():
    """An OpenAI-compatible stand-in whose judging rule each test picks."""
    from aiohttp import web
    from aiohttp.test_utils import TestServer

    state = {"rule": "fair", "prompts": []}

    def verdict(prompt: str) -> str:
        a = prompt.split("Answer A:\n", 1)[1].split("\n\nAnswer B:\n", 1)[0]
        if state["rule"] == "biased":
            return "A: 8/10, B: 5/10"  # always prefers whatever comes first
        if state["rule"] == "mute":
            return "I would rather not say."
        return "A: 9/10, B: 3/10" if "12" in a else "A: 3/10, B: 9/10"

    async def chat(request):
        body = await request.json()
        prompt = body["messages"][-1]["content"]
        state["prompts"].append(prompt)
        text = verdict(prompt) if "final scores" in prompt else "I lean towards one answer."
        return web.json_response(
            {"choices": [{"message": {"content": text}, "finish_reason": "stop"}], "usage": {}}
        )

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    server = TestServer(app)
    await server.start_server()
    state["url"] = str(server.make_url("/v1"))
    yield state
    await server.close()


async def test_the_panel_debates_and_prefers_the_right_answer_in_both_orders(judge_server):
    from trainers.judge import JudgePanel

    panel = JudgePanel(judge_server["url"], "judge")
    try:
        v = await panel.compare("How many books?", "You can borrow 12 books.", "Some books.")
    finally:
        await panel.close()
    assert v.winner == "a" and v.position_consistent and (v.a, v.b) == (9.0, 3.0)
    assert [d["judge"] for d in v.discussion[:3]] == ["critic", "user advocate", "subject expert"]
    # Each judge read the ones before it (ChatEval's one-by-one debate).
    third = judge_server["prompts"][2]
    assert "critic: I lean" in third and "user advocate: I lean" in third


async def test_a_judge_biased_towards_the_first_answer_ends_in_a_tie(judge_server):
    from trainers.judge import JudgePanel, judge_against_references

    judge_server["rule"] = "biased"
    panel = JudgePanel(judge_server["url"], "judge")
    try:
        v = await panel.compare("Q?", "first", "second")
        assert v.winner == "tie" and not v.position_consistent and v.a == v.b == 6.5
        judge_server["rule"] = "mute"
        result = await judge_against_references(
            panel, [{"question": "Q?", "reply": "x", "reference": "y"}]
        )
    finally:
        await panel.close()
    assert result["judge_unreadable"] == 6  # 3 judges × 2 orders, none readable
    assert result["judge_vs_reference"] == 0.5  # no readable verdict is no win


def test_what_users_typed_shows_as_text_in_the_report_never_as_markup(tmp_path):
    from trainers.report import write_report

    hostile = '<img src=x onerror="alert(1)">'
    _, html_path = write_report(
        {
            "suites": {
                "qa": {"f1": 0.1, "cases": [{"question": hostile, "reply": "</table>", "f1": 0.0}]},
                "scenarios": {"failures": [{"name": hostile, "file": "a.yaml", "why": "<b>"}]},
            }
        },
        tmp_path,
    )
    page = html_path.read_text()
    assert hostile not in page and "&lt;img src=x onerror=" in page
    assert page.count("</table>") == page.count("<table>")  # the reply did not close a table
