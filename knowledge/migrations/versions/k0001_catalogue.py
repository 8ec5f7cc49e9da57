"""The catalogue: files, chunks (text, heading trail, embeddings), state, and the FTS5 table.

Catalogues written before migrations existed (``create_all``) are brought to this revision
as they are: each table is created only when missing, and the column later added to one
(``chunks.question_embedding``) is added where it is missing.

Revision ID: k0001
Revises:
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "k0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    tables = set(inspector.get_table_names())
    if "files" not in tables:
        op.create_table(
            "files",
            sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("source", sa.Text, nullable=False, unique=True),
            sa.Column("checksum", sa.String(64), nullable=False),
            sa.Column("size", sa.Integer, nullable=False),
            sa.Column("chunks", sa.Integer, nullable=False),
            sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        )
    if "chunks" not in tables:
        op.create_table(
            "chunks",
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
            sa.Column("file_id", sa.Integer, nullable=False, index=True),
            sa.Column("source", sa.Text, nullable=False),
            sa.Column("position", sa.Integer, nullable=False),
            sa.Column("headings", sa.JSON, nullable=False),
            sa.Column("text", sa.Text, nullable=False),
            sa.Column("checksum", sa.String(64), nullable=False),
            sa.Column("meta", sa.JSON, nullable=True),
            sa.Column("embedding", sa.LargeBinary, nullable=False),
            sa.Column("question_embedding", sa.LargeBinary, nullable=True),
        )
    elif "question_embedding" not in {c["name"] for c in inspector.get_columns("chunks")}:
        op.add_column("chunks", sa.Column("question_embedding", sa.LargeBinary, nullable=True))
    if "state" not in tables:
        op.create_table(
            "state",
            sa.Column("key", sa.String(64), primary_key=True),
            sa.Column("value", sa.Text, nullable=False),
        )
    # BM25 beside the vectors; an older catalogue's chunks are indexed on first open
    # (state "lexical"), outside the migration, with progress in the log.
    op.execute(
        "CREATE VIRTUAL TABLE IF NOT EXISTS chunks_fts USING fts5("
        "headings, text, tokenize = 'porter unicode61 remove_diacritics 2')"
    )


def downgrade() -> None:
    op.execute("DROP TABLE IF EXISTS chunks_fts")
    for table in ("state", "chunks", "files"):
        op.drop_table(table)
