"""The tenant boundary: disabled tenants, tenants' own Hub tokens, S3 and Hub push grants,
API keys found by their secret's hash, and room for sealed webhook secrets.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | None = None
depends_on: str | None = None

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("tenants") as batch:
        batch.add_column(sa.Column("disabled_at", _TS, nullable=True))
        batch.add_column(sa.Column("hub_token", sa.Text(), nullable=True))
        batch.add_column(sa.Column("hub_token_set_at", _TS, nullable=True))
        batch.add_column(
            sa.Column(
                "use_operator_hub_token",
                sa.Boolean(),
                nullable=False,
                server_default=sa.false(),
            )
        )
    op.create_index("ix_api_keys_secret_sha256", "api_keys", ["secret_sha256"], unique=True)
    op.create_table(
        "s3_grants",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("tenant_id", sa.Integer(), nullable=False),
        sa.Column("bucket", sa.String(63), nullable=False),
        sa.Column("prefix", sa.String(1024), nullable=False),
        sa.Column("endpoint", sa.Text(), nullable=True),
        sa.Column("region", sa.String(64), nullable=True),
        sa.Column("credentials", sa.String(16), nullable=False),
        sa.Column("access_key_id", sa.String(256), nullable=True),
        sa.Column("secret_access_key", sa.Text(), nullable=True),
        sa.Column("created_at", _TS, nullable=False),
        sa.CheckConstraint(
            "credentials IN ('keys', 'anonymous', 'store')",
            name=op.f("ck_s3_grants_credentials"),
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenants.id"],
            name=op.f("fk_s3_grants_tenant_id_tenants"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_s3_grants")),
    )
    op.create_index("ix_s3_grants_tenant_bucket", "s3_grants", ["tenant_id", "bucket"])
    op.create_table(
        "hub_push_grants",
        sa.Column("tenant_id", sa.Integer(), nullable=False),
        sa.Column("namespace", sa.String(96), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenants.id"],
            name=op.f("fk_hub_push_grants_tenant_id_tenants"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("tenant_id", "namespace", name=op.f("pk_hub_push_grants")),
    )
    # Sealed secrets (enc:v1:<Fernet token>) are longer than the 100 characters of a
    # plain whsec_ secret.
    for table in ("webhook_subscriptions", "webhook_secrets"):
        with op.batch_alter_table(table) as batch:
            batch.alter_column("secret", type_=sa.Text(), existing_type=sa.String(100))


def downgrade() -> None:
    for table in ("webhook_subscriptions", "webhook_secrets"):
        with op.batch_alter_table(table) as batch:
            batch.alter_column("secret", type_=sa.String(100), existing_type=sa.Text())
    op.drop_table("hub_push_grants")
    op.drop_index("ix_s3_grants_tenant_bucket", table_name="s3_grants")
    op.drop_table("s3_grants")
    op.drop_index("ix_api_keys_secret_sha256", table_name="api_keys")
    with op.batch_alter_table("tenants") as batch:
        batch.drop_column("use_operator_hub_token")
        batch.drop_column("hub_token_set_at")
        batch.drop_column("hub_token")
        batch.drop_column("disabled_at")
