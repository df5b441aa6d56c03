"""Initial registry schema: backbone versions, devices and jobs.

Revision ID: 0001
Revises:
Create Date: 2026-11-29 13:23:17
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Written out rather than imported from the models: a migration must keep describing
# the schema as it was at this revision, whatever the models become.
UTC_DATETIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "backbone_versions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("source", sa.String(length=1024), nullable=False),
        sa.Column("architecture", sa.JSON(), nullable=False),
        sa.Column("content_hash", sa.String(length=64), nullable=False),
        sa.Column("seed", sa.Integer(), nullable=False),
        sa.Column("adapter_config", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("created_at", UTC_DATETIME, nullable=False),
        sa.Column("activated_at", UTC_DATETIME, nullable=True),
        sa.Column("parent_id", sa.Integer(), nullable=True),
        sa.CheckConstraint(
            "status IN ('active', 'deprecated', 'retired')", name=op.f("ck_backbone_versions_status")
        ),
        sa.ForeignKeyConstraint(
            ["parent_id"], ["backbone_versions.id"], name=op.f("fk_backbone_versions_parent_id_backbone_versions")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_backbone_versions")),
        sa.UniqueConstraint("name", name=op.f("uq_backbone_versions_name")),
    )
    op.create_index(op.f("ix_backbone_versions_content_hash"), "backbone_versions", ["content_hash"])

    op.create_table(
        "devices",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("backbone_version_id", sa.Integer(), nullable=False),
        sa.Column("label", sa.String(length=128), nullable=True),
        sa.Column("token_hash", sa.String(length=128), nullable=True),
        sa.Column("created_at", UTC_DATETIME, nullable=False),
        sa.Column("last_seen_at", UTC_DATETIME, nullable=True),
        sa.ForeignKeyConstraint(
            ["backbone_version_id"],
            ["backbone_versions.id"],
            name=op.f("fk_devices_backbone_version_id_backbone_versions"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_devices")),
    )
    op.create_index(op.f("ix_devices_backbone_version_id"), "devices", ["backbone_version_id"])

    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("device_id", sa.String(length=32), nullable=False),
        sa.Column("backbone_version_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("created_at", UTC_DATETIME, nullable=False),
        sa.Column("started_at", UTC_DATETIME, nullable=True),
        sa.Column("ended_at", UTC_DATETIME, nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("metrics_before", sa.JSON(), nullable=True),
        sa.Column("metrics_after", sa.JSON(), nullable=True),
        sa.Column("tokens_processed", sa.Integer(), nullable=False),
        sa.Column("steps_done", sa.Integer(), nullable=False),
        sa.CheckConstraint("kind IN ('personalize', 'migrate', 'evaluate')", name=op.f("ck_jobs_kind")),
        sa.CheckConstraint(
            "status IN ('pending', 'running', 'succeeded', 'failed', 'interrupted')", name=op.f("ck_jobs_status")
        ),
        sa.ForeignKeyConstraint(
            ["backbone_version_id"],
            ["backbone_versions.id"],
            name=op.f("fk_jobs_backbone_version_id_backbone_versions"),
        ),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"], name=op.f("fk_jobs_device_id_devices")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_jobs")),
    )
    op.create_index(op.f("ix_jobs_backbone_version_id"), "jobs", ["backbone_version_id"])
    op.create_index(op.f("ix_jobs_device_id"), "jobs", ["device_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_jobs_device_id"), table_name="jobs")
    op.drop_index(op.f("ix_jobs_backbone_version_id"), table_name="jobs")
    op.drop_table("jobs")
    op.drop_index(op.f("ix_devices_backbone_version_id"), table_name="devices")
    op.drop_table("devices")
    op.drop_index(op.f("ix_backbone_versions_content_hash"), table_name="backbone_versions")
    op.drop_table("backbone_versions")
