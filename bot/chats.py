"""Per-chat policy: who is an admin, which skills may answer in a chat, what a chat has stored.

Kept apart from the pipeline because it is state with its own lifetime — loaded from the store
at start, changed by commands (``/enable``, ``/disable``, ``/reset``) and surviving restarts —
that the pipeline, ``/help`` and the admin skill all read the same way.
"""

from __future__ import annotations

from typing import Any

from bot.config import Settings
from bot.messages import Message
from bot.router import SkillEntry
from bot.store import ConversationStore


class ChatPolicy:
    def __init__(self, settings: Settings, store: ConversationStore) -> None:
        self.settings = settings
        self.store = store
        self._admins = {p: set(ids) for p, ids in settings.admins.items()}
        self._chat_settings: dict[tuple[str, str], dict[str, Any]] = {}

    async def load(self) -> None:
        """Read every chat's stored settings (once, at start)."""
        self._chat_settings = dict(await self.store.chat_settings())

    def add_admin(self, platform: str, user_id: str) -> None:
        """Grant admin rights for this process (tests, operator tooling); config is the default."""
        self._admins.setdefault(platform, set()).add(user_id)

    def is_admin(self, platform: str, user_id: str) -> bool:
        return user_id in self._admins.get(platform, ())

    def allowed(self, entry: SkillEntry, message: Message) -> bool:
        """Whether ``entry`` may answer in the message's chat (global and per-chat switches)."""
        if not entry.enabled:
            return False
        cfg = self.settings.chats.get(message.chat_key)
        if cfg is not None:
            if entry.name in cfg.disabled_skills:
                return False
            if cfg.enabled_skills is not None and entry.name not in cfg.enabled_skills:
                return False
        chat = self._chat_settings.get((message.platform, message.chat_id))
        return not (chat and entry.name in chat.get("disabled_skills", ()))

    def chat_settings(self, platform: str, chat_id: str) -> dict[str, Any]:
        """Settings stored for one chat (skill switches, ``/reset`` marks…); a copy."""
        return dict(self._chat_settings.get((platform, chat_id), {}))

    async def update_chat_settings(self, platform: str, chat_id: str, **changes: Any) -> None:
        """Merge ``changes`` into the chat's stored settings; survives restarts."""
        current = self.chat_settings(platform, chat_id)
        current.update(changes)
        await self.store.set_chat_settings(platform, chat_id, current)
        self._chat_settings[(platform, chat_id)] = current

    async def set_skill_enabled(
        self, platform: str, chat_id: str, skill: str, enabled: bool
    ) -> None:
        """Switch a skill on or off in one chat; stored, so it survives restarts."""
        disabled = set(self.chat_settings(platform, chat_id).get("disabled_skills", []))
        if enabled:
            disabled.discard(skill)
        else:
            disabled.add(skill)
        await self.update_chat_settings(platform, chat_id, disabled_skills=sorted(disabled))
