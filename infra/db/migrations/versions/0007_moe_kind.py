"""Job kind moe: jobs and schedules may be mixture-of-experts assemblies.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-10
"""

from __future__ import annotations

from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | None = None
depends_on: str | None = None

_BEFORE = "kind IN ('merge', 'edit', 'extract_lora')"
_AFTER = "kind IN ('merge', 'edit', 'extract_lora', 'moe')"


def _replace(check: str) -> None:
    for table in ("jobs", "schedules"):
        with op.batch_alter_table(table) as batch:
            batch.drop_constraint(op.f(f"ck_{table}_kind"), type_="check")
            batch.create_check_constraint(op.f(f"ck_{table}_kind"), check)


def upgrade() -> None:
    _replace(_AFTER)


def downgrade() -> None:
    op.execute("DELETE FROM jobs WHERE kind = 'moe'")
    op.execute("DELETE FROM schedules WHERE kind = 'moe'")
    _replace(_BEFORE)
