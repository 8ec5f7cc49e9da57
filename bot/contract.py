"""What a registered skill, observer or reply filter must look like — checked at start-up.

A plugin that registers an object without ``handle`` (or with ``observe`` misspelled) would
otherwise pass the start and then turn every message into an apology or a traceback in the
log. Here each object is checked once, when the bot loads it, and a broken one stops the start
with an error naming the plugin, the object and what is wrong. Optional members (``score``,
``setup``) may be missing: a skill without ``score`` answers its commands only.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

from pydantic import BaseModel

from bot.config import ConfigError

#: A skill's name is also its ``[skills.<name>]`` section and its label in metrics.
NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")


def _what(obj: Any, plugin: str, kind: str) -> str:
    name = getattr(obj, "name", None)
    label = f"{kind} {name!r}" if isinstance(name, str) and name else f"a {kind}"
    return f"plugin {plugin!r} registered {label} ({type(obj).__name__})"


def _check_method(obj: Any, method: str, args: int, where: str, *, required: bool) -> None:
    fn = getattr(obj, method, None)
    if fn is None:
        if required:
            raise ConfigError(f"{where} without a {method}() method")
        return
    if not callable(fn):
        raise ConfigError(f"{where}: {method} is not a method")
    # Decorated methods count by what they wrap (functools.wraps keeps ``__wrapped__``).
    if not (inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(inspect.unwrap(fn))):
        raise ConfigError(f"{where}: {method}() must be async (async def {method}(...))")
    try:
        inspect.signature(fn).bind(*([None] * args))
    except TypeError:
        expected = {0: "()", 2: "(message, ctx) / (chat_id, reply)", 3: "(reply, message, ctx)"}[
            args
        ]
        raise ConfigError(f"{where}: {method}() must accept {expected}") from None
    except ValueError:  # no signature to inspect (a builtin): trust it
        pass


def _check_name(obj: Any, where: str, *, required: bool) -> None:
    name = getattr(obj, "name", None)
    if name is None or name == "":
        if required:
            raise ConfigError(f"{where} without a name")
        return
    if not isinstance(name, str) or not NAME.match(name):
        raise ConfigError(
            f"{where}: name {name!r} must start with a letter and use only letters, digits, "
            "'_', '-' or '.' (it is also the [skills.<name>] section)"
        )


def check_skill(obj: Any, plugin: str) -> None:
    where = _what(obj, plugin, "skill")
    _check_name(obj, where, required=True)
    _check_method(obj, "handle", 2, where, required=True)
    _check_method(obj, "score", 2, where, required=False)
    model = getattr(obj, "config_model", None)
    if model is not None and not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise ConfigError(f"{where}: config_model must be a pydantic model class")
    threshold = getattr(obj, "threshold", 0.5)
    if not isinstance(threshold, int | float) or isinstance(threshold, bool):
        raise ConfigError(f"{where}: threshold must be a number, not {threshold!r}")


def check_observer(obj: Any, plugin: str) -> None:
    where = _what(obj, plugin, "observer")
    _check_name(obj, where, required=False)
    _check_method(obj, "observe", 2, where, required=True)


def check_filter(obj: Any, plugin: str) -> None:
    where = _what(obj, plugin, "reply filter")
    _check_name(obj, where, required=False)
    _check_method(obj, "filter", 3, where, required=True)


def check_adapter(obj: Any, plugin: str) -> None:
    """An adapter needs a ``platform`` name and async ``start()``, ``stop()`` and
    ``push(chat_id, reply)`` (bot/adapters/base.py)."""
    where = _what(obj, plugin, "adapter")
    platform = getattr(obj, "platform", None)
    if not isinstance(platform, str) or not NAME.match(platform):
        raise ConfigError(f"{where}: platform must be a name like 'telegram', not {platform!r}")
    _check_method(obj, "start", 0, where, required=True)
    _check_method(obj, "stop", 0, where, required=True)
    _check_method(obj, "push", 2, where, required=True)


def unknown_keys(model: type[BaseModel], options: dict[str, Any]) -> list[str]:
    """Keys a ``config_model`` would silently drop: unknown ones, unless the model says
    ``extra="allow"`` (or ``"forbid"``, when pydantic reports them itself)."""
    if model.model_config.get("extra") in ("allow", "forbid"):
        return []
    known = set(model.model_fields)
    known |= {f.alias for f in model.model_fields.values() if f.alias}
    return [k for k in options if k not in known]
