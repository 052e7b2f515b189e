"""Job kind extract_lora: jobs and schedules may be LoRA extractions.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-09
"""

from __future__ import annotations

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | None = None
depends_on: str | None = None

_BEFORE = "kind IN ('merge', 'edit')"
_AFTER = "kind IN ('merge', 'edit', 'extract_lora')"


def _replace(check: str) -> None:
    for table in ("jobs", "schedules"):
        with op.batch_alter_table(table) as batch:
            batch.drop_constraint(op.f(f"ck_{table}_kind"), type_="check")
            batch.create_check_constraint(op.f(f"ck_{table}_kind"), check)


def upgrade() -> None:
    _replace(_AFTER)


def downgrade() -> None:
    op.execute("DELETE FROM jobs WHERE kind = 'extract_lora'")
    op.execute("DELETE FROM schedules WHERE kind = 'extract_lora'")
    _replace(_BEFORE)
