"""A real PostgreSQL for the tests: a fresh database per test session, dropped afterwards.

The server is the one on the development machines and in CI (127.0.0.1:5432, user postgres,
trust auth); ``TEST_POSTGRES_URL`` points elsewhere (any database there: it is only used to
create and drop the test databases). An unreachable server fails the tests that need it,
with the command that starts it; they are never skipped.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager

from testbed import Unavailable

ADMIN_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@contextmanager
def fresh_database(prefix: str = "weightsmith_test") -> Iterator[str]:
    """Create an empty database; yields its URL; drops it (closing leftover sessions)."""
    # Imported here: conftest imports this module, and most tests need no database.
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import OperationalError

    admin_url = make_url(ADMIN_URL)
    if admin_url.drivername in ("postgresql", "postgres"):
        admin_url = admin_url.set(drivername="postgresql+psycopg")
    name = f"{prefix}_{secrets.token_hex(6)}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    except OperationalError as e:
        admin.dispose()
        raise Unavailable(
            f"PostgreSQL is not reachable at {admin_url.render_as_string()} ({e.orig}). "
            "Start it (pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main "
            "start) or set TEST_POSTGRES_URL."
        ) from None
    try:
        yield admin_url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()
