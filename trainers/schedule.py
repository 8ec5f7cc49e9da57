"""The nightly schedule: a small process that starts one training cycle per cron tick.

``chinwag run`` starts it as a child process (``chinwag train``); each tick runs the cycle in a
process of its own (``chinwag train --now``), so neither a cycle's memory nor a crash in it can
reach the scheduler — let alone the bot. A tick that finds a cycle still running skips (the
cycle lock answers "busy"); a tick missed while the machine slept runs once on waking, within
an hour (APScheduler's misfire grace).
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
from typing import Any

from bot.process import die_with_parent

log = logging.getLogger(__name__)


def cycle_command() -> list[str]:
    return [sys.executable, "-m", "bot.cli", "train", "--now"]


def child_env(settings: Any) -> dict[str, str]:
    """The environment a child needs to see the same configuration as its parent."""
    env = dict(os.environ)
    env["CHINWAG_DATA_DIR"] = str(settings.data_dir)
    return env


def run_one(settings: Any) -> int:
    log.info("training cycle: starting")
    done = subprocess.run(
        cycle_command(), env=child_env(settings), check=False, preexec_fn=die_with_parent
    )
    if done.returncode == 3:
        log.info("training cycle: skipped, the previous one is still running")
    elif done.returncode != 0:
        log.error("training cycle failed with exit status %d", done.returncode)
    return done.returncode


def run_schedule(settings: Any, config: Any) -> None:
    from apscheduler.schedulers.blocking import BlockingScheduler
    from apscheduler.triggers.cron import CronTrigger

    try:
        trigger = CronTrigger.from_crontab(config.schedule, timezone=config.timezone)
    except ValueError as exc:
        from bot.config import ConfigError

        raise ConfigError(f"trainers.schedule {config.schedule!r}: {exc}") from None
    scheduler = BlockingScheduler(timezone=config.timezone)
    scheduler.add_job(
        run_one,
        trigger,
        args=[settings],
        max_instances=1,
        coalesce=True,
        misfire_grace_time=3600,
        id="training-cycle",
    )
    log.info("training cycle scheduled: %s (%s)", config.schedule, config.timezone)
    with contextlib.suppress(KeyboardInterrupt, SystemExit):
        scheduler.start()  # SIGTERM ends the process: it holds no state worth saving
