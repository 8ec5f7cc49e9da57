"""Skills and plugins the specifications use. The ``chat``/``chinwag_bot`` fixtures come from
chinwag's own pytest plugin (``bot.testing``), the same one operators use."""

from __future__ import annotations

import asyncio

import pytest

from bot import Command, Context, Message, Reply, Skill, hookimpl


class EchoSkill(Skill):
    name = "echo"
    description = "Repeats you."
    commands = (Command("echo", "Repeat the text"),)

    def __init__(self) -> None:
        self.seen: list[Message] = []

    async def score(self, message: Message, ctx: Context) -> float:
        return 0.9 if message.text.startswith("echo") else 0.0

    async def handle(self, message: Message, ctx: Context) -> Reply:
        self.seen.append(message)
        return Reply(ctx.args if ctx.command else message.text)


class BoomSkill(Skill):
    name = "boom"
    commands = (Command("boom"),)

    async def handle(self, message: Message, ctx: Context) -> Reply:
        raise RuntimeError("kaboom")


class SlowSkill(Skill):
    name = "slow"
    commands = (Command("slow"),)
    timeout_s = 0.2

    async def handle(self, message: Message, ctx: Context) -> Reply:
        await asyncio.sleep(30)
        return Reply("never")


class SkillsPlugin:
    """A plugin object registering the test skills, loaded like any third-party plugin."""

    def __init__(self, *skills: Skill) -> None:
        self.skills = skills or (EchoSkill(), BoomSkill(), SlowSkill())

    @hookimpl
    def register_skills(self, register):
        for skill in self.skills:
            register(skill)


CORE = {"bot": {"fallback": "fallback"}}


def core_settings(tmp_path, overrides: dict | None = None):
    """Test settings for the core's specifications: the model-free fallback answers."""
    from bot.config import _deep_merge
    from bot.testing import chinwag_test_settings

    return chinwag_test_settings(tmp_path, _deep_merge(CORE, overrides or {}))


@pytest.fixture
def chinwag_config() -> dict:
    """The core's specifications use the model-free fallback; skill tests pick their own."""
    return dict(CORE)


@pytest.fixture
def echo() -> EchoSkill:
    return EchoSkill()


@pytest.fixture
def chinwag_plugins(echo: EchoSkill) -> list:
    return [SkillsPlugin(echo, BoomSkill(), SlowSkill())]
