"""Database engines for the job store: PostgreSQL (psycopg 3) in production, SQLite embedded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url

from infra.secrets import private_directory, private_file


def normalize_database_url(url: str | URL) -> URL:
    """``postgresql://`` and ``postgres://`` mean psycopg 3, the driver weightsmith installs."""
    u = make_url(url) if isinstance(url, str) else url
    if u.drivername in ("postgresql", "postgres"):
        u = u.set(drivername="postgresql+psycopg")
    return u


def make_engine(url: str | URL, **kwargs: Any) -> Engine:
    """An engine for the job store. On SQLite, write transactions never fail as 'locked'.

    SQLite: WAL (readers do not block the writer), foreign keys on, and every transaction
    starts with ``BEGIN IMMEDIATE``: a transaction that reads and then writes would otherwise
    fail at once with SQLITE_BUSY when another writer got there first, whatever the busy
    timeout. Writers queue for up to 30 s instead.
    """
    u = normalize_database_url(url)
    if u.get_backend_name() != "sqlite":
        kwargs.setdefault("pool_pre_ping", True)
        return create_engine(u, **kwargs)

    if u.database not in (None, "", ":memory:") and not u.database.startswith("file:"):
        # It holds tenants' keys (hashed), grants and sealed secrets: owner-only, like its
        # folder when the folder is new (SQLite gives its -wal/-shm files the same mode).
        db = Path(u.database).expanduser()
        if not db.parent.exists():
            private_directory(db.parent)
        private_file(db)
    connect_args = kwargs.pop("connect_args", {})
    connect_args.setdefault("timeout", 30)
    connect_args.setdefault("check_same_thread", False)
    engine = create_engine(u, connect_args=connect_args, **kwargs)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event below issue BEGIN, instead of the sqlite3 module.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        if u.database not in (None, "", ":memory:"):
            cursor.execute("PRAGMA journal_mode=WAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine
