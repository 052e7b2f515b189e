"""Schedules (cron-fired batch jobs) and their runs: a job started, or a skip with its reason.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None

_JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "schedules",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("tenant_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("cron", sa.String(200), nullable=False),
        sa.Column("recipe", _JSON, nullable=False),
        sa.Column("artifact_name", sa.String(100), nullable=False),
        sa.Column("job_options", _JSON, nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("only_if_inputs_changed", sa.Boolean(), nullable=False),
        sa.Column("next_run_at", _TS, nullable=True),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("updated_at", _TS, nullable=False),
        sa.CheckConstraint("kind IN ('merge', 'edit')", name=op.f("ck_schedules_kind")),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenants.id"],
            name=op.f("fk_schedules_tenant_id_tenants"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_schedules")),
    )
    op.create_index("ix_schedules_tenant_created", "schedules", ["tenant_id", "created_at", "id"])
    op.create_index("ix_schedules_enabled_next", "schedules", ["enabled", "next_run_at"])
    op.create_table(
        "schedule_runs",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("schedule_id", sa.String(36), nullable=False),
        sa.Column("scheduled_for", _TS, nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("job_id", sa.String(36), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("input_fingerprint", _JSON, nullable=True),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("updated_at", _TS, nullable=False),
        sa.CheckConstraint(
            "outcome IN ('pending', 'job', 'skipped', 'failed')",
            name=op.f("ck_schedule_runs_outcome"),
        ),
        sa.ForeignKeyConstraint(
            ["schedule_id"],
            ["schedules.id"],
            name=op.f("fk_schedule_runs_schedule_id_schedules"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_schedule_runs")),
        sa.UniqueConstraint(
            "schedule_id", "scheduled_for", name=op.f("uq_schedule_runs_schedule_id_scheduled_for")
        ),
    )


def downgrade() -> None:
    op.drop_table("schedule_runs")
    op.drop_index("ix_schedules_enabled_next", table_name="schedules")
    op.drop_index("ix_schedules_tenant_created", table_name="schedules")
    op.drop_table("schedules")
