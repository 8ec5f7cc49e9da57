"""A pytest plugin for testing chinwag bots and plugins (installed as the ``pytest11`` entry point).

    async def test_greets(chat):
        replies = await chat.send("/start")
        assert "Hi" in replies[0].text

Fixtures:

``chinwag_config``
    dict of configuration overrides (override the fixture to change them). By default: a
    temporary data directory, no rate limit, and no first-start sentiment training.
``chinwag_plugins``
    extra plugin objects (modules or instances with ``@hookimpl`` methods) to load beside the
    installed ones — how a plugin's own tests load the plugin under test.
``chinwag_bot``
    a started :class:`bot.core.Bot` on a temporary SQLite database, stopped after the test.
``chat``
    a :class:`ChatUser` talking to ``chinwag_bot`` in a private chat.
``chinwag_chat``
    factory for more users and chats: ``chinwag_chat(user_id="u2", chat_id="group-1",
    chat_kind="group", admin=True)``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from bot.config import load_settings
from bot.core import Bot
from bot.simulation.chat import ChatUser

try:
    import pytest_asyncio
except ImportError:  # pragma: no cover - the dev extra installs it
    pytest_asyncio = None  # type: ignore[assignment]

__all__ = ["ChatUser", "chinwag_test_settings"]


def chinwag_test_settings(
    tmp_path: Path, overrides: dict[str, Any] | None = None, model_cache: Path | None = None
) -> Any:
    from bot.config import _deep_merge

    base: dict[str, Any] = {
        "data_dir": tmp_path / "chinwag-data",
        "rate_limit": {"enabled": False},
        # Converting the packaged GGUF takes ~25 s: do it once per machine, not per test.
        "models": {"cache_dir": model_cache} if model_cache else {},
        # Training the first sentiment adapter takes minutes: tests that want labels point
        # models.registry_dir at a trained registry (or switch this back on).
        "skills": {"sentiment": {"train_if_missing": False}},
    }
    return load_settings(path=None, overrides=_deep_merge(base, overrides or {}))


@pytest.fixture
def chinwag_config() -> dict[str, Any]:
    return {}


@pytest.fixture
def chinwag_plugins() -> list[Any]:
    return []


@pytest.fixture(scope="session")
def chinwag_model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Converted model weights shared by every test of the run (and later runs)."""
    return tmp_path_factory.getbasetemp().parent / "chinwag-model-cache"


if pytest_asyncio is not None:

    @pytest_asyncio.fixture
    async def chinwag_bot(
        tmp_path: Path,
        chinwag_config: dict[str, Any],
        chinwag_plugins: list[Any],
        chinwag_model_cache: Path,
    ) -> AsyncIterator[Bot]:
        settings = chinwag_test_settings(tmp_path, chinwag_config, chinwag_model_cache)
        bot = Bot(settings, plugins=chinwag_plugins)
        await bot.start()
        try:
            yield bot
        finally:
            await bot.stop()

    @pytest_asyncio.fixture
    async def chinwag_chat(chinwag_bot: Bot) -> Callable[..., ChatUser]:
        def make(*, admin: bool = False, **kwargs: Any) -> ChatUser:
            user = ChatUser(chinwag_bot, **kwargs)
            if admin:
                chinwag_bot.add_admin(user.platform, user.user_id)
            return user

        return make

    @pytest_asyncio.fixture
    async def chat(chinwag_chat: Callable[..., ChatUser]) -> ChatUser:
        return chinwag_chat()
