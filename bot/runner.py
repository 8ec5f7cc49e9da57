"""``chinwag run``: start the bot and every configured adapter in one event loop.

Platform adapters come from the ``register_adapters`` hook (the built-in Telegram, Discord and
HTTP ones too, bot/adapters/plugin.py); with none configured the console chat runs, so
``make run`` on a fresh machine gives a working bot in the terminal.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

from bot.adapters.base import Adapter
from bot.config import ConfigError, Settings
from bot.contract import check_adapter
from bot.core import Bot
from bot.plugins import collect
from bot.process import die_with_parent, exit_within

log = logging.getLogger(__name__)


class NothingToServe(ConfigError):
    pass


def adapters_for(bot: Bot) -> list[Adapter]:
    """Every adapter the plugins register for this configuration, built-in ones first."""
    from bot.adapters import plugin as builtin

    if "adapters" not in bot.settings.disabled_plugins and not bot.pm.is_registered(builtin):
        bot.pm.register(builtin, name="adapters")
    found = collect(bot.pm, "register_adapters", bot=bot)
    platforms: set[str] = set()
    for reg in found:
        check_adapter(reg.obj, reg.plugin)
        if reg.obj.platform in platforms:
            raise ConfigError(f"two plugins register an adapter for {reg.obj.platform!r}")
        platforms.add(reg.obj.platform)
    return [reg.obj for reg in found]


async def serve(
    settings: Settings,
    *,
    config_path: Path | None = None,
    console_log: Callable[[], Path] | None = None,
) -> None:
    """Every adapter the plugins register (built-in or third-party); the console chat when
    there is none. ``console_log`` moves the log off the terminal when the console chat
    will own it, and says where it went."""
    if settings.http.enabled and not settings.http.tokens:
        # Checked before anything starts: an open API would answer anyone.
        raise ConfigError("http.tokens is empty: the HTTP API needs at least one bearer token")
    bot = Bot(settings)
    # Built (not started) before the bot starts: whether anyone but the console will chat
    # decides where the log goes, for the bot and its services alike.
    servers: list[Adapter] = adapters_for(bot)
    log_path = console_log() if console_log is not None and not servers else None
    async with bot, _services(bot, config_path, log_path):
        bot.warm_up()
        try:
            if servers:
                # Listening before the first start: a SIGTERM while an adapter is still
                # connecting must mean "shut down gracefully", not the default instant death.
                with _stop_signals() as stop:
                    for server in servers:
                        if not stop.is_set():
                            await server.start()
                            if getattr(server, "pushes", True):
                                bot.outboxes.setdefault(server.platform, server.push)
                    await stop.wait()
                    log.info("stopping (signal received)")
                    exit_within(settings.bot.shutdown_timeout_s)
                    # Model work first: the users waiting on it get the shutdown notice
                    # while the adapters can still deliver it.
                    await bot.begin_shutdown()
                return
        finally:
            for server in reversed(servers):
                t0 = time.monotonic()
                await server.stop()  # in-flight work finishes first
                log.info("%s adapter stopped in %.1f s", server.platform, time.monotonic() - t0)
        from bot.adapters.console import ConsoleChat

        console = ConsoleChat(bot)
        if sys.stdin.isatty():
            await console.run_interactive(log_path=log_path)
        elif await console.run_pipe() == 0:
            # Typical of a container started without -it and without a platform token: say
            # so rather than exit quietly and be restarted in a loop.
            raise NothingToServe(
                "no platform is configured (telegram.token, discord.token or http.enabled) "
                "and stdin is closed, so there is nobody to chat with; set "
                "CHINWAG_TELEGRAM__TOKEN or CHINWAG_DISCORD__TOKEN, enable the HTTP API, or "
                "run with a terminal (docker run -it) for the console chat"
            )


@contextlib.asynccontextmanager
async def _services(
    bot: Bot, config_path: Path | None, log_path: Path | None = None
) -> AsyncIterator[list[asyncio.subprocess.Process]]:
    """The sub-commands plugins register as services (``register_services``: the trainers'
    nightly schedule), each in a child process for as long as the bot runs.

    A disabled plugin (``disabled_plugins``, ``CHINWAG_PLUGINS``) registers nothing, so its
    service goes with it.
    """
    settings = bot.settings
    wanted: list[tuple[str, str]] = []

    def register(command: str, label: str | None = None) -> None:
        wanted.append((command, label or command))

    bot.pm.hook.register_services(register=register, settings=settings)
    children: list[asyncio.subprocess.Process] = []
    try:
        for command, label in wanted:
            cmd = [sys.executable, "-m", "bot.cli"]
            if config_path is not None:
                cmd += ["--config", str(config_path)]
            if log_path is not None:  # the console chat owns the terminal: log beside it
                cmd += ["--log-file", str(log_path.with_name(f"{command}.log"))]
            env = dict(os.environ, CHINWAG_DATA_DIR=str(settings.data_dir))
            child = await asyncio.create_subprocess_exec(
                *cmd,
                command,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                preexec_fn=die_with_parent,
            )
            children.append(child)
            log.info("%s: process %d", label, child.pid)
        yield children
    finally:
        for child in children:
            if child.returncode is None:
                child.terminate()
        for child in children:
            try:
                await asyncio.wait_for(child.wait(), 10)
            except TimeoutError:
                child.kill()
                await child.wait()


@contextlib.contextmanager
def _stop_signals() -> Iterator[asyncio.Event]:
    """An event set by SIGINT or SIGTERM (a container stop), for a graceful shutdown."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        yield stop
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
