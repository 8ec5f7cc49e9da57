"""The hello plugin's own tests, on chinwag's pytest fixtures (installed with chinwag)."""

import chinwag_hello
import pytest


@pytest.fixture
def chinwag_plugins():
    # Loaded beside the installed plugins; already installed, it is simply not loaded twice.
    return [chinwag_hello]


@pytest.fixture
def chinwag_config():
    return {"skills": {"hello": {"greeting": "Ahoy"}}}


async def test_the_command_greets_by_name(chat):
    assert await chat.ask("/hello Ada") == "Ahoy, Ada!"


async def test_a_plain_hello_reaches_the_skill_without_a_command(chat):
    replies = await chat.send("hello there")
    assert replies[0].skill == "hello"


async def test_the_observer_counts_exclamations(chat, chinwag_bot):
    await chat.send("/hello Bob!!")
    rows = await chinwag_bot.store.last_turns(chat.platform, chat.chat_id, 2)
    assert rows[0].meta.get("exclamations") == 2
