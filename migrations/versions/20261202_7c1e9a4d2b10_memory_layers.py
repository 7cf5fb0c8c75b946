"""memory layers: author's note, lore state, pinned facts, turn embeddings (pgvector), lorebooks

Revision ID: 7c1e9a4d2b10
Revises: 606f4ae3e2c8
Create Date: 2026-12-02 16:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from bot.store.models import HNSW_DIM, EmbeddingVector

revision: str = "7c1e9a4d2b10"
down_revision: str | Sequence[str] | None = "606f4ae3e2c8"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PGVECTOR_MISSING = (
    "This PostgreSQL server has no pgvector extension, which Masque's recall needs. Install it "
    "(Debian/Ubuntu: postgresql-NN-pgvector; Docker: the pgvector/pgvector image) and start Masque again."
)


def _postgres() -> bool:
    return op.get_bind().dialect.name == "postgresql"


def upgrade() -> None:
    if _postgres():
        bind = op.get_bind()
        if not bind.execute(sa.text("SELECT 1 FROM pg_available_extensions WHERE name = 'vector'")).first():
            raise RuntimeError(PGVECTOR_MISSING)
        op.execute("CREATE EXTENSION IF NOT EXISTS vector")
    with op.batch_alter_table("stories", schema=None) as batch_op:
        batch_op.add_column(sa.Column("author_note", sa.Text(), server_default="", nullable=False))
        batch_op.add_column(sa.Column("author_note_depth", sa.Integer(), server_default="4", nullable=False))
        batch_op.add_column(sa.Column("lore_state", sa.JSON(), server_default="{}", nullable=False))

    op.create_table(
        "pinned_facts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("story_id", sa.Integer(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("author_id", sa.BigInteger(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["story_id"], ["stories.id"], name=op.f("fk_pinned_facts_story_id_stories"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_pinned_facts")),
    )
    with op.batch_alter_table("pinned_facts", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_pinned_facts_story_id"), ["story_id"], unique=False)

    op.create_table(
        "turn_embeddings",
        sa.Column("turn_id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("story_id", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("model", sa.String(length=100), nullable=False),
        sa.Column("dim", sa.Integer(), nullable=False),
        sa.Column("embedding", EmbeddingVector(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["story_id"], ["stories.id"], name=op.f("fk_turn_embeddings_story_id_stories"),
                                ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["turn_id"], ["turns.id"], name=op.f("fk_turn_embeddings_turn_id_turns"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("turn_id", name=op.f("pk_turn_embeddings")),
    )
    with op.batch_alter_table("turn_embeddings", schema=None) as batch_op:
        batch_op.create_index("ix_turn_embeddings_story_position", ["story_id", "position"], unique=False)
    if _postgres():
        # The column takes vectors of any size (any embedding model); the HNSW index covers the
        # offline model's size, as an expression index on that cast (recall queries use the same cast).
        op.execute(f"CREATE INDEX ix_turn_embeddings_hnsw ON turn_embeddings USING hnsw "
                   f"((embedding::vector({HNSW_DIM})) vector_cosine_ops) WHERE dim = {HNSW_DIM}")

    op.create_table(
        "lorebooks",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("guild_id", sa.BigInteger(), nullable=False),
        sa.Column("story_id", sa.Integer(), nullable=True),
        sa.Column("scope_key", sa.BigInteger(), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("name_key", sa.String(length=100), nullable=False),
        sa.Column("book", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["story_id"], ["stories.id"], name=op.f("fk_lorebooks_story_id_stories"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_lorebooks")),
        sa.UniqueConstraint("guild_id", "scope_key", "name_key", name="uq_lorebooks_scope_name"),
    )
    with op.batch_alter_table("lorebooks", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_lorebooks_guild_id"), ["guild_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_lorebooks_story_id"), ["story_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("lorebooks", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_lorebooks_story_id"))
        batch_op.drop_index(batch_op.f("ix_lorebooks_guild_id"))
    op.drop_table("lorebooks")
    if _postgres():
        op.execute("DROP INDEX IF EXISTS ix_turn_embeddings_hnsw")
    with op.batch_alter_table("turn_embeddings", schema=None) as batch_op:
        batch_op.drop_index("ix_turn_embeddings_story_position")
    op.drop_table("turn_embeddings")
    with op.batch_alter_table("pinned_facts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_pinned_facts_story_id"))
    op.drop_table("pinned_facts")
    with op.batch_alter_table("stories", schema=None) as batch_op:
        batch_op.drop_column("lore_state")
        batch_op.drop_column("author_note_depth")
        batch_op.drop_column("author_note")
