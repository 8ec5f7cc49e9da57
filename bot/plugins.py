"""Finding, loading and querying plugins.

Built-in skills and third-party plugins arrive by one path: the ``chinwag`` entry-point group.
``CHINWAG_PLUGINS`` (a comma-separated list of entry-point names; empty means none) restricts
which load — handy in tests and when an incident calls for switching a plugin off without a
redeploy. Each :class:`bot.core.Bot` owns its own manager, so tests can run several bots with
different plugins in one process.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import pluggy

from bot import hookspecs

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "chinwag"
PLUGINS_ENV = "CHINWAG_PLUGINS"


class PluginError(Exception):
    """A plugin could not be loaded or registered something invalid."""


@dataclass(frozen=True, slots=True)
class PluginInfo:
    name: str
    module: str
    distribution: str | None
    version: str | None


@dataclass(slots=True)
class Registered:
    """An object a plugin registered, with the plugin it came from."""

    obj: Any
    plugin: str


def allowed_plugins(env: dict[str, str] | None = None) -> set[str] | None:
    """The entry-point names ``CHINWAG_PLUGINS`` allows, or ``None`` when unrestricted."""
    value = (env if env is not None else os.environ).get(PLUGINS_ENV)
    if value is None:
        return None
    return {name.strip() for name in value.split(",") if name.strip()}


def make_manager(
    *,
    load_entry_points: bool = True,
    disabled: Iterable[str] = (),
    extra: Iterable[Any] = (),
) -> tuple[pluggy.PluginManager, list[PluginInfo]]:
    """Build a plugin manager with the entry-point plugins plus ``extra`` plugin objects."""
    pm = pluggy.PluginManager("chinwag")
    pm.add_hookspecs(hookspecs)
    infos: list[PluginInfo] = []
    if load_entry_points:
        allowed = allowed_plugins()
        skip = set(disabled)
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if (allowed is not None and ep.name not in allowed) or ep.name in skip:
                continue
            if pm.has_plugin(ep.name):
                continue
            try:
                plugin = ep.load()
            except Exception as exc:  # a broken third-party plugin must not take the bot down
                log.exception("plugin %r (%s) failed to import; skipped", ep.name, ep.value)
                raise PluginError(
                    f"plugin {ep.name!r} ({ep.value}) failed to import: {exc}"
                ) from exc
            pm.register(plugin, name=ep.name)
            dist = getattr(ep, "dist", None)
            infos.append(
                PluginInfo(
                    ep.name,
                    ep.value,
                    dist.metadata["Name"] if dist else None,
                    dist.version if dist else None,
                )
            )
    for i, plugin in enumerate(extra):
        if pm.is_registered(plugin):
            # An installed plugin's own tests pass its module too (docs/plugins.md): it is
            # already loaded from its entry point, under that name.
            continue
        name = getattr(plugin, "__name__", None) or f"{type(plugin).__name__}-{i}"
        pm.register(plugin, name=name)
        infos.append(PluginInfo(name, name, None, None))
    return pm, infos


def collect(pm: pluggy.PluginManager, hook_name: str) -> list[Registered]:
    """Call one ``register_*`` hook on every plugin, remembering which plugin registered what."""
    caller = getattr(pm.hook, hook_name)
    found: list[Registered] = []
    # Reverse pluggy's LIFO call order so objects appear in plugin load order.
    for impl in reversed(caller.get_hookimpls()):
        plugin_name = impl.plugin_name

        def register(obj: Any, _plugin: str = plugin_name) -> None:
            found.append(Registered(obj, _plugin))

        impl.function(register)
    return found


def call_lifecycle(pm: pluggy.PluginManager, hook_name: str, **kwargs: Any) -> list[Any]:
    """Call a lifecycle hook; the caller awaits whichever results are awaitable."""
    hook: Callable[..., list[Any]] = getattr(pm.hook, hook_name)
    return [r for r in hook(**kwargs) if r is not None]
