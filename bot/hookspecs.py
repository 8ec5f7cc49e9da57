"""The plugin contract: every hook a chinwag plugin may implement.

pluggy calls hooks synchronously, so hooks never do slow work themselves: ``register_*`` hooks
hand objects to a ``register`` callable (the shape ``llm`` uses), and lifecycle hooks may return
an awaitable that the asyncio core awaits ("await me maybe", as datasette does). Every hook here
is documented in ``docs/plugins.md``; ``tests/test_hooks.py`` fails when one is not.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from collections.abc import Callable

    import typer

hookspec = pluggy.HookspecMarker("chinwag")
hookimpl = pluggy.HookimplMarker("chinwag")


@hookspec
def register_skills(register: Callable[[Any], None]) -> None:
    """Register skill objects by calling ``register(skill)`` once per skill."""


@hookspec
def register_observers(register: Callable[[Any], None]) -> None:
    """Register observers that see (and may annotate) every inbound message before routing."""


@hookspec
def register_reply_filters(register: Callable[[Any], None]) -> None:
    """Register reply filters that may rewrite or withhold every reply before it is sent."""


@hookspec
def register_adapters(register: Callable[[Any], None], bot: Any) -> None:
    """Register platform adapters for ``chinwag run`` by calling ``register(adapter)``.

    An adapter (:class:`bot.adapters.base.Adapter`) has a ``platform`` name and async
    ``start()``, ``stop()`` and ``push(chat_id, reply)``; it feeds inbound messages to
    ``bot.handle`` and ratings to ``bot.record_feedback``. Register only the adapters whose
    configuration is present (a token, ``enabled = true``); the built-in ones (Telegram,
    Discord, the HTTP API) come from ``bot.adapters.plugin`` this way too.
    """


@hookspec
def register_services(register: Callable[..., None], settings: Any) -> None:
    """Register ``chinwag`` sub-commands that ``chinwag run`` keeps running beside the bot, each
    in its own child process: ``register("train", "training schedule")``.

    The child reads the same configuration, logs beside the bot, runs for as long as the bot
    serves, and ends with it — SIGTERM then SIGKILL after 10 s on a normal stop, and by the
    kernel when the bot itself is killed. Register only what ``settings`` asks for (the
    trainers register their schedule unless ``trainers.schedule`` is empty).
    """


@hookspec
def register_config(register: Callable[[str, Any], None]) -> None:
    """Declare a top-level configuration section: ``register("knowledge", KnowledgeSettings)``.

    The model (a pydantic ``BaseModel``; unknown keys are refused whatever its own setting)
    validates ``[knowledge]`` in the file and ``CHINWAG_KNOWLEDGE__…`` in the environment when
    the plugins load — every mistake in every section reported at once — and the plugin reads
    it with ``settings.section("knowledge", KnowledgeSettings)``. Skills need not do this:
    their ``config_model`` covers ``[skills.<name>]``.
    """


@hookspec
def register_commands(cli: typer.Typer) -> None:
    """Add sub-commands to the ``chinwag`` command line."""


@hookspec
def escalate(bot: Any, event: Any) -> Any:
    """A conversation needs a human (``event`` is a :class:`bot.messages.Escalation`).

    Called once per escalation, e.g. by the sentiment skill after several negative messages
    in a row; may return an awaitable. The built-in implementation notifies admin chats.
    """


@hookspec
def startup(bot: Any) -> Any:
    """Called once the bot is ready; may return an awaitable."""


@hookspec
def shutdown(bot: Any) -> Any:
    """Called when the bot stops, before the store closes; may return an awaitable."""
