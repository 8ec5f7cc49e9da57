"""``/help`` and ``/start``: what this bot can do, built from whatever skills loaded."""

from __future__ import annotations

from bot import Command, Context, Message, Reply, Skill, hookimpl


class HelpSkill(Skill):
    name = "help"
    description = "Lists what I can do and my commands."
    commands = (
        Command("help", "Show what I can do"),
        Command("start", "Say hello and show what I can do"),
    )
    priority = 100

    async def handle(self, message: Message, ctx: Context) -> Reply:
        bot = ctx.bot
        lines: list[str] = []
        if ctx.command == "start":
            who = message.user_name or "there"
            lines.append(f"Hi {who}! I'm {bot.settings.bot.name}.")
        lines.append("Here is what I can do:")
        for entry in sorted(bot.skills, key=lambda e: (-e.priority, e.name)):
            if not bot.allowed(entry, message):
                continue
            cmds = [c for c in entry.commands.values() if ctx.is_admin or not c.admin_only]
            lines.append(f"• {entry.name} — {entry.description or 'no description'}")
            for c in cmds:
                usage = f" {c.usage}" if c.usage else ""
                admin = " (admins)" if c.admin_only else ""
                lines.append(f"    /{c.name}{usage} — {c.description}{admin}")
        return Reply("\n".join(lines))


@hookimpl
def register_skills(register):
    register(HelpSkill())
