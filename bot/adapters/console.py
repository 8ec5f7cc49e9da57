"""Console chat: the bot in a terminal, or as a line-oriented filter for scripts and tests.

On a TTY it is an interactive chat. When stdin is not a TTY it reads one message per line and
writes one reply block per message — each reply's text, then an empty line — or, with
``--json``, one JSON object per message with the replies, the skill that answered, latency and
metadata, which is what scripts should parse.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import logging
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, TextIO

from bot.core import Bot
from bot.messages import Message, Reply
from bot.text import plural

PLATFORM = "console"

log = logging.getLogger(__name__)


def reply_to_json(r: Reply) -> dict[str, Any]:
    return {
        "text": r.text,
        "skill": r.skill,
        "kind": r.kind,
        "latency_ms": None if r.latency_ms is None else round(r.latency_ms, 3),
        "sources": [
            {"title": s.title, "location": s.location, "score": s.score} for s in r.sources
        ],
        "model": r.model,
        "adapter": r.adapter,
        "adapter_version": r.adapter_version,
        "metadata": r.metadata,
        "id": r.id,
    }


async def _stdin_lines() -> AsyncIterator[str]:
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            return
        yield line.rstrip("\r\n")


class ConsoleChat:
    def __init__(
        self,
        bot: Bot,
        *,
        user_id: str = "local",
        user_name: str | None = None,
        chat_id: str = "console",
        as_json: bool = False,
        out: TextIO | None = None,
    ) -> None:
        self.bot = bot
        self.user_id = user_id
        self.user_name = user_name or _login_name()
        self.chat_id = chat_id
        self.as_json = as_json
        self.out = out or sys.stdout

    def message(self, text: str) -> Message:
        return Message(PLATFORM, self.chat_id, self.user_id, text, user_name=self.user_name)

    async def send(self, text: str) -> list[Reply]:
        return await self.bot.handle(self.message(text))

    async def run_lines(self, lines: AsyncIterator[str]) -> int:
        """Answer every line up to a ``/quit`` (or ``/exit``); returns how many messages
        were handled."""
        count = 0
        async for line in lines:
            if _quits(line):
                break
            replies = await self.send(line)
            count += 1
            if self.as_json:
                self.out.write(
                    json.dumps(
                        {"message": line, "replies": [reply_to_json(r) for r in replies]},
                        ensure_ascii=False,
                        default=str,
                    )
                    + "\n"
                )
            else:
                for r in replies:
                    self.out.write(r.text + "\n")
                self.out.write("\n")
            self.out.flush()
        return count

    async def notes(self) -> list[str]:
        """What the operator trying the bot should know first: with nothing in the knowledge
        base every factual question is (rightly) declined, which reads as a broken bot unless
        it is said why, and how to give it documents."""
        knowledge = self.bot.services.get("knowledge")
        if knowledge is None:
            return []
        try:
            stats = await knowledge.stats()
        except Exception:  # the chat works without the figure
            log.warning("console: could not read the knowledge base's size", exc_info=True)
            return []
        if not stats.get("chunks"):
            return [
                "The knowledge base is empty, so I decline factual questions rather than guess. "
                "Give me documents: chinwag knowledge add PATH (files or a folder; "
                "docs/knowledge.md lists the formats)."
            ]
        files, chunks = stats.get("files", 0), stats["chunks"]
        return [f"Knowledge base: {plural(files, 'file')}, {plural(chunks, 'passage')}."]

    async def run_pipe(self) -> int:
        return await self.run_lines(_stdin_lines())

    async def run_interactive(self, *, log_path: Path | None = None) -> None:
        """Chat on a terminal: the prompt, the replies and a status line while the bot works.

        Nothing else writes to the terminal meanwhile: the log goes to ``log_path`` (the CLI
        moves it there) and libraries' progress bars are off.
        """
        from rich.console import Console

        console = Console()
        name = self.bot.settings.bot.name
        console.print(
            f"[bold]{name}[/bold] — type a message, /help for commands, /quit or Ctrl-D to quit."
        )
        for line in await self.notes():
            console.print(f"[dim]{line}[/dim]", highlight=False)
        if log_path is not None:
            console.print(f"[dim]log: {log_path}[/dim]")
        models = self.bot.models
        if models.loading:
            console.print("[dim]the language model is loading in the background…[/dim]")
        loop = asyncio.get_running_loop()
        while True:
            try:
                line = await loop.run_in_executor(None, input, "you> ")
            except (EOFError, KeyboardInterrupt):
                console.print()
                return
            if _quits(line):
                return
            task = asyncio.ensure_future(self.send(line))
            with console.status("thinking…", spinner="dots") as status:
                while not task.done():
                    if models.loading:
                        status.update("waiting for the language model to load…")
                    await asyncio.wait({task}, timeout=0.25)
            for r in task.result():
                style = {"error": "red", "notice": "yellow", "busy": "yellow"}.get(r.kind, "cyan")
                console.print(f"[{style}]{name}>[/{style}] ", end="")
                # Sources are in the text already ("Sources: [1] …"); JSON mode has the rest.
                console.print(r.text, markup=False, highlight=False)


#: What ends a console chat besides Ctrl-D: people type these (a first `make run` answered
#: "/quit" with "I don't know the command /quit"). The console's own words, not bot commands:
#: Telegram and Discord users never see them.
QUIT = frozenset({"/quit", "/exit"})


def _quits(line: str) -> bool:
    return line.strip().lower() in QUIT


def _login_name() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return "you"
