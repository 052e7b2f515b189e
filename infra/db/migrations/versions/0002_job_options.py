"""Job options: where to push the artifact (``publish``) and the schedule that made the job.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None

_JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("publish", _JSON, nullable=True))
        batch.add_column(sa.Column("schedule_id", sa.String(36), nullable=True))
    op.create_index("ix_jobs_schedule_created", "jobs", ["schedule_id", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_jobs_schedule_created", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("schedule_id")
        batch.drop_column("publish")
