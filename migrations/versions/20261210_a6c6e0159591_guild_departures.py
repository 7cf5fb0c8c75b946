"""guild departures: when the bot left a guild (its data is deleted after the retention period)

Revision ID: a6c6e0159591
Revises: 7c1e9a4d2b10
Create Date: 2026-12-10 12:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "a6c6e0159591"
down_revision: str | Sequence[str] | None = "7c1e9a4d2b10"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "guild_departures",
        sa.Column("guild_id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("left_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("guild_id", name=op.f("pk_guild_departures")),
    )


def downgrade() -> None:
    op.drop_table("guild_departures")
