"""An example third-party chinwag plugin.

Install it next to chinwag (``pip install -e examples/plugin-hello``) and it is loaded exactly
like the built-in skills: ``chinwag skills`` lists it, ``/hello`` answers, and ``chinwag hello``
is a new sub-command.
"""

from __future__ import annotations

import typer
from pydantic import BaseModel, ConfigDict

from bot import Command, Context, Message, Reply, Skill, hookimpl


class HelloConfig(BaseModel):
    # A typo in [skills.hello] stops the start naming the key, instead of being ignored.
    model_config = ConfigDict(extra="forbid")

    greeting: str = "Hello"


class HelloSkill(Skill):
    name = "hello"
    description = "Greets you (an example plugin)."
    commands = (Command("hello", "Get greeted", usage="[NAME]"),)
    config_model = HelloConfig

    async def score(self, message: Message, ctx: Context) -> float:
        words = message.text.lower().split()
        return 0.9 if words and words[0] in {"hi", "hello", "hey"} else 0.0

    async def handle(self, message: Message, ctx: Context) -> Reply:
        who = ctx.args or message.user_name or "there"
        return Reply(f"{ctx.config.greeting}, {who}!")


class ExclamationCounter:
    """An observer: annotates every message with how excited it is."""

    name = "exclamations"

    async def observe(self, message: Message, ctx: Context) -> None:
        message.metadata["exclamations"] = message.text.count("!")


@hookimpl
def register_skills(register):
    register(HelloSkill())


@hookimpl
def register_observers(register):
    register(ExclamationCounter())


@hookimpl
def register_commands(cli: typer.Typer):
    @cli.command("hello")
    def hello(name: str = "world") -> None:
        """Say hello from the example plugin."""
        typer.echo(f"Hello, {name}! (from chinwag-hello)")
