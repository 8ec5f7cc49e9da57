"""chinwag's core: what plugins and adapters build on.

Plugins import from here only (``from bot import Skill, Reply, hookimpl``); everything else in
``bot`` is internal and may change between releases.
"""

from bot.hookspecs import hookimpl
from bot.messages import Attachment, Escalation, Message, Reply, Source
from bot.models.types import ModelError, RuntimeBusy, ShuttingDown
from bot.services import BotServices
from bot.skill import Command, Context, Match, Observer, ReplyFilter, Skill, command

__all__ = [
    "Attachment",
    "BotServices",
    "Command",
    "Context",
    "Escalation",
    "Match",
    "Message",
    "ModelError",
    "Observer",
    "Reply",
    "ReplyFilter",
    "RuntimeBusy",
    "ShuttingDown",
    "Skill",
    "Source",
    "command",
    "hookimpl",
]
__version__ = "0.1.0"
