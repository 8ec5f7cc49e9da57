"""Every hook in the plugin contract is documented and does what docs/plugins.md says."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import typer
from pydantic import BaseModel
from typer.testing import CliRunner

from bot import Escalation, Reply, Skill, hookimpl, hookspecs
from bot.core import Bot
from bot.testing import ChatUser
from tests.conftest import core_settings

ROOT = Path(__file__).resolve().parents[1]
HOOKS = sorted(
    name
    for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
    if hasattr(fn, "chinwag_spec")
)


def test_the_contract_has_the_hooks_we_document():
    assert HOOKS == [
        "escalate",
        "register_adapters",
        "register_commands",
        "register_config",
        "register_observers",
        "register_reply_filters",
        "register_services",
        "register_skills",
        "shutdown",
        "startup",
    ]


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_documented(hook):
    docs = (ROOT / "docs" / "plugins.md").read_text()
    assert re.search(rf"^### `{hook}\(", docs, re.M), f"docs/plugins.md has no section for {hook}"


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_exercised_by_this_file(hook):
    source = Path(__file__).read_text()
    assert re.search(rf"@hookimpl\n\s+def {hook}\(", source), f"no test implements {hook}"


class Greeter(Skill):
    name = "greeter"
    commands = ("greet",)

    async def handle(self, message, ctx):
        return Reply(f"hello {message.user_name}")


class Tagger:
    name = "tagger"

    async def observe(self, message, ctx):
        message.metadata["tagged"] = True


class Signer:
    name = "signer"

    async def filter(self, reply, message, ctx):
        reply.text += " —bot"
        return reply


class Pager:
    """A third-party platform: what it was asked to push."""

    platform = "pager"

    def __init__(self, bot):
        self.bot, self.pushed, self.running = bot, [], False

    async def start(self):
        self.running = True

    async def stop(self):
        self.running = False

    async def push(self, chat_id, reply):
        self.pushed.append((chat_id, reply.text))


class PagerConfig(BaseModel):
    """``[pager]``: a section of the plugin's own, beside the core's."""

    url: str
    timeout_s: float = 5.0


class EveryHook:
    """One plugin implementing every hook, recording what happened."""

    def __init__(self):
        self.events: list[str] = []

    @hookimpl
    def register_skills(self, register):
        register(Greeter())

    @hookimpl
    def register_observers(self, register):
        register(Tagger())

    @hookimpl
    def register_reply_filters(self, register):
        register(Signer())

    @hookimpl
    def register_adapters(self, register, bot):
        register(Pager(bot))

    @hookimpl
    def register_services(self, register, settings):
        register("skills", "skill lister")  # any chinwag sub-command can be a service

    @hookimpl
    def register_config(self, register):
        register("pager", PagerConfig)

    @hookimpl
    def register_commands(self, cli):
        @cli.command("wave")
        def wave() -> None:
            typer.echo("👋")

    @hookimpl
    def startup(self, bot):
        async def started():
            self.events.append(f"startup:{len(bot.skills)}")

        return started()

    @hookimpl
    def escalate(self, bot, event):
        async def escalated():
            self.events.append(f"escalate:{event.user_id}:{event.reason}")

        return escalated()

    @hookimpl
    def shutdown(self, bot):
        self.events.append("shutdown")


async def test_skills_observers_filters_and_lifecycle_hooks_work_together(tmp_path):
    plugin = EveryHook()
    settings = core_settings(tmp_path, {"pager": {"url": "https://pager.example"}})
    bot = Bot(settings, plugins=[plugin], load_entry_points=False)
    await bot.start()
    assert plugin.events == ["startup:1"]
    user = ChatUser(bot, user_name="Ann")
    replies = await user.send("/greet")
    assert [r.text for r in replies] == ["hello Ann —bot"]
    assert user.sent[-1].metadata["tagged"] is True
    await bot.escalate(Escalation("test", "chat-1", "user-1", "Ann", "asked for a human"))
    await bot.stop()
    assert plugin.events == ["startup:1", "escalate:user-1:asked for a human", "shutdown"]


async def test_a_plugins_own_section_is_validated_at_start_and_read_typed(tmp_path):
    from bot.config import ConfigError

    broken = core_settings(tmp_path, {"pager": {"timeout_s": "soon", "retries": 3}})
    with pytest.raises(ConfigError) as caught:
        await Bot(broken, plugins=[EveryHook()], load_entry_points=False).start()
    # Every mistake at once, each named by its key.
    for key in ("pager.url", "pager.timeout_s", "pager.retries"):
        assert key in str(caught.value)
    fine = core_settings(tmp_path, {"pager": {"url": "https://pager.example"}})
    async with Bot(fine, plugins=[EveryHook()], load_entry_points=False) as bot:
        pager = bot.settings.section("pager", PagerConfig)
        assert (pager.url, pager.timeout_s) == ("https://pager.example", 5.0)


async def test_a_plugin_adds_a_platform_beside_the_built_in_ones(tmp_path):
    from bot.adapters.http import HttpServer
    from bot.runner import adapters_for

    settings = core_settings(
        tmp_path, {"http": {"enabled": True, "tokens": ["t"]}, "pager": {"url": "p"}}
    )
    async with Bot(settings, plugins=[EveryHook()], load_entry_points=False) as bot:
        http, pager = adapters_for(bot)
        assert isinstance(http, HttpServer) and isinstance(pager, Pager)
        assert [type(a) for a in adapters_for(bot)] == [HttpServer, Pager]  # registered once


async def test_chinwag_run_keeps_a_plugins_service_running_in_its_own_process(tmp_path):
    from bot.runner import _services

    settings = core_settings(tmp_path, {"pager": {"url": "p"}})
    async with (
        Bot(settings, plugins=[EveryHook()], load_entry_points=False) as bot,
        _services(bot, None, None) as children,
    ):
        (child,) = children  # EveryHook's; the trainers' schedule is not loaded here
        assert await child.wait() == 0  # `chinwag skills` ran, with this configuration


async def test_an_adapter_without_push_stops_the_start_naming_its_plugin(tmp_path):
    from bot.config import ConfigError
    from bot.runner import adapters_for

    class Mute:
        platform = "mute"

        async def start(self): ...

        async def stop(self): ...

    class MutePlugin:
        @hookimpl
        def register_adapters(self, register, bot):
            register(Mute())

    async with Bot(core_settings(tmp_path), plugins=[MutePlugin()]) as bot:
        with pytest.raises(ConfigError, match=r"MutePlugin.*adapter.*push\(\)"):
            adapters_for(bot)


def test_register_commands_adds_a_cli_subcommand():
    app = typer.Typer()

    @app.command()
    def noop() -> None: ...

    EveryHook().register_commands(app)
    result = CliRunner().invoke(app, ["wave"])
    assert result.exit_code == 0
    assert "👋" in result.output


async def test_a_startup_hook_that_fails_aborts_startup_and_closes_the_store(tmp_path):
    class Broken:
        @hookimpl
        def startup(self, bot):
            raise RuntimeError("cannot reach the CRM")

    bot = Bot(core_settings(tmp_path), plugins=[Broken()])
    with pytest.raises(RuntimeError, match="CRM"):
        await bot.start()
    assert bot.store.engine is None


async def test_two_plugins_registering_the_same_skill_name_is_a_clear_error(tmp_path):
    from bot.config import ConfigError
    from tests.conftest import SkillsPlugin

    bot = Bot(core_settings(tmp_path), plugins=[SkillsPlugin(Greeter()), SkillsPlugin(Greeter())])
    with pytest.raises(ConfigError, match="greeter"):
        await bot.start()


class _Registers:
    """A third-party plugin registering whatever it is given, under a name of its own."""

    def __init__(self, hook: str, obj) -> None:
        self.__name__ = "acme"
        setattr(self, hook, hookimpl(lambda register: register(obj), specname=hook))


class NoHandle:
    name = "nohandle"


class SyncHandle:
    name = "synchandle"

    def handle(self, message, ctx):
        return "hi"


class WrongArgs:
    name = "wrongargs"

    async def handle(self, message):
        return "hi"


class MisspelledFilter:
    name = "censor"

    async def filtre(self, reply, message, ctx):
        return reply


class CommandsOnly:
    """No ``score``: answers its command, never free text."""

    name = "ping"
    commands = ("ping",)

    async def handle(self, message, ctx):
        return "pong"


@pytest.mark.parametrize(
    ("hook", "obj", "error"),
    [
        ("register_skills", NoHandle(), "skill 'nohandle' (NoHandle) without a handle() method"),
        ("register_skills", SyncHandle(), "handle() must be async"),
        ("register_skills", WrongArgs(), "handle() must accept (message, ctx)"),
        ("register_skills", type("Bad", (CommandsOnly,), {"name": "two words"})(), "name"),
        ("register_reply_filters", MisspelledFilter(), "'censor' (MisspelledFilter) without a "),
    ],
)
async def test_a_malformed_plugin_object_stops_the_start_naming_plugin_and_problem(
    tmp_path, hook, obj, error
):
    from bot.config import ConfigError

    bot = Bot(core_settings(tmp_path), plugins=[_Registers(hook, obj)])
    with pytest.raises(ConfigError, match="plugin 'acme'") as raised:
        await bot.start()
    assert error in str(raised.value)


async def test_a_skill_without_score_answers_its_command_and_nothing_else(tmp_path):
    bot = Bot(core_settings(tmp_path), plugins=[_Registers("register_skills", CommandsOnly())])
    async with bot:
        user = ChatUser(bot)
        assert await user.ask("/ping") == "pong"
        replies = await user.send("ping me please")
        assert replies[0].skill != "ping"


async def test_a_config_model_without_forbid_still_rejects_a_typo(tmp_path):
    from pydantic import BaseModel

    from bot.config import ConfigError

    class Lenient(BaseModel):  # pydantic's default: unknown keys ignored
        city: str = "Zaragoza"

    class Weather(CommandsOnly):
        name = "weather"
        config_model = Lenient

    settings = core_settings(tmp_path, {"skills": {"weather": {"citty": "Lyon"}}})
    bot = Bot(settings, plugins=[_Registers("register_skills", Weather())])
    with pytest.raises(ConfigError, match=r"skills\.weather\.citty: unknown key"):
        await bot.start()


async def test_a_plain_async_function_becomes_a_command_skill(tmp_path):
    from bot import command

    @command("roll", usage="[SIDES]")
    async def roll(message, ctx):
        """Roll a die."""
        return f"rolled a d{ctx.args or 6}"

    class Dice:
        @hookimpl
        def register_skills(self, register):
            register(roll)

    async with Bot(core_settings(tmp_path), plugins=[Dice()]) as bot:
        user = ChatUser(bot)
        assert await user.ask("/roll 20") == "rolled a d20"
        assert "/roll [SIDES] — Roll a die." in await user.ask("/help")
        (reply,) = await user.send("roll a die for me")  # a command skill scores nothing
        assert reply.skill != "roll"


def test_a_command_function_must_be_async():
    from bot import command

    with pytest.raises(TypeError, match="needs an async function"):

        @command("sync")
        def sync(message, ctx):
            return "no"
