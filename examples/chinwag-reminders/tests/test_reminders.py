"""The reminders skill, tested the way an operator tests a plugin: with chinwag's own pytest
fixtures (``chat``, ``chinwag_bot``, ``chinwag_config``), against a real bot and database.

Run from this folder after ``pip install -e .``: ``pytest``.
"""

from __future__ import annotations

import asyncio

import pytest
from chinwag_reminders import parse

from bot import Reply


@pytest.fixture
def chinwag_config():
    return {"skills": {"reminders": {"max_per_user": 2, "template": "⏰ {text}!"}}}


@pytest.fixture
def delivered(chinwag_bot):
    """What the bot sends unprompted, captured as a platform adapter would send it."""
    sent: list[tuple[str, Reply]] = []

    async def outbox(chat_id: str, reply: Reply) -> None:
        sent.append((chat_id, reply))

    chinwag_bot.outboxes["test"] = outbox
    return sent


def test_plain_language_and_command_forms_parse():
    assert parse("remind me to stretch in 20 minutes") == (1200, "stretch")
    assert parse("Remind me in 2 hours to call mum.") == (7200, "call mum")
    assert parse("in an hour water the plants") == (3600, "water the plants")
    assert parse("what's the time?") is None


async def test_a_reminder_is_confirmed_then_delivered_in_the_chat(chat, delivered):
    (reply,) = await chat.send("/remind 1s stretch")
    assert reply.skill == "reminders" and "in 1 second" in reply.text
    await asyncio.sleep(1.6)
    assert delivered == [("chat-1", delivered[0][1])]
    assert delivered[0][1].text == "⏰ stretch!"
    assert await chat.ask("/reminders") == "You have no pending reminders."


async def test_plain_language_requests_are_routed_by_score(chat):
    (reply,) = await chat.send("could you remind me to call the plumber in 3 hours")
    assert reply.skill == "reminders" and "call the plumber in 3 hours" in reply.text


async def test_the_configured_limit_and_cancelling(chat):
    await chat.send("/remind 10m tea")
    await chat.send("/remind 20m more tea")
    assert "already have 2 reminders" in await chat.ask("/remind 30m even more tea")
    listing = await chat.ask("/reminders")
    assert "tea" in listing and "more tea" in listing
    number = listing.split("#")[1].split(" ")[0]
    assert await chat.ask(f"/unremind {number}") == "Cancelled."
    assert "Tell me when and what" in await chat.ask("/remind sometime")
