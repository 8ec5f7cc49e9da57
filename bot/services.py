"""What a skill may use of the bot: the narrow, documented interface behind ``ctx.bot``.

Skills used to get the whole :class:`~bot.core.Bot` — its pipeline, lifecycle and internals —
so any of it could become something a third-party plugin relies on, and ``bot.skill`` had to
import ``bot.core`` (an import circle). ``BotServices`` is the contract instead: what it lists
is kept stable for plugins; what it does not list is the core's own business.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from bot.config import Settings
from bot.messages import Message, Reply
from bot.models.types import RuntimeBusy
from bot.router import SkillEntry

if TYPE_CHECKING:  # the objects behind the interface, for type checkers only
    from bot.chats import ChatPolicy
    from bot.models import ModelRuntime
    from bot.store import ConversationStore


class BotServices:
    """Shared services a skill (and an observer or a filter) reaches through ``ctx.bot``.

    - ``settings``: the validated configuration (read it, never change it);
    - ``store``: the conversation log (history, feedback, per-message metadata);
    - ``models``: the model runtime (``generate``, ``stream``, ``classify``, ``embed``,
      ``resolve_adapter``);
    - ``services``: named services plugins attach at start-up (``knowledge``), and a place
      for a skill's own process-wide state under its name (``"sentiment.streaks"``);
    - ``skills``, ``skill(name)``, ``allowed(entry, message)``: what is loaded and may answer
      in a chat (``/help``, ``/skills``);
    - ``is_admin``, ``chat_settings``, ``update_chat_settings``, ``set_skill_enabled``: per-chat
      policy;
    - ``push``: send a message nobody asked for; ``escalate``: hand an
      :class:`~bot.messages.Escalation` to the ``escalate`` hooks;
    - ``busy_reply``: the honest "busy" reply; ``warmups``: background loads a skill's
      ``setup`` starts (measurements wait for them, live traffic does not).
    """

    __slots__ = (
        "_busy_reply",
        "_chats",
        "_escalate",
        "_push",
        "_skills",
        "models",
        "services",
        "settings",
        "store",
        "warmups",
    )

    def __init__(
        self,
        *,
        settings: Settings,
        store: ConversationStore,
        models: ModelRuntime,
        services: dict[str, Any],
        chats: ChatPolicy,
        skills: Callable[[], list[SkillEntry]],
        push: Callable[[str, str, Reply | str], Awaitable[bool]],
        escalate: Callable[[Any], Awaitable[None]],
        busy_reply: Callable[[RuntimeBusy, str], Reply],
        warmups: list[asyncio.Future[Any]],
    ) -> None:
        self.settings = settings
        self.store = store
        self.models = models
        self.services = services
        self.warmups = warmups
        self._chats = chats
        self._skills = skills
        self._push = push
        self._escalate = escalate
        self._busy_reply = busy_reply

    @property
    def skills(self) -> list[SkillEntry]:
        return self._skills()

    def skill(self, name: str) -> SkillEntry | None:
        return next((e for e in self._skills() if e.name == name), None)

    def allowed(self, entry: SkillEntry, message: Message) -> bool:
        return self._chats.allowed(entry, message)

    def is_admin(self, platform: str, user_id: str) -> bool:
        return self._chats.is_admin(platform, user_id)

    def chat_settings(self, platform: str, chat_id: str) -> dict[str, Any]:
        return self._chats.chat_settings(platform, chat_id)

    async def update_chat_settings(self, platform: str, chat_id: str, **changes: Any) -> None:
        await self._chats.update_chat_settings(platform, chat_id, **changes)

    async def set_skill_enabled(
        self, platform: str, chat_id: str, skill: str, enabled: bool
    ) -> None:
        await self._chats.set_skill_enabled(platform, chat_id, skill, enabled)

    async def push(self, platform: str, chat_id: str, reply: Reply | str) -> bool:
        return await self._push(platform, chat_id, reply)

    async def escalate(self, event: Any) -> None:
        await self._escalate(event)

    def busy_reply(self, exc: RuntimeBusy, skill: str) -> Reply:
        return self._busy_reply(exc, skill)
