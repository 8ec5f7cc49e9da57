"""Ratings and corrections typed as commands: ``/good``, ``/bad`` and, for admins, ``/correct``.

Telegram and Discord render 👍/👎 under model-generated replies; these commands are the same
thing for the console and any platform without buttons. A rating is stored against the bot's
last rateable reply in the chat (in groups: the last one answering this user), with the model
and adapter versions that produced it — the trainers learn from them.
"""

from __future__ import annotations

import logging
from typing import Any

from bot import Command, Context, Message, Reply, Skill, hookimpl
from skills.qa import question_likeness

log = logging.getLogger(__name__)


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
            return await self._teach(target, better, message, ctx)
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

    async def _teach(self, target: Any, better: str, message: Message, ctx: Context) -> Reply:
        """Make the correction an answer the next asker gets (knowledge/taught.py), when the
        corrected reply answered a question and the knowledge base takes taught answers."""
        stored = "Thanks — I stored your correction; the next training cycle uses it."
        kb = ctx.bot.services.get("knowledge")
        if kb is None or not getattr(kb, "teaching", False):
            return Reply(stored)
        asked = await ctx.bot.store.get_message(target.reply_to_id) if target.reply_to_id else None
        question = _question_of(asked.text) if asked is not None else ""
        if (
            asked is None
            or not question
            or (target.skill != "qa" and question_likeness(question) == 0.0)
        ):
            return Reply(stored)  # small talk: a better reply to learn from, not a fact
        try:
            await kb.teach(
                question,
                better,
                author=f"{message.platform}:{message.user_id}",
                asked_by=f"{asked.platform}:{asked.user_id}" if asked.user_id else None,
                reply_id=target.id,
            )
        except ValueError as exc:  # TeachError: too long, empty
            return Reply(f"{stored} I did not add it to the knowledge base: {exc}.")
        except Exception:
            log.exception("feedback: could not add the correction to the knowledge base")
            return Reply(
                f"{stored} Adding it to the knowledge base failed; the logs say why.",
                kind="error",
            )
        shown = question if len(question) <= 80 else question[:77] + "…"
        return Reply(
            f"Thanks — from now on I answer “{shown}” with your correction, citing it as "
            "taught by an operator; it is also kept for training."
        )


def _question_of(text: str) -> str:
    """The question a message asked: "/ask how long…" asked "how long…"."""
    text = text.strip()
    if text.startswith("/"):
        return text.split(None, 1)[1].strip() if " " in text else ""
    return text


@hookimpl
def register_skills(register):
    register(FeedbackSkill())
