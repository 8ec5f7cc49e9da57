"""Operator commands: switch skills on and off per chat, see what loaded."""

from __future__ import annotations

from bot import Command, Context, Message, Reply, Skill, hookimpl


class AdminSkill(Skill):
    name = "admin"
    description = "Operator controls."
    commands = (
        Command("skills", "List skills and whether they answer here", admin_only=True),
        Command("enable", "Switch a skill on in this chat", admin_only=True, usage="SKILL"),
        Command("disable", "Switch a skill off in this chat", admin_only=True, usage="SKILL"),
    )
    priority = 90

    async def handle(self, message: Message, ctx: Context) -> Reply:
        bot = ctx.bot
        if ctx.command == "skills":
            lines = ["Skills in this chat:"]
            for e in bot.skills:
                state = "on" if bot.allowed(e, message) else "off"
                lines.append(f"• {e.name} ({e.plugin}): {state}")
            return Reply("\n".join(lines))
        name = ctx.args.strip()
        entry = bot.skill(name) if name else None
        if entry is None:
            known = ", ".join(e.name for e in bot.skills)
            return Reply(f"Usage: /{ctx.command} SKILL — one of: {known}", kind="notice")
        if entry.name == self.name:
            return Reply("The admin skill cannot switch itself off.", kind="notice")
        enable = ctx.command == "enable"
        await bot.set_skill_enabled(message.platform, message.chat_id, entry.name, enable)
        return Reply(f"{entry.name} is now {'on' if enable else 'off'} in this chat.")


@hookimpl
def register_skills(register):
    register(AdminSkill())
