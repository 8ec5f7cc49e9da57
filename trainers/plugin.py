"""The trainers as a chinwag plugin: ``chinwag eval …``, ``chinwag train``, ``chinwag adapters …``
(one module per command group: cli_eval.py, cli_train.py, cli_adapters.py), the nightly
schedule as a service ``chinwag run`` keeps beside the bot, and the ``[trainers]`` section
(a broken one stops the bot at start).
"""

from __future__ import annotations

from typing import Any

import typer

from bot import hookimpl
from trainers.cli_adapters import adapters_app
from trainers.cli_eval import eval_app
from trainers.cli_train import cycle_config, train

__all__ = ["cycle_config", "register_commands", "register_config", "register_services"]


@hookimpl
def register_commands(cli: typer.Typer) -> None:
    cli.add_typer(eval_app, name="eval")
    cli.add_typer(adapters_app, name="adapters")
    cli.command("train")(train)


@hookimpl
def register_config(register: Any) -> None:
    """``[trainers]`` (and ``[trainers.lora]``): a broken one stops the bot at start, not at
    3 am."""
    from trainers.cycle import CycleConfig

    register("trainers", CycleConfig)


@hookimpl
def register_services(register: Any, settings: Any) -> None:
    """The nightly schedule runs as ``chinwag train`` beside ``chinwag run`` (its own process:
    training never shares the bot's event loop, memory or fate)."""
    if cycle_config(settings).schedule:
        register("train", "training schedule")
