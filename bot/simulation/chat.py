"""A user in a chat, talking to the core the way a platform adapter would (no network)."""

from __future__ import annotations

import itertools
from typing import Any

from bot.core import Bot
from bot.messages import ChatKind, Message, Reply

_ids = itertools.count(1)


class ChatUser:
    """One user in one chat, sending messages the way a platform adapter would."""

    def __init__(
        self,
        bot: Bot,
        *,
        platform: str = "test",
        chat_id: str = "chat-1",
        user_id: str = "user-1",
        user_name: str = "Tester",
        chat_kind: ChatKind = "private",
    ) -> None:
        self.bot = bot
        self.platform = platform
        self.chat_id = chat_id
        self.user_id = user_id
        self.user_name = user_name
        self.chat_kind = chat_kind
        self.sent: list[Message] = []

    def message(self, text: Any, **fields: Any) -> Message:
        fields.setdefault("message_id", str(next(_ids)))
        return Message(
            self.platform,
            self.chat_id,
            self.user_id,
            text,
            user_name=self.user_name,
            chat_kind=self.chat_kind,
            **fields,
        )

    async def send(self, text: Any, **fields: Any) -> list[Reply]:
        """Send ``text`` as this user; returns the bot's replies."""
        message = self.message(text, **fields)
        self.sent.append(message)
        return await self.bot.handle(message)

    async def ask(self, text: Any) -> str:
        """Send ``text`` and return the replies' texts joined by newlines."""
        return "\n".join(r.text for r in await self.send(text))
