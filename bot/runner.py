"""``chinwag run``: start the bot and every configured adapter in one event loop.

Platform adapters (Telegram, Discord, HTTP) plug in here as they land; with none configured the
console chat runs, so ``make run`` on a fresh machine gives a working bot in the terminal.
"""

from __future__ import annotations

import logging
import sys

from bot.config import ConfigError, Settings
from bot.core import Bot

log = logging.getLogger(__name__)


def configured_platforms(settings: Settings) -> list[str]:
    found = []
    if settings.telegram.token is not None:
        found.append("telegram")
    if settings.discord.token is not None:
        found.append("discord")
    return found


async def serve(settings: Settings) -> None:
    platforms = configured_platforms(settings)
    if platforms:
        raise ConfigError(
            f"{', '.join(platforms)} configured, but this release has no adapter for "
            f"{'it' if len(platforms) == 1 else 'them'} yet; remove the token(s) to use the "
            "console chat"
        )
    from bot.adapters.console import ConsoleChat

    async with Bot(settings) as bot:
        console = ConsoleChat(bot)
        if sys.stdin.isatty():
            await console.run_interactive()
        else:
            await console.run_pipe()
