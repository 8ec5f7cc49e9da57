"""chinwag's pytest plugin entry point, under a module name no project of an operator shadows.

The plugin itself is ``bot.testing``. Loading it through ``bot`` directly breaks when the
project under test has its own ``bot.py`` or ``bot/`` on ``sys.path`` (``python -m pytest``
puts the current directory there): Python then finds that one, and the failure read "No module
named 'bot.testing'; 'bot' is not a package". Here the shadowing is detected and explained.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_OURS = Path(__file__).resolve().parent / "bot"


def _shadowing_bot() -> str | None:
    """Where the ``bot`` that would be imported lives, when it is not chinwag's."""
    try:
        spec = importlib.util.find_spec("bot")
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    locations = list(spec.submodule_search_locations or [])
    if any(Path(p).resolve() == _OURS for p in locations):
        return None
    return spec.origin or (locations[0] if locations else "an unknown location")


_shadow = _shadowing_bot()
if _shadow is not None:
    raise pytest.UsageError(
        f"chinwag's pytest plugin cannot load: {_shadow} shadows chinwag's own 'bot' package "
        f"({_OURS}). Rename your module (e.g. mybot.py), or run the `pytest` command instead "
        "of `python -m pytest` (which puts the current directory first on sys.path)."
    )

pytest_plugins = ["bot.testing"]
