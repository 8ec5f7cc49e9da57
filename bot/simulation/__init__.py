"""Simulated conversations: scenario files, simulated users, and running them through the core.

The same machinery serves ``chinwag simulate``, the pytest plugin's scenario items, the
evaluation suite and the trainers' regression set.
"""

from bot.simulation.chat import ChatUser
from bot.simulation.runner import ScenarioResult, run_all, run_scenario, simulate, summary_line
from bot.simulation.scenarios import Scenario, ScenarioError, load

__all__ = [
    "ChatUser",
    "Scenario",
    "ScenarioError",
    "ScenarioResult",
    "load",
    "run_all",
    "run_scenario",
    "simulate",
    "summary_line",
]
