"""Configuration and the ``chinwag`` command line, as an operator meets them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bot.config import ConfigError, load_settings
from tests.conftest import core_settings

CHINWAG = [sys.executable, "-m", "bot.cli"]


def run_cli(*args, stdin="", env=None, tmp_path: Path):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("CHINWAG_")}
    full_env["CHINWAG_DATA_DIR"] = str(tmp_path / "data")
    # The CLI's specifications: the model-free fallback, no first-start training.
    full_env["CHINWAG_BOT__FALLBACK"] = "fallback"
    full_env["CHINWAG_MODELS__FIRST_START_TRAINING"] = "false"
    full_env.update(env or {})
    return subprocess.run(
        [*CHINWAG, *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=full_env,
        cwd=tmp_path,
        timeout=120,
    )


def test_a_toml_file_and_environment_combine_with_environment_winning(tmp_path, monkeypatch):
    cfg = tmp_path / "chinwag.toml"
    cfg.write_text('[bot]\nname = "helpdesk"\nmax_concurrency = 8\n[telegram]\ntoken = "in-file"\n')
    monkeypatch.setenv("CHINWAG_TELEGRAM__TOKEN", "123456:from-env-secret-value-xxxxxxxxxxxxxxx")
    s = load_settings(cfg)
    assert (s.bot.name, s.bot.max_concurrency) == ("helpdesk", 8)
    assert s.telegram.token.get_secret_value().endswith("xxx")
    assert "from-env" not in json.dumps(s.masked())


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ("[bot]\nmax_concurrency = 0\n", "bot.max_concurrency: Input should be greater than 0"),
        ("[bot]\nmax_concurency = 3\n", "bot.max_concurency: unknown key"),
        ("[database]\nsynchronous = 'SOMETIMES'\n", "database.synchronous"),
        ("[bot\nname = 1\n", "not valid TOML"),
        ("[rate_limit]\nburst = 'lots'\n", "rate_limit.burst"),
        ("[models]\nbackend = 'vlm'\n", "models.backend"),
        ("[models.vllm]\nprot = 8000\n", "models.vllm.prot: unknown key"),
        ("[models.vllm]\nport = 70000\n", "models.vllm.port"),
    ],
)
def test_a_broken_config_names_the_key_and_the_problem(tmp_path, toml, expected):
    cfg = tmp_path / "chinwag.toml"
    cfg.write_text(toml)
    with pytest.raises(ConfigError) as err:
        load_settings(cfg)
    assert expected in str(err.value)
    assert str(cfg) in str(err.value)


def test_a_broken_config_stops_startup_with_exit_code_2(tmp_path):
    (tmp_path / "chinwag.toml").write_text("[bot]\nmax_concurrency = -1\n")
    result = run_cli("chat", stdin="hi\n", tmp_path=tmp_path)
    assert result.returncode == 2
    assert "bot.max_concurrency" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_skill_section_is_validated_by_the_skills_own_model(tmp_path):
    from bot.core import Bot

    settings = core_settings(tmp_path, {"skills": {"help": {"colour": "red"}}})
    with pytest.raises(ConfigError, match=r"skills\.help\.colour: unknown key"):
        Bot(settings).load_skills()


def test_piped_chat_prints_one_reply_block_per_message(tmp_path):
    result = run_cli("chat", stdin="hello\n/help\n", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    blocks = [b for b in result.stdout.split("\n\n") if b.strip()]
    assert len(blocks) == 2
    assert "can't answer that yet" in blocks[0]
    assert "/help" in blocks[1] and "/forget" in blocks[1]


def test_the_console_chat_ends_at_quit_and_answers_nothing_after_it(tmp_path):
    result = run_cli("chat", stdin="/help\n/quit\n/help\n", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("Here is what I can do:") == 1
    assert "/quit" not in result.stdout  # not "I don't know the command /quit"


def test_piped_chat_prints_replies_only_and_logs_go_to_stderr(tmp_path):
    result = run_cli("-v", "chat", stdin="/help\n", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    assert " INFO " in result.stderr  # -v: the log is on, and it is on stderr
    for line in result.stdout.splitlines():
        assert " INFO " not in line and "Loading weights" not in line
    assert result.stdout.startswith("Here is what I can do:")


def test_help_shows_each_command_once_with_its_arguments(tmp_path):
    out = run_cli("chat", stdin="/help\n", tmp_path=tmp_path).stdout
    assert "/forget — " in out
    assert "/bad /bad" not in out and "/ask /ask" not in out
    if "/ask" in out:
        assert "/ask QUESTION — " in out


def test_forget_counts_the_users_messages_apart_from_the_bots_replies(tmp_path):
    out = run_cli("chat", stdin="hello\nhello again\n/forget\n", tmp_path=tmp_path).stdout
    # Two messages and the /forget itself; the two replies to the messages.
    assert "3 messages of yours, 2 replies of mine to you and 0 ratings" in out


def test_disabling_the_trainers_plugin_also_stops_its_nightly_schedule(tmp_path):
    on = run_cli("run", stdin="/help\n", tmp_path=tmp_path)
    assert "training schedule: process" in on.stderr
    (tmp_path / "chinwag.toml").write_text('disabled_plugins = ["trainers"]\n')
    off = run_cli("run", stdin="/help\n", tmp_path=tmp_path)
    assert off.returncode == 0, off.stderr
    assert "training schedule: process" not in off.stderr
    assert "/start" in off.stdout


def test_run_with_no_platform_and_stdin_closed_says_why_it_stops(tmp_path):
    result = run_cli("run", stdin="", tmp_path=tmp_path)
    assert result.returncode == 2
    assert "no platform is configured" in result.stderr
    assert "CHINWAG_TELEGRAM__TOKEN" in result.stderr


def test_skills_json_names_the_distribution_version_and_command_usage(tmp_path):
    rows = {r["name"]: r for r in json.loads(run_cli("skills", "--json", tmp_path=tmp_path).stdout)}
    assert rows["help"]["distribution"] == "chinwag" and rows["help"]["version"]
    usages = {c["name"]: c["usage"] for r in rows.values() for c in r["commands"]}
    assert usages["forget"] == "/forget"
    if "ask" in usages:
        assert usages["ask"] == "/ask QUESTION"


def test_piped_chat_with_json_reports_skill_latency_and_metadata(tmp_path):
    result = run_cli("chat", "--json", stdin="hello\n/help\n\n", tmp_path=tmp_path)
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["message"] for line in lines] == ["hello", "/help", ""]
    assert [line["replies"][0]["skill"] for line in lines] == ["fallback", "help", "core"]
    assert all(line["replies"][0]["latency_ms"] >= 0 for line in lines)
    assert all(isinstance(line["replies"][0]["id"], int) for line in lines)


def test_skills_lists_what_loaded_with_commands_and_plugin(tmp_path):
    result = run_cli("skills", "--json", tmp_path=tmp_path)
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert {"help", "fallback", "privacy", "admin"} <= set(rows)
    assert rows["help"]["plugin"] == "help"
    assert [c["name"] for c in rows["help"]["commands"]] == ["help", "start"]
    assert rows["fallback"]["fallback"] is True
    human = run_cli("skills", tmp_path=tmp_path)
    assert "/forget" in human.stdout and "skills loaded" in human.stdout


def test_the_plugins_env_var_restricts_what_loads(tmp_path):
    result = run_cli("skills", "--json", env={"CHINWAG_PLUGINS": "help"}, tmp_path=tmp_path)
    assert [r["name"] for r in json.loads(result.stdout)] == ["help"]
    chat = run_cli("chat", stdin="hello\n", env={"CHINWAG_PLUGINS": "help"}, tmp_path=tmp_path)
    assert "/help" in chat.stdout  # no fallback loaded: the core still answers


def test_config_prints_the_effective_configuration_with_secrets_masked(tmp_path):
    token = "123456789:AAFakeTokenForTestsOnly_abcdefghijklmn"
    result = run_cli(
        "config",
        env={
            "CHINWAG_TELEGRAM__TOKEN": token,
            "CHINWAG_DATABASE__URL": "postgresql+asyncpg://bot:hunter2@db/chinwag",
        },
        tmp_path=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["telegram"]["token"] == "**********"
    assert "hunter2" not in result.stdout and token not in result.stdout
    assert data["database"]["url"].startswith("postgresql+asyncpg://bot:***@db")


def test_db_upgrade_creates_the_schema(tmp_path):
    result = run_cli("db", "upgrade", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "database at revision 0001" in result.stdout
    assert "current: 0001" in run_cli("db", "current", tmp_path=tmp_path).stdout


def test_run_without_platform_tokens_starts_the_console_chat(tmp_path):
    result = run_cli("run", stdin="/help\n", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "/start" in result.stdout


def _install_example_plugin(tmp_path: Path) -> dict[str, str]:
    """Make the example plugin discoverable the way pip would: a dist-info with entry points."""
    site = tmp_path / "site"
    dist = site / "chinwag_hello-0.1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: chinwag-hello\nVersion: 0.1.0\n")
    (dist / "entry_points.txt").write_text("[chinwag]\nhello = chinwag_hello\n")
    example = Path(__file__).resolve().parents[1] / "examples" / "plugin-hello"
    return {"PYTHONPATH": os.pathsep.join([str(site), str(example)])}


def test_a_third_party_plugin_loads_by_the_same_path_as_the_built_ins(tmp_path):
    env = _install_example_plugin(tmp_path)
    rows = json.loads(run_cli("skills", "--json", env=env, tmp_path=tmp_path).stdout)
    hello = next(r for r in rows if r["name"] == "hello")
    assert hello["plugin"] == "hello"
    (tmp_path / "chinwag.toml").write_text('[skills.hello]\ngreeting = "Howdy"\n')
    chat = run_cli("chat", stdin="hi there!\n/hello Bob\n", env=env, tmp_path=tmp_path)
    assert "Howdy, " in chat.stdout and "Howdy, Bob!" in chat.stdout
    cli = run_cli("hello", "--name", "Ann", env=env, tmp_path=tmp_path)
    assert "Hello, Ann! (from chinwag-hello)" in cli.stdout


def test_a_third_party_skills_bad_config_names_its_key(tmp_path):
    env = _install_example_plugin(tmp_path)
    (tmp_path / "chinwag.toml").write_text("[skills.hello]\ngreeting = 42\n")
    result = run_cli("chat", stdin="hi\n", env=env, tmp_path=tmp_path)
    assert result.returncode == 2
    assert "skills.hello.greeting" in result.stderr


def test_the_example_configuration_is_valid_and_matches_the_defaults(tmp_path):
    example = Path(__file__).resolve().parents[1] / "examples" / "chinwag.toml"
    from bot.config import Settings
    from bot.plugins import make_manager, plugin_sections

    s = load_settings(example, {"data_dir": tmp_path})
    defaults = Settings(data_dir=tmp_path)
    assert s.model_dump(exclude={"sections"}) == defaults.model_dump(exclude={"sections"})
    # The plugins' own sections ([knowledge], [trainers]) are checked by their plugins.
    pm, _ = make_manager()
    sections = plugin_sections(pm, s)
    assert {"knowledge", "trainers"} <= set(sections) and set(s.sections) <= set(sections)
    for name, value in sections.items():
        assert value == type(value)(), f"[{name}] in the example differs from the defaults"


def test_every_mistake_in_every_plugins_section_is_reported_at_once(tmp_path):
    (tmp_path / "chinwag.toml").write_text(
        '[knowledge]\nmin_score = "high"\nchunk_tokens = 2\n'
        '[trainers]\ngate_alpha = "often"\nnightly = true\n'
        "[skills.dialogue]\nmax_new_tokenz = 5\n"
    )
    result = run_cli("config", tmp_path=tmp_path)
    assert result.returncode == 2
    for key in (
        "knowledge.min_score",
        "knowledge.chunk_tokens",
        "trainers.gate_alpha",
        "trainers.nightly: unknown key",
        "skills.dialogue.max_new_tokenz: unknown key",
    ):
        assert key in result.stderr, result.stderr


def test_plugins_sections_read_the_environment_like_the_cores(tmp_path):
    (tmp_path / "chinwag.toml").write_text("[knowledge]\nmin_score = 0.2\nnprobe = 4\n")
    env = {
        "CHINWAG_KNOWLEDGE__MIN_SCORE": "0.45",
        "CHINWAG_TRAINERS": '{"schedule": "30 2 * * *"}',
    }
    result = run_cli("config", env=env, tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["knowledge"]["min_score"] == 0.45 and shown["knowledge"]["nprobe"] == 4
    assert shown["trainers"]["schedule"] == "30 2 * * *"
    assert shown["knowledge"]["chunk_tokens"] == 250  # defaults shown in full
    broken = run_cli("config", env={"CHINWAG_TRAINERS": "{not json"}, tmp_path=tmp_path)
    assert broken.returncode == 2 and "CHINWAG_TRAINERS" in broken.stderr


def test_a_section_no_plugin_declares_is_pointed_out(tmp_path):
    (tmp_path / "chinwag.toml").write_text("[knowlege]\nmin_score = 0.5\n")
    result = run_cli("config", tmp_path=tmp_path)
    assert result.returncode == 0
    assert "[knowlege] section but no loaded plugin declares it" in result.stderr


def test_a_disabled_plugin_adds_no_cli_commands(tmp_path):
    assert " train " in run_cli("--help", tmp_path=tmp_path).stdout
    cfg = tmp_path / "chinwag.toml"
    cfg.write_text('disabled_plugins = ["trainers"]\n')
    out = run_cli("--config", str(cfg), "--help", tmp_path=tmp_path).stdout
    assert " train " not in out and " chat " in out


def test_piped_progress_gives_a_time_left_only_once_it_has_a_pace_to_go_by():
    import io
    import time

    from rich.console import Console

    from bot.progress import _progress_lines

    out = io.StringIO()
    with _progress_lines(Console(file=out, width=200), every_s=0) as progress:
        progress("train", 1, 42)  # a stage first heard of at step 1: no "0 s left"
        time.sleep(0.05)
        progress("train", 2, 42)
        progress("train", 42, 42)
    first, second, last = out.getvalue().splitlines()
    assert first == "train: 1/42"
    assert second.startswith("train: 2/42 (5%, about ") and second.endswith(" left)")
    assert last.startswith("train: 42/42")
