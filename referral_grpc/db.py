"""Database connection: PostgreSQL through a psycopg2 pool in production, SQLite embedded."""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlparse

import peewee as pw
from playhouse.pool import PooledPostgresqlDatabase

from .models import database
from .settings import ConfigError, Settings


def make_database(settings: Settings) -> pw.Database:
    """Build (but do not connect) the database described by DATABASE_URL."""
    url = urlparse(settings.database_url)
    if url.scheme == "sqlite":
        path = settings.database_url.split(":///", 1)[-1] if ":///" in settings.database_url else ""
        if not path or path == ":memory:":
            # Peewee gives each thread its own connection: an in-memory database would differ per thread.
            raise ConfigError("DATABASE_URL must name a SQLite file, not :memory:")
        return pw.SqliteDatabase(
            path,
            pragmas={
                "journal_mode": "wal",
                "foreign_keys": 1,
                "synchronous": "normal",
                # Writers queue for up to 5 s instead of failing at once with "database is locked".
                "busy_timeout": 5000,
            },
            timeout=5,
        )
    if url.scheme in ("postgres", "postgresql"):
        options = "-c timezone=UTC"
        if settings.db_statement_timeout_ms:
            options += f" -c statement_timeout={settings.db_statement_timeout_ms}"
        return PooledPostgresqlDatabase(
            unquote(url.path.lstrip("/")) or "postgres",
            user=unquote(url.username) if url.username else None,
            password=unquote(url.password) if url.password else None,
            host=url.hostname or "127.0.0.1",
            port=url.port or 5432,
            # One connection per server worker thread; a bounded wait when all are busy.
            max_connections=settings.db_pool_size,
            timeout=settings.db_pool_timeout,
            stale_timeout=300,
            connect_timeout=2,
            options=options,
        )
    raise ConfigError("DATABASE_URL must start with sqlite:///, postgresql:// or postgres://")


def init_database(settings: Settings) -> pw.Database:
    """Create the database for `settings` and bind the models to it."""
    db = make_database(settings)
    database.initialize(db)
    return db


def is_postgres(db: pw.Database) -> bool:
    return isinstance(db, pw.PostgresqlDatabase)


def write_transaction(db: pw.Database) -> Any:
    """A transaction that will write.

    On SQLite it takes the write lock up front (BEGIN IMMEDIATE): a deferred transaction that
    reads first and writes later can fail with SQLITE_BUSY instead of waiting its turn.
    """
    if isinstance(db, pw.SqliteDatabase):
        return db.atomic("IMMEDIATE")
    return db.atomic()
