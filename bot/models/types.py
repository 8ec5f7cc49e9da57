"""What the model runtime takes and gives back, whichever backend serves it."""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Literal

#: Chat messages in the chat-template sense:
#: ``{"role": "system"|"user"|"assistant", "content": str}``.
ChatMessages = list[dict[str, str]]


#: The ``time.monotonic()`` instant by which the current message's skill must be done; the core
#: sets it around each skill call and the runtime refuses or cuts work that would end later.
DEADLINE: ContextVar[float | None] = ContextVar("chinwag_deadline", default=None)


#: Set (``threading.Event``) when the user who sent the current message has sent a newer one:
#: the local backend then ends the reply with what it has (``finish_reason="superseded"``)
#: or, not yet started, refuses it with :class:`Superseded` — nobody waits for it any more.
SUPERSEDED: ContextVar[Any] = ContextVar("chinwag_superseded", default=None)


class ModelError(Exception):
    """A request failed in the model (out of memory, bad input, server error); others go on."""


class RuntimeBusy(ModelError):
    """The model cannot answer in time: answer "busy" now rather than make the user wait.

    ``retry_after_s`` is the runtime's estimate of when a new request would start.
    """

    def __init__(self, message: str, *, retry_after_s: float = 5.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Superseded(ModelError):
    """The user sent a newer message before this reply started; it was dropped for that one."""


class ShuttingDown(ModelError):
    """The bot is stopping: model work in flight was cancelled."""


class UnknownAdapter(ModelError):
    """No adapter by that name is loaded."""


@dataclass(slots=True)
class GenerationParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 → greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()

    @property
    def sampling_key(self) -> tuple[bool, float, float]:
        """Requests with the same key can share one ``generate`` call."""
        greedy = self.temperature <= 0
        return (greedy, 0.0 if greedy else self.temperature, 1.0 if greedy else self.top_p)


@dataclass(slots=True)
class Generation:
    """One generated reply and where it came from (logged with the bot's reply)."""

    text: str
    model: str
    adapter: str | None
    adapter_version: str | None
    prompt_tokens: int
    completion_tokens: int
    #: ``deadline``: cut off at the request's deadline (the text is what was ready by then).
    finish_reason: Literal["stop", "length", "deadline"]
    #: Oldest turns dropped to fit the context window (never the system prompt or the last turn).
    trimmed_turns: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True, frozen=True)
class Likelihood:
    """How likely the model finds a text after a prompt: ``logprob`` summed over its
    ``tokens``. Compared between prompts for the same text, it says which prompt the text
    follows from best (skills/qa.py re-ranks passages by it)."""

    logprob: float
    tokens: int

    @property
    def per_token(self) -> float:
        return self.logprob / max(1, self.tokens)
