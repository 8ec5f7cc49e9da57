"""Ratings and corrections typed as commands: ``/good``, ``/bad`` and, for admins, ``/correct``.

Telegram and Discord render 👍/👎 under model-generated replies; these commands are the same
thing for the console and any platform without buttons. A rating is stored against the bot's
last rateable reply in the chat (in groups: the last one answering this user), with the model
and adapter versions that produced it — the trainers learn from them.
"""

from __future__ import annotations

from typing import Any

from bot import Command, Context, Message, Reply, Skill, hookimpl


async def last_rateable(ctx: Context, message: Message, lookback: int = 40) -> Any | None:
    """The bot's latest rateable reply in this chat (to this user, in groups)."""
    turns = await ctx.bot.store.last_turns(
        message.platform, message.chat_id, lookback, before_id=message.id
    )
    mine = {t.id for t in turns if t.direction == "in" and t.user_id == message.user_id}
    group = message.chat_kind != "private"
    for t in reversed(turns):
        if t.direction != "out" or not t.meta.get("rateable"):
            continue
        if group and t.reply_to_id not in mine:
            continue
        return t
    return None


class FeedbackSkill(Skill):
    name = "feedback"
    description = "Lets you rate my last answer, so I can learn from it."
    commands = (
        Command("good", "Rate my last answer as good"),
        Command("bad", "Rate my last answer as bad", usage="[what was wrong]"),
        Command(
            "correct",
            "Store a better reply for my last answer (trainers learn from it)",
            admin_only=True,
            usage="BETTER REPLY",
        ),
    )
    priority = 80
    threshold = 2.0  # commands only

    async def handle(self, message: Message, ctx: Context) -> Reply:
        target = await last_rateable(ctx, message)
        if target is None:
            return Reply("There's no answer of mine here to rate yet.", kind="notice")
        store = ctx.bot.store
        if ctx.command == "correct":
            better = ctx.args.strip()
            if not better:
                return Reply("Usage: /correct BETTER REPLY", kind="notice")
            await store.add_feedback(
                target.id,
                message.platform,
                message.user_id,
                0,
                correction=better,
                source="operator",
            )
            return Reply("Thanks — I stored your correction; the next training cycle uses it.")
        rating = 1 if ctx.command == "good" else -1
        # A user's "/bad <why>" is kept as their comment (source "user"); only operator
        # corrections are ever trained on as better replies.
        comment = ctx.args.strip() or None
        await store.add_feedback(
            target.id, message.platform, message.user_id, rating, correction=comment
        )
        return Reply(
            "Thanks for the 👍!" if rating > 0 else "Thanks — noted 👎. I'll try to do better."
        )


@hookimpl
def register_skills(register):
    register(FeedbackSkill())
