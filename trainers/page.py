"""The HTML page every report renders (evaluation, training cycle, benchmarks): one Jinja2
template with autoescaping, so a question, a reply or a file name that contains markup is shown
as text, never run — reports carry what users typed.

A page is a list of sections, each a list of blocks; the code that measures builds the blocks
(figures, plots, tables) and never writes markup itself.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import jinja2


@dataclass(frozen=True, slots=True)
class Cell:
    """One table cell: numbers are shown to three decimals, ``None`` as a dash."""

    value: Any
    #: ``better`` / ``worse`` colour a change.
    cls: str | None = None

    @property
    def text(self) -> str:
        return fmt(self.value)


@dataclass(slots=True)
class Table:
    headers: list[str]
    rows: list[list[Cell]]
    title: str | None = None
    kind: str = "table"


@dataclass(frozen=True, slots=True)
class Image:
    """A plot embedded as a PNG data URI: the page opens anywhere, offline, as one file."""

    alt: str
    src: str
    kind: str = "image"


@dataclass(frozen=True, slots=True)
class Text:
    text: str
    muted: bool = False
    kind: str = "text"


@dataclass(slots=True)
class Items:
    """A list of ``(name, detail)`` pairs (failed scenarios, skipped files)."""

    items: list[tuple[str, str]]
    title: str | None = None
    kind: str = "items"


@dataclass(slots=True)
class Exchanges:
    """Sample conversation turns: what the user said, what the bot answered."""

    pairs: list[tuple[str, str]]
    title: str | None = "Samples"
    kind: str = "exchanges"


@dataclass(slots=True)
class Section:
    title: str
    blocks: list[Any] = field(default_factory=list)
    anchor: str | None = None


def fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def table(headers: list[str], rows: list[list[Any]], title: str | None = None) -> Table:
    """A table from plain values (or :class:`Cell` where a cell needs a colour)."""
    return Table(headers, [[c if isinstance(c, Cell) else Cell(c) for c in r] for r in rows], title)


def figure_table(rows: list[tuple[str, Any]]) -> Table:
    return table(["figure", "value"], [list(r) for r in rows])


def plt() -> Any:
    """matplotlib with its non-interactive backend (no display on servers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    return pyplot


def image(fig: Any, alt: str) -> Image:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt().close(fig)
    return Image(alt, "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())


@cache
def _template() -> jinja2.Template:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("trainers", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    return env.get_template("report.html.j2")


def render(title: str, sections: list[Section], subtitle: str = "") -> str:
    return _template().render(title=title, subtitle=subtitle, sections=sections)
