"""Reminders for chinwag: ``/remind 20m stretch``, or just "remind me to stretch in 20 minutes".

A complete third-party skill as an operator writes one: a command, a scored trigger for plain
language, its own ``[skills.reminders]`` configuration section, persistent state in the data
directory, a background task started by the ``startup`` hook, and messages sent unprompted
through ``bot.push``. Reminders are kept in SQLite, so a restart delivers the ones that fell
due while the bot was down (marked late) instead of losing them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import sqlite3
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from bot import Command, Context, Message, Reply, Skill, hookimpl

log = logging.getLogger(__name__)

UNITS = {
    "s": 1,
    "sec": 1,
    "second": 1,
    "m": 60,
    "min": 60,
    "minute": 60,
    "h": 3600,
    "hr": 3600,
    "hour": 3600,
    "d": 86400,
    "day": 86400,
    "w": 604800,
    "week": 604800,
}
_AMOUNT = (
    r"(\d+(?:\.\d+)?|an?|one)\s*(s|secs?|seconds?|m|mins?|minutes?|h|hrs?|hours?|d|days?|w|weeks?)"
)
# "/remind 20m stretch", "/remind in 2 hours call mum"
COMMAND = re.compile(rf"^\s*(?:in\s+)?{_AMOUNT}\b\s*(?:to\s+)?(.+)$", re.I | re.S)
# "remind me to stretch in 20 minutes" / "remind me in 20 minutes to stretch"
TRIGGER_AFTER = re.compile(
    rf"\bremind me (?:to\s+)?(.+?)\s+in\s+{_AMOUNT}\s*[.!]?\s*$", re.I | re.S
)
TRIGGER_BEFORE = re.compile(rf"\bremind me in\s+{_AMOUNT}\s+(?:to\s+)?(.+)$", re.I | re.S)


class RemindersConfig(BaseModel):
    model_config = {"extra": "forbid"}

    max_per_user: int = Field(20, ge=1)
    max_delay_days: float = Field(30, gt=0)
    #: How the reminder is worded; ``{text}`` is what the user asked to be reminded of.
    template: str = "⏰ Reminder: {text}"


def _seconds(amount: str, unit: str) -> float:
    n = 1.0 if amount.lower() in ("a", "an", "one") else float(amount)
    unit = unit.lower()
    base = UNITS.get(unit) or UNITS.get(unit.rstrip("s")) or UNITS[unit[0]]
    return n * base


def parse(text: str) -> tuple[float, str] | None:
    """``(delay_seconds, what)`` from a command argument or a plain-language request."""
    for pattern, order in (
        (COMMAND, "amount-first"),
        (TRIGGER_BEFORE, "amount-first"),
        (TRIGGER_AFTER, "text-first"),
    ):
        m = pattern.search(text)
        if m:
            if order == "amount-first":
                amount, unit, what = m.group(1), m.group(2), m.group(3)
            else:
                what, amount, unit = m.group(1), m.group(2), m.group(3)
            what = what.strip().rstrip(".!")
            if what:
                return _seconds(amount, unit), what
    return None


def _human(seconds: float) -> str:
    for name, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            n = round(seconds / size, 1)
            n = int(n) if n == int(n) else n
            return f"{n} {name}{'' if n == 1 else 's'}"
    n = round(seconds)
    return f"{n} second{'' if n == 1 else 's'}"


class ReminderBook:
    """The reminders of one bot, in ``<data_dir>/reminders.sqlite3``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS reminders (id INTEGER PRIMARY KEY, platform TEXT, "
            "chat_id TEXT, user_id TEXT, text TEXT, due REAL, created REAL)"
        )
        self.changed = asyncio.Event()

    def add(self, message: Message, delay: float, text: str) -> int:
        now = time.time()
        cur = self.db.execute(
            "INSERT INTO reminders (platform, chat_id, user_id, text, due, created) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (message.platform, message.chat_id, message.user_id, text, now + delay, now),
        )
        self.changed.set()
        return int(cur.lastrowid)

    def pending(self, platform: str, user_id: str) -> list[tuple[int, str, float]]:
        return self.db.execute(
            "SELECT id, text, due FROM reminders WHERE platform = ? AND user_id = ? ORDER BY due",
            (platform, user_id),
        ).fetchall()

    def cancel(self, platform: str, user_id: str, reminder_id: int) -> bool:
        cur = self.db.execute(
            "DELETE FROM reminders WHERE id = ? AND platform = ? AND user_id = ?",
            (reminder_id, platform, user_id),
        )
        return cur.rowcount > 0

    def due(self, now: float) -> list[tuple[int, str, str, str, float]]:
        return self.db.execute(
            "SELECT id, platform, chat_id, text, due FROM reminders WHERE due <= ? ORDER BY due",
            (now,),
        ).fetchall()

    def next_due(self) -> float | None:
        row = self.db.execute("SELECT MIN(due) FROM reminders").fetchone()
        return row[0] if row else None

    def done(self, reminder_id: int) -> None:
        self.db.execute("DELETE FROM reminders WHERE id = ?", (reminder_id,))

    def close(self) -> None:
        self.db.close()


class RemindersSkill(Skill):
    name = "reminders"
    description = "Reminds you of things later."
    commands = (
        Command("remind", "Remind you of something later", usage="/remind 20m stretch"),
        Command("reminders", "List your pending reminders"),
        Command("unremind", "Cancel a reminder", usage="/unremind NUMBER"),
    )
    config_model = RemindersConfig
    priority = 40
    threshold = 0.6

    async def score(self, message: Message, ctx: Context) -> float:
        # Cheap: a regex, no model. Only clear requests win over the other skills.
        return 0.9 if "remind me" in message.text.lower() and parse(message.text) else 0.0

    async def handle(self, message: Message, ctx: Context) -> Reply:
        book: ReminderBook = ctx.bot.services["reminders"]
        cfg: RemindersConfig = ctx.config
        if ctx.command == "reminders":
            rows = book.pending(message.platform, message.user_id)
            if not rows:
                return Reply("You have no pending reminders.")
            now = time.time()
            lines = [f"#{i} in {_human(max(0, due - now))}: {text}" for i, text, due in rows]
            return Reply("Your reminders:\n" + "\n".join(lines))
        if ctx.command == "unremind":
            if not ctx.args.strip().lstrip("#").isdigit():
                return Reply("Usage: /unremind NUMBER (see /reminders)")
            ok = book.cancel(message.platform, message.user_id, int(ctx.args.strip().lstrip("#")))
            return Reply("Cancelled." if ok else "You have no reminder with that number.")
        parsed = parse(ctx.args if ctx.command else message.text)
        if parsed is None:
            return Reply(
                "Tell me when and what, e.g. /remind 20m stretch or /remind in 2 hours call mum"
            )
        delay, what = parsed
        if delay > cfg.max_delay_days * 86400:
            return Reply(f"I can remind you at most {cfg.max_delay_days:g} days ahead.")
        if len(book.pending(message.platform, message.user_id)) >= cfg.max_per_user:
            return Reply(
                f"You already have {cfg.max_per_user} reminders pending; /reminders lists them."
            )
        number = book.add(message, delay, what)
        return Reply(f"Okay — I'll remind you to {what} in {_human(delay)} (#{number}).")


async def _deliver(bot: Any, book: ReminderBook, template: str) -> None:
    """Sleep until the next reminder is due, send it, repeat; woken early by new reminders."""
    while True:
        now = time.time()
        for rid, platform, chat_id, text, due in book.due(now):
            late = now - due > 60
            body = template.format(text=text) + (" (late: I was offline)" if late else "")
            if await bot.push(platform, chat_id, Reply(body, kind="notice", skill="reminders")):
                book.done(rid)
            else:
                log.warning(
                    "reminder #%s for %s:%s not delivered; will retry", rid, platform, chat_id
                )
        nxt = book.next_due()
        wait = 60.0 if nxt is None else min(60.0, max(0.05, nxt - time.time()))
        book.changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(book.changed.wait(), wait)


@hookimpl
def register_skills(register):
    register(RemindersSkill())


@hookimpl
def startup(bot):
    book = ReminderBook(Path(bot.settings.data_dir) / "reminders.sqlite3")
    bot.services["reminders"] = book
    entry = bot.skill("reminders")
    template = entry.config.template if entry and entry.config else RemindersConfig().template
    bot.services["reminders.task"] = asyncio.get_running_loop().create_task(
        _deliver(bot, book, template), name="reminders"
    )


@hookimpl
def shutdown(bot):
    task = bot.services.pop("reminders.task", None)
    if task is not None:
        task.cancel()
    book = bot.services.pop("reminders", None)
    if book is not None:
        book.close()
