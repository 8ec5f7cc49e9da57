"""Initial schema: users, chats, messages, feedback, forget requests.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("platform", sa.String(32), nullable=False),
        sa.Column("platform_user_id", sa.String(128), nullable=False),
        sa.Column("display_name", sa.String(256), nullable=False, server_default=""),
        sa.Column("first_seen", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("platform", "platform_user_id", name="uq_users_platform_user"),
    )
    op.create_table(
        "chats",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("platform", sa.String(32), nullable=False),
        sa.Column("platform_chat_id", sa.String(128), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False, server_default="private"),
        sa.Column("title", sa.String(256), nullable=False, server_default=""),
        sa.Column("settings", sa.JSON(), nullable=True),
        sa.Column("first_seen", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("platform", "platform_chat_id", name="uq_chats_platform_chat"),
    )
    op.create_table(
        "messages",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("direction", sa.String(3), nullable=False),
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
    )
    op.create_index("ix_messages_chat", "messages", ["platform", "chat_id", "id"])
    op.create_table(
        "feedback",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("message_id", BigId, nullable=False),
        sa.Column("platform", sa.String(32), nullable=False),
        sa.Column("user_id", sa.String(128), nullable=False),
        sa.Column("rating", sa.SmallInteger(), nullable=False),
        sa.Column("correction", sa.Text(), nullable=True),
        sa.Column("source", sa.String(32), nullable=False, server_default="user"),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_feedback_message", "feedback", ["message_id"])
    op.create_index("ix_feedback_user", "feedback", ["platform", "user_id"])
    op.create_table(
        "forget_requests",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("platform", sa.String(32), nullable=False),
        sa.Column("user_id", sa.String(128), nullable=False),
        sa.Column("requested_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("messages_deleted", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("feedback_deleted", sa.Integer(), nullable=False, server_default="0"),
    )
    op.create_index("ix_forget_user", "forget_requests", ["platform", "user_id"])


def downgrade() -> None:
    op.drop_table("forget_requests")
    op.drop_table("feedback")
    op.drop_table("messages")
    op.drop_table("chats")
    op.drop_table("users")
