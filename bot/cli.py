"""The ``chinwag`` command line.

Every command that starts the bot shares one error policy: a broken configuration, an unusable
database or a plugin that will not load prints one clear line and exits with status 2, rather
than a traceback.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import traceback
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Annotated, Any

import typer

from bot import process
from bot.config import ConfigError, Settings, load_settings
from bot.logs import setup_logging
from bot.plugins import PluginError, make_manager
from bot.process import abandoned, fit_threads_to_cpu_limit, leave_abandoned
from bot.store import StoreError

app = typer.Typer(
    name="chinwag",
    help="chinwag: a chat bot platform with pluggable skills that learns from its conversations.",
    no_args_is_help=True,
    add_completion=False,
)
db_app = typer.Typer(help="Database maintenance.", no_args_is_help=True)
app.add_typer(db_app, name="db")

EXIT_CONFIG = 2
log = logging.getLogger("chinwag")


class _State:
    config: Path | None = None
    data_dir: Path | None = None
    log_level: str | None = None
    log_file: Path | None = None


state = _State()


@app.callback()
def _global(
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            help="Configuration file (default: $CHINWAG_CONFIG or ./chinwag.toml).",
        ),
    ] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option("--data-dir", help="Data directory (database, indexes, adapters)."),
    ] = None,
    log_level: Annotated[
        str | None, typer.Option("--log-level", help="DEBUG, INFO, WARNING or ERROR.")
    ] = None,
    verbose: Annotated[
        int,
        typer.Option(
            "--verbose", "-v", count=True, help="More log detail: -v for INFO, -vv for DEBUG."
        ),
    ] = 0,
    log_file: Annotated[
        Path | None,
        typer.Option(
            "--log-file",
            help="Write the log here instead of stderr (an interactive chat logs to "
            "<data_dir>/logs/chinwag.log by default).",
        ),
    ] = None,
) -> None:
    if verbose and log_level is None:
        log_level = "DEBUG" if verbose > 1 else "INFO"
    state.config, state.data_dir, state.log_level = config, data_dir, log_level
    state.log_file = log_file
    fit_threads_to_cpu_limit()  # before any model or index starts its threads


def fail(message: str, code: int = EXIT_CONFIG) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def settings(default_level: str | None = None) -> Settings:
    """The effective settings for a command, honouring the global options; plugins' commands
    (the ``register_commands`` hook) call this too."""
    return _settings(default_level)


def _settings(default_level: str | None = None) -> Settings:
    overrides: dict[str, Any] = {}
    if state.data_dir is not None:
        overrides["data_dir"] = state.data_dir
    if state.log_level is not None:
        overrides["log_level"] = state.log_level.upper()
    try:
        s = load_settings(state.config, overrides)
    except ConfigError as exc:
        raise fail(str(exc)) from None
    setup_logging(
        state.log_level.upper() if state.log_level else (default_level or s.log_level),
        s.secret_values(),
        log_file=state.log_file,
    )
    if process.fitted is not None:
        log.info("%s", process.fitted)
    return s


def interactive_log(s: Settings) -> Path:
    """An interactive chat must not have log lines written over its prompt: the log goes to a
    file (``--log-file``, else ``<data_dir>/logs/chinwag.log``); returns where."""
    from bot.logs import log_to_file

    return log_to_file(state.log_file or s.data_dir / "logs" / "chinwag.log")


def run_async(main: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    try:
        return asyncio.run(main())
    except (ConfigError, StoreError, PluginError) as exc:
        raise fail(str(exc)) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


@app.command()
def run() -> None:
    """Start every configured platform adapter; the console chat when none is configured."""
    from bot.runner import serve

    s = settings()
    console_log = (lambda: interactive_log(s)) if sys.stdin.isatty() else None
    run_async(lambda: serve(s, config_path=state.config, console_log=console_log))


@app.command()
def chat(
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON object per message (non-TTY).")
    ] = False,
    user: Annotated[str, typer.Option(help="User id to chat as.")] = "local",
) -> None:
    """Chat in the terminal; reads one message per line when stdin is not a terminal."""
    from bot.adapters.console import ConsoleChat
    from bot.core import Bot

    s = settings(default_level="WARNING")
    interactive = sys.stdin.isatty() and not as_json
    log_path = interactive_log(s) if interactive else None

    async def main() -> None:
        async with Bot(s) as bot:
            console = ConsoleChat(bot, user_id=user, as_json=as_json)
            if interactive:
                await console.run_interactive(log_path=log_path)
            else:
                await console.run_pipe()

    run_async(main)


@app.command()
def skills(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List the loaded skills, their commands and the plugin each came from."""
    from bot.core import Bot

    s = settings(default_level="WARNING")
    try:
        bot = Bot(s)
        bot.load_skills()
    except (ConfigError, PluginError) as exc:
        raise fail(str(exc)) from None
    dist = {p.name: (p.distribution, p.version) for p in bot.plugins}
    rows: list[dict[str, Any]] = [
        {
            "name": e.name,
            "plugin": e.plugin,
            "distribution": dist.get(e.plugin, (None, None))[0],
            "version": dist.get(e.plugin, (None, None))[1],
            "enabled": e.enabled,
            "priority": e.priority,
            "threshold": e.threshold,
            "fallback": e.name == s.bot.fallback,
            "description": e.description,
            "commands": [
                {
                    "name": c.name,
                    "usage": f"/{c.name} {c.usage}".strip(),
                    "description": c.description,
                    "admin_only": c.admin_only,
                }
                for c in e.commands.values()
            ],
        }
        for e in bot.skills
    ]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    dists = {name: f"{d or '-'} {v or ''}".strip() for name, (d, v) in dist.items()}
    table = Table(title=f"{len(rows)} skills loaded")
    for col in ("skill", "commands", "plugin", "state", "description"):
        table.add_column(col)
    for r in rows:
        cmds = " ".join(f"/{c['name']}" + ("*" if c["admin_only"] else "") for c in r["commands"])
        state_ = ("on" if r["enabled"] else "off") + (" (fallback)" if r["fallback"] else "")
        table.add_row(
            r["name"],
            cmds,
            f"{r['plugin']} ({dists.get(r['plugin'], '')})",
            state_,
            r["description"],
        )
    Console().print(table)
    typer.echo("* admin-only")


@app.command()
def simulate(
    paths: Annotated[
        list[Path] | None, typer.Argument(help="Scenario files or directories of them.")
    ] = None,
    junit: Annotated[
        Path | None, typer.Option(help="Also write the results as JUnit XML (for CI).")
    ] = None,
    concurrency: Annotated[int, typer.Option(min=1, help="Scenarios or users at once.")] = 8,
    record: Annotated[
        bool,
        typer.Option(
            help="Log into the configured database (ratings become feedback the trainers "
            "learn from) instead of a temporary one."
        ),
    ] = False,
    users: Annotated[int, typer.Option(min=0, help="Simulated users to run.")] = 0,
    turns: Annotated[int, typer.Option(min=1, help="Messages per simulated user.")] = 4,
    persona: Annotated[
        str, typer.Option(help="replay, asker, complainer, or mixed (all three in turn).")
    ] = "mixed",
    questions: Annotated[
        Path | None, typer.Option(help="Questions for 'asker' users, one per line.")
    ] = None,
    url: Annotated[
        str | None, typer.Option(help="Talk to a running bot's HTTP API instead of in-process.")
    ] = None,
    token: Annotated[
        str | None, typer.Option(envvar="CHINWAG_API_TOKEN", help="Bearer token for --url.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed for the simulated users' choices.")] = 0,
) -> None:
    """Run scenario files and/or simulated users through the real bot; exit 1 on any failure."""
    from bot.simulation.console import run_simulation

    if not paths and not users:
        raise fail("give scenario files or directories, or --users N")
    s = settings(default_level="WARNING")
    code = run_async(
        lambda: run_simulation(
            s,
            paths or [],
            junit=junit,
            concurrency=concurrency,
            record=record,
            users=users,
            turns=turns,
            persona=persona,
            questions=questions,
            url=url,
            token=token,
            seed=seed,
        )
    )
    raise typer.Exit(code)


@app.command("config")
def show_config() -> None:
    """Print the effective configuration (file + environment + defaults), secrets masked.

    Plugins' sections (``[knowledge]``, ``[trainers]``…) and skills' sections are validated
    by their plugins, every mistake listed at once (exit code 2)."""
    from bot.plugins import load_skills

    s = settings(default_level="WARNING")
    try:
        pm, _ = make_manager(disabled=s.disabled_plugins)
        loaded = load_skills(pm, s)
    except (ConfigError, PluginError) as exc:
        raise fail(str(exc)) from None
    data = s.masked()
    data.pop("sections", None)
    for name, written in s.sections.items():
        # Declared: validated, defaults filled in. Not declared: as written (logged above).
        model = loaded.sections.get(name)
        data[name] = model.model_dump(mode="json") if model is not None else written
    for name, model in loaded.sections.items():
        data.setdefault(name, model.model_dump(mode="json"))
    typer.echo(json.dumps(data, indent=2, default=str))


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Create or migrate the database schema to the latest version."""
    from bot.store import ConversationStore
    from bot.store.migrate import head_revision

    s = settings()

    async def main() -> None:
        store = ConversationStore(s.database_url, synchronous=s.database.synchronous)
        await store.open(migrate=True)
        await store.close()

    run_async(main)
    typer.echo(f"database at revision {head_revision()}")


@db_app.command("current")
def db_current() -> None:
    """Show the database's schema revision."""
    from sqlalchemy.ext.asyncio import create_async_engine

    from bot.store.migrate import current_revision, head_revision

    s = settings()

    async def main() -> str | None:
        engine = create_async_engine(s.database_url)
        try:
            async with engine.connect() as conn:
                return await conn.run_sync(current_revision)
        finally:
            await engine.dispose()

    rev = run_async(main)
    typer.echo(f"current: {rev or 'empty'}; latest: {head_revision()}")


def _disabled_plugins(argv: list[str]) -> list[str]:
    """``disabled_plugins`` of the configuration the command will read (``--config`` or the
    usual places): a plugin switched off adds no sub-commands either."""
    path = None
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
        elif arg.startswith("--config="):
            path = arg.partition("=")[2]
    try:
        return list(load_settings(path).disabled_plugins)
    except ConfigError:
        return []  # the command that reads the configuration reports what is wrong with it


def _plugin_commands() -> None:
    """Let plugins add sub-commands (the ``register_commands`` hook)."""
    try:
        pm, _ = make_manager(disabled=_disabled_plugins(sys.argv[1:]))
    except PluginError as exc:
        typer.echo(f"warning: {exc}", err=True)
        return
    pm.hook.register_commands(cli=app)


def main() -> None:
    _plugin_commands()
    try:
        app()
    except SystemExit as exc:
        # A model load abandoned by a stop must not turn the exit into an abort.
        leave_abandoned(exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1)
        raise
    except BaseException:
        if abandoned():  # the traceback first: the exit below skips the one Python prints
            traceback.print_exc()
            leave_abandoned(1)
        raise
    leave_abandoned(0)


if __name__ == "__main__":
    # ``python -m bot.cli`` (how the bot starts its training child) runs this file as
    # ``__main__``; plugins' commands import ``bot.cli``, a second copy with its own global
    # options. Run the one they import, so --config and --log-file reach them too.
    from bot import cli

    cli.main()
