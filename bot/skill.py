"""What a skill, an observer and a reply filter are, and what they are handed.

Skills are duck-typed objects (the :class:`Skill` base class is a convenience, not a
requirement) so a third-party plugin can be a tiny module with no inheritance. The core reads
the attributes below; anything missing falls back to the base class's default.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

from pydantic import BaseModel

from bot.messages import Message, Reply

if TYPE_CHECKING:
    from bot.services import BotServices


@dataclass(frozen=True, slots=True)
class Command:
    """A slash command a skill owns (``/name args``)."""

    name: str
    description: str = ""
    admin_only: bool = False
    #: What follows the command, e.g. ``QUESTION`` or ``[what was wrong]`` (help shows
    #: ``/ask QUESTION``); a usage that repeats ``/name`` is accepted and shown once.
    usage: str = ""

    def __post_init__(self) -> None:
        usage = self.usage.strip()
        if usage.startswith(f"/{self.name}"):
            object.__setattr__(self, "usage", usage[len(self.name) + 1 :].strip())


#: Where generated text goes as it is produced, for the message being handled (set by
#: ``Bot.handle(..., on_token=...)``; a context variable so every concurrent message has its own).
TOKEN_SINK: ContextVar[Callable[[str], Awaitable[None]] | None] = ContextVar(
    "chinwag_token_sink", default=None
)


#: Resolved once the message being handled is durably stored (or found to be a redelivery):
#: webhook adapters acknowledge an update only then, so a crash never loses one.
INBOUND_STORED: ContextVar[Any] = ContextVar("chinwag_inbound_stored", default=None)


@dataclass(frozen=True, slots=True)
class Match:
    """What ``score`` may return instead of a bare number: the score, plus what the skill
    found while scoring (search hits, a parsed intent). When the skill wins the message, its
    ``handle`` gets ``data`` as ``ctx.match`` — the work is not done twice, and nothing has to
    be cached on the skill object (which serves every chat at once)."""

    score: float
    data: Any = None


@dataclass(slots=True)
class Context:
    """Everything a skill may use while answering one message.

    Built once per message; each step (observers, scoring, the skill, reply filters) sees it
    with its own ``config``, ``command`` and ``match``, and all of them share ``extras``.
    ``bot`` is the interface to the shared services — the store, the configuration, the model
    runtime, the knowledge index, per-chat policy, the loaded skills
    (:class:`bot.services.BotServices` lists them) — not the core itself.
    """

    bot: BotServices
    config: Any = None
    command: str | None = None
    args: str = ""
    is_admin: bool = False
    #: Per-message scratch shared by the observers, the skill and the reply filters of one
    #: message (an observer's detected language, read by a filter); gone with the message.
    extras: dict[str, Any] = field(default_factory=dict)
    #: ``Match.data`` from this skill's ``score`` for this message (``None`` for commands).
    match: Any = None

    @property
    def streaming(self) -> bool:
        """Whether the platform shows text as it is generated (then skills ``emit`` pieces)."""
        return TOKEN_SINK.get() is not None

    async def emit(self, piece: str) -> None:
        """Hand a piece of generated text to a streaming client; a no-op otherwise."""
        sink = TOKEN_SINK.get()
        if sink is not None and piece:
            await sink(piece)

    async def history(self, message: Message, limit: int = 10) -> list[Any]:
        """The chat's last ``limit`` turns before this message, oldest first."""
        return await self.bot.store.last_turns(
            message.platform, message.chat_id, limit, before_id=message.id
        )


class Skill:
    """Base class for skills. Subclasses set ``name`` and override ``handle``.

    ``score`` must be cheap (no model calls): every enabled skill scores every message that is
    not a command, and the highest score above ``threshold`` wins.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    commands: ClassVar[tuple[Command, ...]] = ()
    #: pydantic model validating this skill's ``[skills.<name>]`` configuration section.
    config_model: ClassVar[type[BaseModel] | None] = None
    priority: ClassVar[int] = 0
    threshold: ClassVar[float] = 0.5
    #: seconds; ``None`` means the bot-wide ``skill_timeout_s``. Also the deadline the model
    #: runtime works to: a reply that could not be ready by then is refused at once.
    timeout_s: ClassVar[float | None] = None
    #: The skill calls the model runtime. Such skills are bounded by ``bot.max_concurrency``;
    #: the others (commands, lookups) never queue behind model work. A ``RuntimeBusy`` the
    #: skill does not catch becomes the bot's honest "busy" reply.
    uses_model: ClassVar[bool] = False

    async def setup(self, bot: BotServices, config: Any) -> None:
        """Called once at start-up with the skill's validated configuration."""

    async def score(self, message: Message, ctx: Context) -> float | Match:
        return 0.0

    async def handle(self, message: Message, ctx: Context) -> Reply | list[Reply] | str | None:
        raise NotImplementedError


Handler = Callable[[Message, "Context"], Awaitable["Reply | list[Reply] | str | None"]]


def command(
    name: str,
    description: str = "",
    *,
    usage: str = "",
    admin_only: bool = False,
    timeout_s: float | None = None,
    uses_model: bool = False,
) -> Callable[[Handler], Skill]:
    """Make a plain ``async def f(message, ctx)`` a skill that answers ``/name``.

    Most plugins are one command; a class with three class attributes is ceremony for that.
    The result is an ordinary :class:`Skill` (registered, checked, timed out and listed by
    ``/help`` like any other)::

        @command("roll", "Roll a die")
        async def roll(message, ctx):
            return f"🎲 {random.randint(1, 6)}"

    The function returns what ``handle`` may return (text, a :class:`Reply`, several, or
    ``None``); ``ctx.args`` is the text after the command. ``description`` defaults to the
    first line of the docstring.
    """

    def make(fn: Handler) -> Skill:
        if not inspect.iscoroutinefunction(fn):
            raise TypeError(f"@command({name!r}) needs an async function, got {fn!r}")
        about = description or (inspect.getdoc(fn) or "").partition("\n")[0]
        attrs = {
            "name": name,
            "description": about,
            "commands": (Command(name, about, admin_only=admin_only, usage=usage),),
            "timeout_s": timeout_s,
            "uses_model": uses_model,
            "__doc__": inspect.getdoc(fn),
            "__module__": fn.__module__,
        }
        cls = type(
            f"{name.title().replace('-', '').replace('_', '')}Command", (_FunctionSkill,), attrs
        )
        return cls(fn)

    return make


class _FunctionSkill(Skill):
    def __init__(self, fn: Handler) -> None:
        self.fn = fn

    async def handle(self, message: Message, ctx: Context) -> Reply | list[Reply] | str | None:
        return await self.fn(message, ctx)


@runtime_checkable
class Observer(Protocol):
    """Sees every inbound message after it is logged and before it is routed."""

    name: str

    async def observe(self, message: Message, ctx: Context) -> None: ...


@runtime_checkable
class ReplyFilter(Protocol):
    """Rewrites a reply (return it changed) or withholds it (return ``None``)."""

    name: str

    async def filter(self, reply: Reply, message: Message, ctx: Context) -> Reply | None: ...
