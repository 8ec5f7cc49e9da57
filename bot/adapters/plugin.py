"""The built-in adapters, registered through ``register_adapters`` like a third party's.

Each is built only when its configuration asks for it: the HTTP API with ``[http] enabled``,
Telegram and Discord with a token. ``chinwag run`` adds this plugin unless
``disabled_plugins`` names ``adapters``.
"""

from __future__ import annotations

from typing import Any

from bot.hookspecs import hookimpl


@hookimpl
def register_adapters(register: Any, bot: Any) -> None:
    settings = bot.settings
    if settings.http.enabled:
        from bot.adapters.http import HttpServer

        register(
            HttpServer(
                bot,
                settings.http.host,
                settings.http.port,
                [t.get_secret_value() for t in settings.http.tokens],
            )
        )
    tg = settings.telegram
    if tg.token is not None:
        from bot.adapters.telegram import TelegramAdapter

        register(
            TelegramAdapter(
                bot,
                tg.token.get_secret_value(),
                api_base=tg.api_base,
                min_interval_s=tg.min_interval_s,
                group_interval_s=tg.group_interval_s,
                polling_timeout=tg.polling_timeout,
                edited=tg.edited,
                stream=tg.stream,
                stream_interval_s=tg.stream_interval_s,
                webhook={
                    "url": tg.webhook_url,
                    "host": tg.webhook_host,
                    "port": tg.webhook_port,
                    "path": tg.webhook_path,
                    "secret": tg.webhook_secret.get_secret_value() if tg.webhook_secret else None,
                    "max_connections": tg.max_connections,
                }
                if tg.mode == "webhook"
                else None,
            )
        )
    dc = settings.discord
    if dc.token is not None:
        from bot.adapters.discord import DiscordAdapter

        # Every [discord] key is one of the adapter's keyword arguments, by name.
        options = dc.model_dump(exclude={"token"})
        register(DiscordAdapter(bot, dc.token.get_secret_value(), **options))
