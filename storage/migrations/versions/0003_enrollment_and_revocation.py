"""Enrollment tokens, and devices the operator revoked.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 10:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UTC_DATETIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "enrollment_tokens",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("label", sa.String(length=128), nullable=True),
        sa.Column("uses", sa.Integer(), nullable=False),
        sa.Column("uses_left", sa.Integer(), nullable=False),
        sa.Column("created_at", UTC_DATETIME, nullable=False),
        sa.Column("expires_at", UTC_DATETIME, nullable=True),
        sa.Column("revoked_at", UTC_DATETIME, nullable=True),
        sa.CheckConstraint("uses_left >= 0 AND uses_left <= uses", name=op.f("ck_enrollment_tokens_uses_left")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_enrollment_tokens")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_enrollment_tokens_token_hash")),
    )
    # A plain ADD COLUMN on both backends. Anything more on SQLite would copy the devices
    # table, which jobs refer to, and SQLite refuses to drop a referenced table mid-migration.
    op.add_column("devices", sa.Column("revoked_at", UTC_DATETIME, nullable=True))


def downgrade() -> None:
    # Native DROP COLUMN (SQLite 3.35 and later), for the same reason.
    op.drop_column("devices", "revoked_at")
    op.drop_table("enrollment_tokens")
