"""Scenario files: scripted conversations with per-turn expectations, in YAML.

A file holds one scenario, or several as YAML documents separated by ``---``::

    name: a permit question gets a cited answer
    chat: {kind: private, users: [ann]}
    knowledge: [faq.jsonl]            # optional: ingested into the run's own index first
    turns:
      - say: How long does it take to get a building permit?
        expect:
          skill: qa
          contains: weeks
          cites: true
          max_latency_ms: 30000
        rate: good

Validation is strict (unknown keys are errors, since a misspelt expectation would otherwise
silently check nothing) and every error names the file and line, so a broken scenario is fixed
in seconds rather than debugged.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

SUFFIXES = (".yaml", ".yml")
#: The scenarios that ship with chinwag (``examples/scenarios`` in a checkout): its own
#: behaviour as specifications, which `chinwag simulate` runs and the trainers' gate holds
#: every candidate adapter to.
SHIPPED = Path(__file__).parent / "shipped"


class ScenarioError(ValueError):
    """A scenario file that cannot be used; the message starts with ``file:line:``."""

    def __init__(self, path: Path | str, line: int | None, message: str) -> None:
        self.path, self.line = Path(path), line
        where = f"{path}:{line}" if line else str(path)
        super().__init__(f"{where}: {message}")


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


class Expect(BaseModel):
    """What one bot turn must show. Every field is optional; all given ones must hold."""

    model_config = ConfigDict(extra="forbid")

    #: The skill that answers (``qa``, ``dialogue``…); ``none`` for no reply at all.
    skill: str | None = None
    contains: list[str] = []
    not_contains: list[str] = []
    #: A regular expression searched in the reply (``re.search``, case-insensitive).
    matches: str | None = None
    #: ``true``: the reply cites at least one source; a string: a source whose title or
    #: location contains it.
    cites: bool | str | None = None
    abstains: bool | None = None
    #: The sentiment label the bot gave the user's message.
    sentiment: Literal["negative", "neutral", "positive"] | None = None
    max_latency_ms: float | None = Field(None, gt=0)

    _lists = field_validator("contains", "not_contains", mode="before")(_as_list)

    @field_validator("matches")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression: {exc}") from exc
        return value


class Turn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    say: str
    #: Who says it (one of the chat's users); the first user by default.
    user: str | None = None
    expect: Expect = Expect()
    #: A rating given to the bot's reply afterwards, stored like a user's 👍/👎.
    rate: Literal["good", "bad"] | None = None


class ChatSetup(BaseModel):
    model_config = ConfigDict(extra="forbid")

    platform: str = "scenario"
    kind: Literal["private", "group"] = "private"
    title: str = ""
    users: list[str] = Field(default_factory=lambda: ["user"], min_length=1)


class Scenario(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    description: str = ""
    chat: ChatSetup = ChatSetup()
    #: Documents ingested into the run's own knowledge index (paths relative to the file).
    knowledge: list[str] = []
    turns: list[Turn] = Field(min_length=1)
    #: Where it came from (set by the loader).
    path: Path | None = Field(None, exclude=True)
    line: int | None = Field(None, exclude=True)

    _lists = field_validator("knowledge", mode="before")(_as_list)

    @field_validator("turns")
    @classmethod
    def _speakers_exist(cls, turns: list[Turn], info: Any) -> list[Turn]:
        chat = info.data.get("chat")
        users = chat.users if chat else ["user"]
        for i, turn in enumerate(turns):
            if turn.user is not None and turn.user not in users:
                raise ValueError(f"turn {i + 1}: user {turn.user!r} is not one of {users}")
        return turns

    def knowledge_paths(self) -> list[Path]:
        base = self.path.parent if self.path else Path.cwd()
        return [(base / p).resolve() for p in self.knowledge]


def discover(paths: Iterable[Path | str]) -> list[Path]:
    """Scenario files named directly, and every ``.yaml``/``.yml`` under directories, sorted."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found.extend(sorted(f for f in p.rglob("*") if f.suffix in SUFFIXES and f.is_file()))
        elif p.exists():
            found.append(p)
        else:
            raise ScenarioError(p, None, "no such file or directory")
    return found


def load_file(path: Path | str) -> list[Scenario]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ScenarioError(path, None, f"cannot read: {exc}") from exc
    try:
        nodes = [n for n in yaml.compose_all(text, Loader=yaml.SafeLoader) if n is not None]
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        raise ScenarioError(
            path, mark.line + 1 if mark else None, f"not valid YAML: {exc.problem}"
        ) from exc
    scenarios = []
    for node in nodes:
        data = yaml.SafeLoader(text).construct_document(node)
        line = node.start_mark.line + 1
        if not isinstance(data, dict):
            raise ScenarioError(path, line, "a scenario is a mapping with name and turns")
        try:
            scenario = Scenario.model_validate(data)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            raise ScenarioError(
                path, _line_of(node, err["loc"]) or line, f"{where}: {err['msg']}"
            ) from None
        scenario.path, scenario.line = path, line
        scenarios.append(scenario)
    if not scenarios:
        raise ScenarioError(path, None, "no scenario in the file")
    return scenarios


def load(paths: Iterable[Path | str]) -> list[Scenario]:
    scenarios = [s for f in discover(paths) for s in load_file(f)]
    seen: dict[str, Scenario] = {}
    for s in scenarios:
        if s.name in seen:
            first = seen[s.name]
            raise ScenarioError(
                s.path or "?",
                s.line,
                f"duplicate scenario name (first at {first.path}:{first.line})",
            )
        seen[s.name] = s
    return scenarios


def _line_of(node: yaml.Node, loc: tuple[Any, ...]) -> int | None:
    """The line of the YAML node a validation error's location points at (deepest found)."""
    line = None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if key.value == str(part):
                    line, node = key.start_mark.line + 1, value
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            if part >= len(node.value):
                return line
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line
