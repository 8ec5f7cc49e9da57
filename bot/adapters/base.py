"""What a platform adapter is to the core: the protocol Telegram, Discord and the HTTP API
implement, and a Slack or Matrix adapter from a third-party package would.

An adapter turns the platform's events into :class:`~bot.messages.Message` objects for
``bot.handle(message, send)`` — ``send`` being its own way of delivering the replies, with the
platform's limits, formatting and retries — and its rating buttons or reactions into
``bot.record_feedback``, which checks that the rated message is a reply the bot sent on that
platform. ``push`` sends a message nobody asked for (escalation notices; an adapter that cannot
reach anyone unprompted, like the HTTP API, sets ``pushes = False``); ``start`` returns once
the adapter is receiving, and ``stop`` lets work in flight finish.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from bot.messages import Reply


@runtime_checkable
class Adapter(Protocol):
    platform: str

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def push(self, chat_id: str, reply: Reply) -> None: ...
