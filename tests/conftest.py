"""Skills and plugins the specifications use. The ``chat``/``chinwag_bot`` fixtures come from
chinwag's own pytest plugin (``bot.testing``), the same one operators use."""

from __future__ import annotations

import asyncio
from pathlib import Path

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


class Storyteller(Skill):
    """Emits its reply in pieces over a second or so, as a generating skill does."""

    name = "story"
    commands = (Command("story", "A streamed answer"),)
    TEXT = "Once upon a time there was a very patient little bot that answered."

    async def handle(self, message: Message, ctx: Context) -> Reply:
        for word in self.TEXT.split():
            await ctx.emit(word + " ")
            await asyncio.sleep(0.1)
        text = self.TEXT
        if ctx.args == "withheld":
            return Reply("Sorry — I can't send that.", kind="error")
        return Reply(text, rateable=True, model="m")


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


# -- real models and data, loaded once per run --------------------------------------------------

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def embedder():
    """The real all-MiniLM-L6-v2, loaded once for the whole run."""
    from knowledge.embedder import Embedder

    return Embedder()


@pytest.fixture(scope="session")
def faq_file() -> Path:
    import zaragoza_construction_faq

    return Path(zaragoza_construction_faq.__file__).parent / "data" / "faq-en.jsonl"


@pytest.fixture(scope="session")
def faq_kb(tmp_path_factory, embedder, faq_file):
    """The 503-pair construction FAQ, ingested once; skills point ``knowledge.directory`` here."""
    from knowledge.base import KnowledgeBase

    base = KnowledgeBase(tmp_path_factory.mktemp("faq"), embedder=embedder)
    summary = base.add([faq_file])
    assert summary.chunks_added == 503
    return base


@pytest.fixture(scope="session")
def sentiment_registry(tmp_path_factory) -> Path:
    """An adapter registry holding a real, quickly trained ``sentiment`` classifier.

    Trained on a 600-message sample for one epoch (~40 s on 2 cores): weaker than the default
    configuration (docs/models.md has the full figures) but a real LoRA classifier end to end.
    """
    from bot.models.registry import AdapterRegistry
    from trainers.sentiment import SentimentTrainConfig, train_sentiment

    root = tmp_path_factory.mktemp("adapters")
    config = SentimentTrainConfig(
        max_train_examples=600, head_init_examples=600, max_eval_examples=300, epochs=1
    )
    train_sentiment(AdapterRegistry(root), config)
    return root
