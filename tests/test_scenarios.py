"""Scenario files and ``chinwag simulate``: scripted conversations checked turn by turn."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from bot.simulation import ScenarioError, load, run_scenario
from bot.simulation.scenarios import load_file
from tests.conftest import EchoSkill

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "scenarios"


def write(tmp_path: Path, text: str, name: str = "s.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
    return path


# -- the format -------------------------------------------------------------------------------


def test_the_shipped_scenarios_are_valid():
    scenarios = load([EXAMPLES])
    assert len(scenarios) >= 7
    assert {"qa", "help", "dialogue", "sentiment"} <= {
        t.expect.skill for s in scenarios for t in s.turns if t.expect.skill
    }


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("name: x\nturns:\n  - say: hi\n    expect: {skil: qa}\n", 4, "skil"),
        ("name: x\nturns:\n  - say: hi\n  - say: [unclosed\n", 5, "not valid YAML"),
        ("name: x\nturns:\n  - say: hi\n    expect:\n      matches: '(('\n", 5, "regular expr"),
        ("name: x\nturns: []\n", 2, "at least 1"),
        ("name: x\nchat: {users: [ann]}\nturns:\n  - {say: hi, user: bob}\n", 3, "'bob'"),
        ("- just\n- a list\n", 1, "a mapping"),
        ("name: x\nturns:\n  - say: hi\n    rate: great\n", 4, "good"),
    ],
)
def test_a_malformed_scenario_names_its_file_and_line(tmp_path, text, line, words):
    path = write(tmp_path, text)
    with pytest.raises(ScenarioError) as caught:
        load_file(path)
    assert str(caught.value).startswith(f"{path}:{line}: ")
    assert words in str(caught.value)


def test_several_scenarios_per_file_and_duplicate_names_refused(tmp_path):
    path = write(tmp_path, "name: a\nturns: [{say: hi}]\n---\nname: b\nturns: [{say: yo}]\n")
    assert [s.name for s in load([path])] == ["a", "b"]
    write(tmp_path, "name: a\nturns: [{say: again}]\n", "t.yaml")
    with pytest.raises(ScenarioError, match="duplicate scenario name"):
        load([tmp_path])


# -- running ----------------------------------------------------------------------------------


@pytest.fixture
def chinwag_plugins():
    from tests.conftest import SkillsPlugin

    return [SkillsPlugin(EchoSkill())]


async def test_a_scenario_whose_expectations_hold_passes(chinwag_bot, tmp_path):
    (scenario,) = load_file(
        write(
            tmp_path,
            """
            name: echo answers
            turns:
              - say: /echo hello there
                expect: {skill: echo, contains: hello, matches: "^hello", not_contains: bye}
              - say: /help
                expect: {skill: help, contains: /echo}
            """,
        )
    )
    result = await run_scenario(chinwag_bot, scenario)
    assert result.passed, result.transcript()
    assert [t.said for t in result.turns] == ["/echo hello there", "/help"]


async def test_a_scenario_that_must_fail_fails_and_shows_the_conversation(chinwag_bot, tmp_path):
    (scenario,) = load_file(
        write(
            tmp_path,
            """
            name: wrong expectations
            turns:
              - say: /echo first
                expect: {contains: first}
              - say: /echo second
                expect: {skill: qa, contains: third, cites: true, abstains: true}
              - say: /echo never sent
            """,
        )
    )
    result = await run_scenario(chinwag_bot, scenario)
    assert not result.passed
    assert len(result.turns) == 2  # stops at the first failing turn
    assert result.failures == [
        "expected skill 'qa', answered by ['echo']",
        "reply does not contain 'third'",
        "reply cites no source",
        "expected an abstention",
    ]
    transcript = result.transcript()
    assert "1. user: /echo first" in transcript and "bot (echo" in transcript
    assert "✗ reply does not contain 'third'" in transcript


async def test_a_sentiment_expectation_without_a_classifier_is_skipped_and_says_why(
    chinwag_bot, tmp_path
):
    (scenario,) = load_file(
        write(
            tmp_path,
            """
            name: moods
            turns:
              - say: This is awful, I am furious.
                expect: {sentiment: negative}
            """,
        )
    )
    result = await run_scenario(chinwag_bot, scenario)  # the test bot has no classifier
    assert result.skipped is not None and "no sentiment classifier in service" in result.skipped
    assert not result.passed and not result.failed


async def test_a_rating_lands_in_the_feedback_table(chinwag_bot, tmp_path):
    (scenario,) = load_file(
        write(tmp_path, "name: rated\nturns:\n  - say: /echo rate me\n    rate: bad\n")
    )
    result = await run_scenario(chinwag_bot, scenario)
    reply = result.turns[0].replies[0]
    (row,) = await chinwag_bot.store.feedback_for(reply.id)
    assert (row.rating, row.source) == (-1, "simulated")


# -- the command ------------------------------------------------------------------------------


def simulate(tmp_path, *args, env=None):
    base = {k: v for k, v in os.environ.items() if not k.startswith("CHINWAG_")}
    base.update(CHINWAG_DATA_DIR=str(tmp_path / "data"), **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "bot.cli", "simulate", *map(str, args)],
        env=base,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_simulate_runs_the_shipped_scenarios_with_the_real_models(
    tmp_path, sentiment_registry, chinwag_model_cache
):
    junit = tmp_path / "junit.xml"
    done = simulate(
        tmp_path,
        EXAMPLES,
        "--junit",
        junit,
        env={
            "CHINWAG_MODELS__REGISTRY_DIR": str(sentiment_registry),
            "CHINWAG_MODELS__CACHE_DIR": str(chinwag_model_cache),
            "CHINWAG_SKILLS__SENTIMENT__TRAIN_IF_MISSING": "false",
        },
    )
    assert done.returncode == 0, done.stdout + done.stderr
    n = len(load([EXAMPLES]))
    assert done.stdout.strip().splitlines()[-1] == f"{n} passed, 0 failed"
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite is not None and suite.get("tests") == str(n) and suite.get("failures") == "0"
    # Nothing was written to the configured conversation log: a temporary one was used.
    assert not (tmp_path / "data" / "chinwag.sqlite3").exists()


def test_simulate_exits_1_on_a_failure_and_2_on_a_broken_file(tmp_path):
    failing = write(
        tmp_path,
        "name: wants a source\nturns:\n  - say: /help\n    expect: {cites: true}\n",
        "fail.yaml",
    )
    junit = tmp_path / "out.xml"
    env = {"CHINWAG_BOT__FALLBACK": "fallback"}
    done = simulate(tmp_path, failing, "--junit", junit, env=env)
    assert done.returncode == 1
    assert "FAILED wants a source" in done.stdout and "✗ reply cites no source" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == "0 passed, 1 failed"
    failure = ET.parse(junit).getroot().find("testsuite/testcase/failure")
    assert failure is not None and failure.get("message") == "reply cites no source"

    broken = write(tmp_path, "name: x\nturns:\n  - say: hi\n    expect: {skil: qa}\n", "b.yaml")
    done = simulate(tmp_path, broken, env=env)
    assert done.returncode == 2
    assert f"{broken}:4: " in done.stderr


# -- simulated users --------------------------------------------------------------------------


async def test_simulated_users_talk_rate_and_their_ratings_become_feedback(tmp_path):
    from bot.core import Bot
    from bot.simulation.users import in_process, rate, run_users
    from tests.conftest import SkillsPlugin, core_settings

    class Rated(EchoSkill):
        name = "rated"

        async def score(self, message, ctx):
            return 1.0

        async def handle(self, message, ctx):
            from bot import Reply

            return Reply(f"Interesting — tell me more about {message.text[:40]}", rateable=True)

    async with Bot(core_settings(tmp_path), plugins=[SkillsPlugin(Rated())]) as bot:
        send, feedback = in_process(bot)
        report = await run_users(send, feedback, users=6, turns=3, persona="mixed", seed=1)
        summary = report.summary()
        assert summary["users"] == 6 and summary["turns"] == 18 and summary["errors"] == 0
        assert summary["skills"] == {"rated": 18}
        assert summary["thumbs_up"] + summary["thumbs_down"] == 18
        rows = await bot.store.run_in_writer(
            lambda conn: conn.exec_driver_sql("select count(*) from feedback").scalar()
        )
        assert rows == 18
    replay = [e.said for e in report.exchanges if e.persona == "replay"]
    assert replay and all(isinstance(t, str) and t for t in replay)  # real chitchat lines
    assert rate("hello", []) == -1 and rate("hi", [{"text": "hi", "kind": "answer"}]) == -1
    assert rate("hi", [{"text": "Hello! How can I help?", "kind": "answer"}]) == 1


def test_the_pytest_plugin_collects_scenario_files_as_tests(tmp_path):
    write(
        tmp_path,
        """
        name: help works
        turns:
          - say: /help
            expect: {skill: help}
        ---
        name: wants a source
        turns:
          - say: /help
            expect: {cites: true}
        """,
        "bot.scenario.yaml",
    )
    (tmp_path / "pytest.ini").write_text("[pytest]\n", encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHINWAG_")}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "1 failed, 1 passed" in done.stdout, done.stdout + done.stderr
    assert "scenario 'wants a source' failed" in done.stdout
    assert "✗ reply cites no source" in done.stdout
