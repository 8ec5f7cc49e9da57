"""Alembic environment of the knowledge catalogue: runs on a connection handed in by
:mod:`knowledge.catalogue` (no alembic.ini; the catalogue migrates itself when opened)."""

from __future__ import annotations

from alembic import context

from knowledge.catalogue import _meta

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - we always pass a connection
    raise RuntimeError("the knowledge catalogue migrates itself when opened")

context.configure(connection=connection, target_metadata=_meta, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
