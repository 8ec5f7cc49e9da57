"""A pytest plugin for testing chinwag bots and plugins (installed as the ``pytest11`` entry point).

    async def test_greets(chat):
        replies = await chat.send("/start")
        assert "Hi" in replies[0].text

Fixtures:

``chinwag_config``
    dict of configuration overrides (override the fixture to change them). By default: a
    temporary data directory, no rate limit, and no first-start training.
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

import inspect
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
        # First-start training (the sentiment classifier's) takes minutes: tests that want
        # labels point models.registry_dir at a trained registry (or switch this back on).
        "models": {"first_start_training": False}
        | ({"cache_dir": model_cache} if model_cache else {}),
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


#: Async tests asking for one of these run on pytest-asyncio without any configuration.
_ASYNC_FIXTURES = frozenset({"chat", "chinwag_bot", "chinwag_chat"})


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_pycollect_makeitem(collector: Any, name: str, obj: object) -> Any:
    """Mark ``async def test_…(chat)`` as an asyncio test, so a plugin author's first test
    passes without ``asyncio_mode = "auto"`` (pytest-asyncio's default mode is strict)."""
    if (
        pytest_asyncio is not None
        and name.startswith("test")
        and inspect.iscoroutinefunction(obj)
        and _ASYNC_FIXTURES & set(inspect.signature(obj).parameters)
        and not any(m.name == "asyncio" for m in getattr(obj, "pytestmark", []))
    ):
        pytest.mark.asyncio(obj)
    yield


# -- scenario files as tests ---------------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        "chinwag_scenarios",
        "glob patterns of scenario files collected as tests",
        type="args",
        default=["*.scenario.yaml", "*.scenario.yml"],
    )
    parser.addini(
        "chinwag_scenario_config",
        "a chinwag.toml the scenario tests' bot uses (relative to the rootdir)",
        default="",
    )


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    from fnmatch import fnmatch

    patterns = parent.config.getini("chinwag_scenarios")
    if any(fnmatch(file_path.name, p) for p in patterns):
        return ScenarioFile.from_parent(parent, path=file_path)
    return None


class ScenarioFile(pytest.File):
    """A scenario file: one test per scenario in it."""

    def collect(self) -> Any:
        from bot.simulation.scenarios import ScenarioError, load_file

        try:
            scenarios = load_file(self.path)
        except ScenarioError as exc:
            raise self.CollectError(str(exc)) from None
        for scenario in scenarios:
            yield ScenarioItem.from_parent(self, name=scenario.name, scenario=scenario)


class ScenarioFailed(Exception):
    pass


class ScenarioItem(pytest.Item):
    """One scenario, run through a fresh bot on a temporary data directory."""

    def __init__(self, *, scenario: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.scenario = scenario

    def runtest(self) -> None:
        import asyncio
        import tempfile

        from bot.simulation.runner import simulate

        config = self.config.getini("chinwag_scenario_config")
        overrides: dict[str, Any] = {}
        if config:
            import tomllib

            overrides = tomllib.loads((self.config.rootpath / config).read_text("utf-8"))
        factory = getattr(self.config, "_tmp_path_factory", None)  # pytest's tmp_path plugin
        cache = factory.getbasetemp().parent / "chinwag-model-cache" if factory else None
        with tempfile.TemporaryDirectory(prefix="chinwag-scenario-") as tmp:
            settings = chinwag_test_settings(Path(tmp), overrides, cache)
            (result,) = asyncio.run(simulate(settings, [self.scenario], workdir=Path(tmp)))
        if result.skipped is not None:
            pytest.skip(result.skipped)
        if not result.passed:
            raise ScenarioFailed(result.transcript())

    def repr_failure(self, excinfo: Any, style: Any = None) -> str:
        if isinstance(excinfo.value, ScenarioFailed):
            return f"scenario {self.scenario.name!r} failed:\n{excinfo.value}"
        return str(super().repr_failure(excinfo))

    def reportinfo(self) -> tuple[Path, int | None, str]:
        return self.path, (self.scenario.line or 1) - 1, f"scenario: {self.scenario.name}"
