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
from dataclasses import dataclass, field
from typing import Any

import pluggy
from pydantic import BaseModel, ValidationError

from bot import hookspecs
from bot.config import ConfigError, Settings, format_validation_error
from bot.contract import check_filter, check_observer, check_skill, unknown_keys
from bot.router import Router, SkillEntry
from bot.skill import Command

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


def collect(pm: pluggy.PluginManager, hook_name: str, **kwargs: Any) -> list[Registered]:
    """Call one ``register_*`` hook on every plugin, remembering which plugin registered what.

    ``kwargs`` are the hook's other arguments (``register_adapters`` gets the bot)."""
    caller = getattr(pm.hook, hook_name)
    found: list[Registered] = []
    # Reverse pluggy's LIFO call order so objects appear in plugin load order.
    for impl in reversed(caller.get_hookimpls()):
        plugin_name = impl.plugin_name

        def register(obj: Any, _plugin: str = plugin_name) -> None:
            found.append(Registered(obj, _plugin))

        impl.function(register, **{k: v for k, v in kwargs.items() if k in impl.argnames})
    return found


def call_lifecycle(pm: pluggy.PluginManager, hook_name: str, **kwargs: Any) -> list[Any]:
    """Call a lifecycle hook; the caller awaits whichever results are awaitable."""
    hook: Callable[..., list[Any]] = getattr(pm.hook, hook_name)
    return [r for r in hook(**kwargs) if r is not None]


@dataclass(slots=True)
class Loaded:
    """What the plugins registered, checked and configured: the pipeline's moving parts."""

    skills: list[SkillEntry]
    router: Router
    observers: list[Registered]
    filters: list[Registered]
    #: The plugins' own top-level sections (``register_config``), validated.
    sections: dict[str, BaseModel] = field(default_factory=dict)


def load_skills(pm: pluggy.PluginManager, settings: Settings) -> Loaded:
    """Collect skills, observers and filters; check each against the contract and validate
    each skill's ``[skills.<name>]`` section with its ``config_model``.

    Everything wrong is reported here, at start, naming the plugin — not as a traceback on
    the first message that reaches it.
    """
    entries: list[SkillEntry] = []
    seen: set[str] = set()
    problems: list[str] = []  # every configuration mistake at once, not one per restart
    sections: dict[str, BaseModel] = {}
    try:
        sections = plugin_sections(pm, settings)
    except ConfigError as exc:
        problems.append(str(exc))
    for reg in collect(pm, "register_skills"):
        skill = reg.obj
        check_skill(skill, reg.plugin)
        name = skill.name
        if name in seen:
            raise ConfigError(f"two plugins register a skill named {name!r}")
        seen.add(name)
        section = settings.skills.get(name)
        try:
            config = skill_config(skill, name, section)
        except ConfigError as exc:
            problems.append(str(exc))
            continue
        commands: dict[str, Command] = {}
        for cmd in getattr(skill, "commands", ()) or ():
            if isinstance(cmd, str):
                cmd = Command(cmd)
            commands[cmd.name.lower()] = cmd
        entries.append(
            SkillEntry(
                skill=skill,
                name=name,
                plugin=reg.plugin,
                description=getattr(skill, "description", "") or "",
                commands=commands,
                priority=section.priority
                if section and section.priority is not None
                else getattr(skill, "priority", 0),
                threshold=section.threshold
                if section and section.threshold is not None
                else getattr(skill, "threshold", 0.5),
                timeout_s=(section.timeout_s if section and section.timeout_s else None)
                or getattr(skill, "timeout_s", None)
                or settings.bot.skill_timeout_s,
                config=config,
                enabled=section.enabled if section else True,
                uses_model=bool(getattr(skill, "uses_model", False)),
            )
        )
    if problems:
        raise ConfigError("\n".join(problems))
    router = Router([e for e in entries if e.enabled], settings.bot.fallback)
    if settings.bot.fallback and router.fallback is None:
        log.warning("fallback skill %r is not loaded", settings.bot.fallback)
    observers = collect(pm, "register_observers")
    filters = collect(pm, "register_reply_filters")
    for r in observers:
        check_observer(r.obj, r.plugin)
    for r in filters:
        check_filter(r.obj, r.plugin)
    # Observers and filters may read a [skills.<their name>] section too (e.g. safety).
    seen.update(getattr(r.obj, "name", "") for r in (*observers, *filters))
    for name in settings.skills:
        if name not in seen:
            log.warning("configuration has a [skills.%s] section but no such skill loaded", name)
    return Loaded(entries, router, observers, filters, sections)


def plugin_sections(pm: pluggy.PluginManager, settings: Settings) -> dict[str, BaseModel]:
    """Every top-level section a plugin declares (``register_config``), validated; a section
    no loaded plugin declares is logged (``chinwag config`` shows it too).

    Raises :class:`ConfigError` listing every mistake in every section.
    """
    models: dict[str, tuple[type[BaseModel], str]] = {}
    for impl in reversed(pm.hook.register_config.get_hookimpls()):

        def register(name: str, model: type[BaseModel], _plugin: str = impl.plugin_name) -> None:
            if name in Settings.model_fields or name in models:
                owner = "the core" if name in Settings.model_fields else models[name][1]
                raise PluginError(
                    f"plugin {_plugin!r} declares the [{name}] section, which {owner} owns"
                )
            if not (isinstance(model, type) and issubclass(model, BaseModel)):
                raise PluginError(
                    f"plugin {_plugin!r}: the model for [{name}] must be a pydantic BaseModel"
                )
            models[name] = (model, _plugin)

        impl.function(register)
    problems: list[str] = []
    found: dict[str, BaseModel] = {}
    for name, (model, _plugin) in models.items():
        try:
            found[name] = validate_section(model, settings.sections.get(name) or {}, name)
        except ConfigError as exc:
            problems.append(str(exc))
    for name in settings.sections:
        if name not in models:
            # A warning, as for a [skills.x] with no such skill: the plugin may be disabled
            # here (or it is a typo: ``chinwag config`` shows it as written).
            log.warning("configuration has a [%s] section but no loaded plugin declares it", name)
    if problems:
        raise ConfigError("\n".join(problems))
    return found


def skill_config(skill: Any, name: str, section: Any) -> Any:
    """The skill's validated configuration; unknown keys are an error whatever the model says."""
    model = getattr(skill, "config_model", None)
    options = section.options() if section is not None else {}
    if model is None:
        if options:
            keys = ", ".join(f"skills.{name}.{k}" for k in options)
            raise ConfigError(f"invalid configuration:\n  {keys}: unknown key")
        return None
    return validate_section(model, options, f"skills.{name}")


def validate_section(model: type[BaseModel], data: dict[str, Any], prefix: str) -> Any:
    """``data`` validated by ``model``, or :class:`ConfigError` listing every mistake: bad
    values, missing keys, and unknown keys whatever the model's own ``extra`` setting (a typo
    must not pass silently)."""
    unknown = unknown_keys(model, data)
    lines = [f"  {prefix}.{k}: unknown key" for k in unknown]
    try:
        value = model.model_validate({k: v for k, v in data.items() if k not in unknown})
    except ValidationError as exc:
        lines += format_validation_error(exc, f"[{prefix}]", prefix=prefix).splitlines()[1:]
    if lines:
        raise ConfigError("\n".join([f"invalid configuration in [{prefix}]:", *lines]))
    return value
