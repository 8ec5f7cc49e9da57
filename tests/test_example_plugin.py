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


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict[str, str]:
    site = tmp_path_factory.mktemp("site")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(site),
            str(EXAMPLE),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    assert (site / "chinwag_reminders.py").exists()
    return {"PYTHONPATH": str(site)}


def test_the_installed_plugin_is_listed_with_its_commands(installed, tmp_path):
    rows = json.loads(run_cli("skills", "--json", env=installed, tmp_path=tmp_path).stdout)
    reminders = next(r for r in rows if r["name"] == "reminders")
    assert reminders["plugin"] == "reminders"
    assert {"remind", "reminders", "unremind"} <= {c["name"] for c in reminders["commands"]}


def test_the_installed_plugin_answers_in_the_chat(installed, tmp_path):
    (tmp_path / "chinwag.toml").write_text("[skills.reminders]\nmax_delay_days = 1\n")
    out = run_cli(
        "chat", stdin="/remind 10m tea\n/remind 3d tea\n", env=installed, tmp_path=tmp_path
    ).stdout
    assert "I'll remind you to tea in 10 minutes" in out
    assert "at most 1 days ahead" in out


def test_the_plugins_own_tests_pass_with_the_shipped_fixtures(installed, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
        cwd=EXAMPLE,
        env={**installed, "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 passed" in result.stdout
