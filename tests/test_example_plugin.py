"""The example third-party plugin (examples/chinwag-reminders), installed by pip the way an
operator installs a plugin, then listed, used and tested with its own suite."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_config_and_cli import run_cli

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "chinwag-reminders"


def pip_install(source: Path, site: Path) -> None:
    subprocess.run(
        [
            *(sys.executable, "-m", "pip", "install", "--quiet", "--no-deps"),
            *("--no-build-isolation", "--target", str(site), str(source)),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )


def assert_own_tests_pass(project: Path, site: Path, home: Path, passed: int) -> None:
    """pytest in the plugin's folder, as its author runs it: no chinwag checkout in sight."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
        cwd=project,
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{passed} passed" in result.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    site = tmp_path_factory.mktemp("site")
    pip_install(EXAMPLE, site)
    assert (site / "chinwag_reminders.py").exists()
    return site


@pytest.fixture
def on_path(installed) -> dict[str, str]:
    return {"PYTHONPATH": str(installed)}


def test_the_installed_plugin_is_listed_with_its_commands(on_path, tmp_path):
    rows = json.loads(run_cli("skills", "--json", env=on_path, tmp_path=tmp_path).stdout)
    reminders = next(r for r in rows if r["name"] == "reminders")
    assert reminders["plugin"] == "reminders"
    assert {"remind", "reminders", "unremind"} <= {c["name"] for c in reminders["commands"]}


def test_the_installed_plugin_answers_in_the_chat(on_path, tmp_path):
    (tmp_path / "chinwag.toml").write_text("[skills.reminders]\nmax_delay_days = 1\n")
    out = run_cli(
        "chat", stdin="/remind 10m tea\n/remind 3d tea\n", env=on_path, tmp_path=tmp_path
    ).stdout
    assert "I'll remind you to tea in 10 minutes" in out
    assert "at most 1 days ahead" in out


def test_the_plugins_own_tests_pass_with_the_shipped_fixtures(installed, tmp_path):
    assert_own_tests_pass(EXAMPLE, installed, tmp_path, passed=4)


DOCS = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"


def docs_files() -> dict[str, str]:
    """The code blocks of docs/plugins.md whose first line names a file (``# path``)."""
    import re

    files = {}
    for block in re.findall(r"```(?:toml|python)\n(.*?)```", DOCS.read_text(), re.S):
        first, _, rest = block.partition("\n")
        name = first.lstrip("# ").strip()
        if first.startswith("# ") and re.fullmatch(r"[\w/]+\.(py|toml)", name):
            files[name] = rest
    return files


def test_the_plugin_walkthrough_in_the_docs_installs_and_its_tests_pass(tmp_path):
    files = docs_files()
    assert {"pyproject.toml", "chinwag_weather.py", "tests/test_weather.py"} <= set(files)
    project = tmp_path / "chinwag-weather"
    for name, text in files.items():
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text(text)
    site = tmp_path / "site"
    pip_install(project, site)
    assert_own_tests_pass(project, site, tmp_path, passed=3)


def test_the_hello_example_passes_its_own_tests(tmp_path):
    example = EXAMPLE.parent / "plugin-hello"
    site = tmp_path / "site"
    pip_install(example, site)
    assert_own_tests_pass(example, site, tmp_path, passed=3)


def test_a_projects_own_bot_module_gets_an_explanation_not_an_import_error(tmp_path):
    (tmp_path / "bot.py").write_text("TOKEN = 'mine'\n")
    (tmp_path / "test_x.py").write_text("def test_x():\n    pass\n")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = result.stdout + result.stderr
    assert result.returncode != 0
    assert "shadows chinwag's own 'bot' package" in out
    assert "Rename your module" in out
