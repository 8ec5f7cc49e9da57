"""Tables of the conversation store (SQLAlchemy Core).

Messages carry the platform's chat and user ids directly rather than foreign keys into ``users``
and ``chats``: the hot path writes one row per message with no lookups, and the user/chat tables
are upserted only when a new user or chat appears. Alembic migrations in ``migrations/`` are the
authority on the schema; this module must match the latest one (a test checks).
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

users = sa.Table(
    "users",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("platform", sa.String(32), nullable=False),
    sa.Column("platform_user_id", sa.String(128), nullable=False),
    sa.Column("display_name", sa.String(256), nullable=False, server_default=""),
    sa.Column("first_seen", sa.DateTime(timezone=True), nullable=False),
    sa.UniqueConstraint("platform", "platform_user_id", name="uq_users_platform_user"),
)

chats = sa.Table(
    "chats",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("platform", sa.String(32), nullable=False),
    sa.Column("platform_chat_id", sa.String(128), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False, server_default="private"),
    sa.Column("title", sa.String(256), nullable=False, server_default=""),
    sa.Column("settings", sa.JSON(), nullable=True),
    sa.Column("first_seen", sa.DateTime(timezone=True), nullable=False),
    sa.UniqueConstraint("platform", "platform_chat_id", name="uq_chats_platform_chat"),
)

messages = sa.Table(
    "messages",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("direction", sa.String(3), nullable=False),  # "in" | "out"
    sa.Column("platform", sa.String(32), nullable=False),
    sa.Column("chat_id", sa.String(128), nullable=False),
    sa.Column("user_id", sa.String(128), nullable=True),
    sa.Column("platform_message_id", sa.String(128), nullable=True),
    sa.Column("dedup_key", sa.String(320), nullable=True),
    sa.Column("reply_to_id", BigId, nullable=True),
    sa.Column("text", sa.Text(), nullable=False),
    sa.Column("original_length", sa.Integer(), nullable=True),
    sa.Column("kind", sa.String(16), nullable=True),
    sa.Column("skill", sa.String(64), nullable=True),
    sa.Column("latency_ms", sa.Float(), nullable=True),
    sa.Column("model", sa.String(256), nullable=True),
    sa.Column("adapter", sa.String(128), nullable=True),
    sa.Column("adapter_version", sa.String(64), nullable=True),
    sa.Column("meta", sa.JSON(), nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.UniqueConstraint("dedup_key", name="uq_messages_dedup_key"),
    # Every index costs a page write per commit on the hot path, so there are only two: the
    # redelivery check and "last turns of this chat". Time windows use the primary key (ids
    # are time-ordered, see ids.py); the rare per-user deletion of /forget scans.
    sa.Index("ix_messages_chat", "platform", "chat_id", "id"),
)

feedback = sa.Table(
    "feedback",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("message_id", BigId, nullable=False),
    sa.Column("platform", sa.String(32), nullable=False),
    sa.Column("user_id", sa.String(128), nullable=False),
    sa.Column("rating", sa.SmallInteger(), nullable=False),  # -1 | 0 | +1
    sa.Column("correction", sa.Text(), nullable=True),
    sa.Column("source", sa.String(32), nullable=False, server_default="user"),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Index("ix_feedback_message", "message_id"),
    sa.Index("ix_feedback_user", "platform", "user_id"),
)

forget_requests = sa.Table(
    "forget_requests",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("platform", sa.String(32), nullable=False),
    sa.Column("user_id", sa.String(128), nullable=False),
    sa.Column("requested_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("messages_deleted", sa.Integer(), nullable=False, server_default="0"),
    sa.Column("feedback_deleted", sa.Integer(), nullable=False, server_default="0"),
    sa.Index("ix_forget_user", "platform", "user_id"),
)
