"""Alembic, driven from code: the migrations ship inside the package, no alembic.ini needed.

The conversation store's migrations live beside this module; a plugin with tables of its own
(the knowledge catalogue) passes its own ``location`` and keeps its own version table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

MIGRATIONS = Path(__file__).with_name("migrations")


def alembic_config(connection: Any = None, location: Path = MIGRATIONS) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(location))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head_revision(location: Path = MIGRATIONS) -> str | None:
    return ScriptDirectory.from_config(alembic_config(location=location)).get_current_head()


def current_revision(connection: Any) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


def upgrade_sync(connection: Any, revision: str = "head", location: Path = MIGRATIONS) -> None:
    """Upgrade the schema on a synchronous connection (use via ``AsyncConnection.run_sync``)."""
    command.upgrade(alembic_config(connection, location), revision)
