"""Migration jobs name the backbone version they move a device to.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29 16:10:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("target_backbone_version_id", sa.Integer(), nullable=True))
        batch.create_foreign_key(
            op.f("fk_jobs_target_backbone_version_id_backbone_versions"),
            "backbone_versions",
            ["target_backbone_version_id"],
            ["id"],
        )
        batch.create_index(op.f("ix_jobs_target_backbone_version_id"), ["target_backbone_version_id"])


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index(op.f("ix_jobs_target_backbone_version_id"))
        batch.drop_constraint(op.f("fk_jobs_target_backbone_version_id_backbone_versions"), type_="foreignkey")
        batch.drop_column("target_backbone_version_id")
