"""Jobs known by a UUID their device makes, so that a device can report its jobs to its
service idempotently, and what the device last reported of each.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 17:00:00
"""

import uuid
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Batch mode copies jobs on SQLite to make the new column NOT NULL; no table refers to jobs.
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("uuid", sa.String(length=32), nullable=True))
        batch.add_column(sa.Column("reported_status", sa.String(length=16), nullable=True))
    jobs = sa.table("jobs", sa.column("id", sa.Integer()), sa.column("uuid", sa.String(32)))
    connection = op.get_bind()
    for (job_id,) in connection.execute(sa.select(jobs.c.id)).all():
        connection.execute(jobs.update().where(jobs.c.id == job_id).values(uuid=uuid.uuid4().hex))
    with op.batch_alter_table("jobs") as batch:
        batch.alter_column("uuid", existing_type=sa.String(length=32), nullable=False)
        batch.create_unique_constraint(op.f("uq_jobs_uuid"), ["uuid"])


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_constraint(op.f("uq_jobs_uuid"), type_="unique")
        batch.drop_column("reported_status")
        batch.drop_column("uuid")
