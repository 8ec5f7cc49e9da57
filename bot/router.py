"""Choosing which skill answers a message.

A command (``/name args``, or ``/name@botname args`` in groups) goes to the skill that owns it.
Anything else is scored by every skill enabled in the chat; the best score at or above that
skill's threshold wins, ties broken by priority. When nothing clears its threshold the
configured fallback answers.
"""

from __future__ import annotations

import difflib
import logging
import re
from dataclasses import dataclass, field
from typing import Any

from bot.messages import Message
from bot.skill import Command, Match

log = logging.getLogger(__name__)

_COMMAND = re.compile(r"^/([A-Za-z0-9_]{1,64})(?:@([A-Za-z0-9_]{1,64}))?(?:\s+(.*))?$", re.DOTALL)


@dataclass(slots=True)
class ParsedCommand:
    name: str
    args: str
    target: str | None  # the bot a group command was addressed to, if any


@dataclass(slots=True)
class SkillEntry:
    """A loaded skill with its effective settings."""

    skill: Any
    name: str
    plugin: str
    description: str
    commands: dict[str, Command]
    priority: int
    threshold: float
    timeout_s: float
    config: Any = None
    enabled: bool = True
    uses_model: bool = False
    stats: dict[str, int] = field(default_factory=lambda: {"handled": 0, "errors": 0})


def parse_command(text: str) -> ParsedCommand | None:
    if not text.startswith("/"):
        return None
    match = _COMMAND.match(text.strip())
    if match is None:
        return None
    name, target, args = match.groups()
    return ParsedCommand(name.lower(), (args or "").strip(), target)


def suggest(name: str, known: list[str]) -> list[str]:
    return difflib.get_close_matches(name, known, n=3, cutoff=0.6)


class Router:
    def __init__(self, entries: list[SkillEntry], fallback: str | None) -> None:
        self.entries = entries
        self.by_name = {e.name: e for e in entries}
        self.fallback = self.by_name.get(fallback) if fallback else None
        self.commands: dict[str, SkillEntry] = {}
        for e in entries:
            for cmd in e.commands:
                owner = self.commands.get(cmd)
                if owner is not None:
                    # Higher priority keeps the command; operators see the clash in the log.
                    if owner.priority >= e.priority:
                        log.warning("command /%s of %s shadowed by %s", cmd, e.name, owner.name)
                        continue
                    log.warning("command /%s of %s shadowed by %s", cmd, owner.name, e.name)
                self.commands[cmd] = e
        # Scoring order: highest priority first so ties resolve to it.
        # A skill without ``score`` answers its commands only.
        self.scorers = sorted(
            (e for e in entries if e is not self.fallback and hasattr(e.skill, "score")),
            key=lambda e: -e.priority,
        )

    def command_names(self) -> list[str]:
        return sorted(self.commands)

    def owner(self, command: str) -> SkillEntry | None:
        return self.commands.get(command)

    async def best(
        self, message: Message, allowed: Any, make_ctx: Any
    ) -> tuple[SkillEntry, Any] | None:
        """The highest-scoring allowed skill above its threshold with its ``Match.data``, or
        ``None``."""
        best: tuple[SkillEntry, Any] | None = None
        best_score = float("-inf")
        for entry in self.scorers:
            if not allowed(entry, message):
                continue
            try:
                result = await entry.skill.score(message, make_ctx(entry))
            except Exception:
                log.exception("skill %s failed to score a message; treated as 0", entry.name)
                continue
            score, data = result, None
            if isinstance(result, Match):
                score, data = result.score, result.data
            if not isinstance(score, int | float):
                log.error("skill %s scored %r, not a number; treated as 0", entry.name, score)
                continue
            if score >= entry.threshold and score > best_score:
                best, best_score = (entry, data), score
        return best
