"""The answer of last resort, until the dialogue skill takes over as the fallback."""

from __future__ import annotations

from bot import Context, Message, Reply, Skill, hookimpl


class FallbackSkill(Skill):
    name = "fallback"
    description = "Says honestly when I can't answer yet."
    threshold = 2.0  # never wins on score; the router calls it only as the fallback

    async def handle(self, message: Message, ctx: Context) -> Reply:
        return Reply("I can't answer that yet. Send /help to see what I can do.")


@hookimpl
def register_skills(register):
    register(FallbackSkill())
