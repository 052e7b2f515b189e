"""Alembic environment: run by infra.db.migrate, which passes the connection to migrate.

Batch mode is on, so a migration that alters a table also works on SQLite (which recreates
the table). Migrations never import the models: each revision spells out its own schema.
"""

from __future__ import annotations

from alembic import context

from infra.db.models import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError(
        "run migrations with infra.db.migrate (upgrade_database or 'python -m infra.db')"
    )

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=True,
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
