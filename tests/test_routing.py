"""How a message finds the skill that answers it."""

from __future__ import annotations

import pytest

from bot import Command, Context, Message, Reply, Skill
from tests.conftest import CORE, SkillsPlugin, core_settings


class Scored(Skill):
    def __init__(self, name: str, score: float, priority: int = 0, threshold: float = 0.5):
        self.name = name  # type: ignore[misc]
        self._score = score
        self.priority = priority  # type: ignore[misc]
        self.threshold = threshold  # type: ignore[misc]

    async def score(self, message: Message, ctx: Context) -> float:
        return self._score

    async def handle(self, message: Message, ctx: Context) -> Reply:
        return Reply(f"{self.name} answered")


async def test_a_command_goes_to_the_skill_that_owns_it(chat):
    replies = await chat.send("/echo hello there")
    assert [r.text for r in replies] == ["hello there"]
    assert replies[0].skill == "echo"


async def test_a_group_command_addressed_to_this_bot_is_answered(chinwag_bot, chinwag_chat):
    chinwag_bot.settings.bot.username = "chinwag_bot"
    user = chinwag_chat(chat_kind="group", chat_id="g1")
    assert await user.ask("/echo@chinwag_bot hi") == "hi"
    assert await user.ask("/echo@Chinwag_Bot hi") == "hi"


async def test_a_group_command_for_another_bot_is_ignored(chinwag_bot, chinwag_chat):
    chinwag_bot.settings.bot.username = "chinwag_bot"
    user = chinwag_chat(chat_kind="group", chat_id="g1")
    assert await user.send("/echo@other_bot hi") == []


async def test_an_unknown_command_gets_a_helpful_answer_with_suggestions(chat):
    text = await chat.ask("/ecko hi")
    assert "/ecko" in text
    assert "/echo" in text
    assert "/help" in text


async def test_free_text_goes_to_the_best_scoring_skill(chat, echo):
    replies = await chat.send("echo this please")
    assert replies[0].skill == "echo"
    assert echo.seen[-1].text == "echo this please"


async def test_free_text_nobody_claims_goes_to_the_fallback(chat):
    replies = await chat.send("what's the weather?")
    assert replies[0].skill == "fallback"


@pytest.mark.parametrize(
    ("skills", "winner"),
    [
        ([Scored("a", 0.6), Scored("b", 0.8)], "b"),
        ([Scored("a", 0.7, priority=1), Scored("b", 0.7, priority=5)], "b"),
        ([Scored("a", 0.7, priority=5), Scored("b", 0.7, priority=1)], "a"),
        ([Scored("a", 0.4), Scored("b", 0.45, threshold=0.5)], "fallback"),
        ([Scored("a", 0.3, threshold=0.2), Scored("b", 0.9, threshold=0.95)], "a"),
    ],
)
async def test_best_score_above_threshold_wins_and_ties_go_to_priority(tmp_path, skills, winner):
    from bot.core import Bot
    from bot.testing import ChatUser

    async with Bot(core_settings(tmp_path), plugins=[SkillsPlugin(*skills)]) as bot:
        replies = await ChatUser(bot).send("anything")
    assert replies[0].skill == winner


@pytest.mark.parametrize("chinwag_config", [{**CORE, "skills": {"echo": {"enabled": False}}}])
async def test_a_skill_disabled_in_the_config_never_answers(chat):
    assert (await chat.send("echo hi"))[0].skill == "fallback"
    assert "I don't know the command /echo" in await chat.ask("/echo hi")


@pytest.mark.parametrize(
    "chinwag_config", [{**CORE, "chats": {"test:quiet": {"disabled_skills": ["echo"]}}}]
)
async def test_a_skill_can_be_disabled_for_one_chat_only(chinwag_chat):
    quiet = chinwag_chat(chat_id="quiet")
    loud = chinwag_chat(chat_id="loud")
    assert "switched off in this chat" in await quiet.ask("/echo hi")
    assert (await quiet.send("echo hi"))[0].skill == "fallback"
    assert await loud.ask("/echo hi") == "hi"


async def test_admins_switch_skills_per_chat_and_it_survives_a_restart(tmp_path):
    from bot.core import Bot
    from bot.testing import ChatUser

    settings = core_settings(tmp_path, {"admins": {"test": ["boss"]}})
    async with Bot(settings, plugins=[SkillsPlugin()]) as bot:
        boss = ChatUser(bot, user_id="boss")
        assert "off" in await boss.ask("/disable echo")
        assert "switched off" in await boss.ask("/echo hi")
    async with Bot(settings, plugins=[SkillsPlugin()]) as bot:
        boss = ChatUser(bot, user_id="boss")
        assert "switched off" in await boss.ask("/echo hi")
        assert "on" in await boss.ask("/enable echo")
        assert await boss.ask("/echo hi") == "hi"


async def test_admin_only_commands_are_refused_to_everyone_else(chinwag_chat):
    user = chinwag_chat(user_id="nobody")
    assert "admins only" in await user.ask("/disable echo")
    admin = chinwag_chat(user_id="root", admin=True)
    assert "off" in await admin.ask("/disable echo")


async def test_help_lists_skills_and_commands_but_hides_admin_commands_from_users(chinwag_chat):
    text = await chinwag_chat(user_id="someone").ask("/help")
    assert "/echo" in text and "/forget" in text and "/help" in text
    assert "/disable" not in text
    admin_text = await chinwag_chat(user_id="root", admin=True).ask("/help")
    assert "/disable" in admin_text


async def test_start_greets_the_user_by_name(chat):
    assert "Hi Tester" in await chat.ask("/start")


class Clash(Skill):
    name = "clash"
    commands = (Command("echo"),)
    priority = 50

    async def handle(self, message, ctx):
        return "clash"


async def test_a_command_claimed_twice_goes_to_the_higher_priority_skill(tmp_path, caplog):
    from bot.core import Bot
    from bot.testing import ChatUser

    async with Bot(core_settings(tmp_path), plugins=[SkillsPlugin(), SkillsPlugin(Clash())]) as bot:
        assert await ChatUser(bot).ask("/echo hi") == "clash"
    assert "shadowed" in caplog.text


class Lookup(Skill):
    """Finds its answer while scoring and hands it to handle through the match."""

    name = "lookup"
    commands = (Command("lookup"),)
    searches = 0

    async def score(self, message: Message, ctx: Context):
        from bot import Match

        Lookup.searches += 1
        if "capital" not in message.text:
            return 0.0
        return Match(0.9, {"answer": "Paris"})

    async def handle(self, message: Message, ctx: Context) -> Reply:
        found = ctx.match["answer"] if ctx.match else "nothing (asked as a command)"
        return Reply(f"found {found}")


async def test_what_score_found_reaches_handle_and_is_not_searched_twice(tmp_path):
    from bot.core import Bot
    from bot.testing import ChatUser

    Lookup.searches = 0
    async with Bot(core_settings(tmp_path), plugins=[SkillsPlugin(Lookup())]) as bot:
        user = ChatUser(bot)
        assert await user.ask("what is the capital of France?") == "found Paris"
        assert Lookup.searches == 1
        assert await user.ask("/lookup capital") == "found nothing (asked as a command)"
