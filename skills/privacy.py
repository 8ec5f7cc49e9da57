"""``/forget``: a user's right to be forgotten, honoured by the store and the trainers."""

from __future__ import annotations

from bot import Command, Context, Message, Reply, Skill, hookimpl
from bot.text import plural


class PrivacySkill(Skill):
    name = "privacy"
    description = "Deletes what I stored about you."
    commands = (Command("forget", "Delete your messages and ratings from my logs"),)
    priority = 90

    async def handle(self, message: Message, ctx: Context) -> Reply:
        result = await ctx.bot.store.forget_user(message.platform, message.user_id)
        yours = result.messages_deleted - result.replies_deleted
        # An operator may have made one of this user's questions a taught answer
        # (knowledge/taught.py): the question's wording is the user's, so it goes too.
        kb = ctx.bot.services.get("knowledge")
        taught = 0
        if kb is not None and hasattr(kb, "forget_asker"):
            taught = await kb.forget_asker(f"{message.platform}:{message.user_id}")
        also = (
            f" I also removed {plural(taught, 'answer')} an operator had taught from your "
            "questions."
            if taught
            else ""
        )
        return Reply(
            f"Done. I deleted {plural(yours, 'message')} of yours, "
            f"{plural(result.replies_deleted, 'reply', 'replies')} of mine to you and "
            f"{plural(result.feedback_deleted, 'rating')}, and noted your request so that "
            f"nothing derived from them is used for training.{also}"
        )


@hookimpl
def register_skills(register):
    register(PrivacySkill())
