"""Applies the peewee-migrate scripts in migrations/; the server never creates tables itself."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import peewee as pw
from peewee_migrate import Router

from .database import is_postgres

log = logging.getLogger(__name__)

# Any constant: serialises migrations when several processes start at once.
_ADVISORY_LOCK_KEY = 0x5EF3_2A11


def migrations_dir() -> Path:
    """The scripts: installed (wheel or editable) they are the package referral_grpc.migrations, which
    pyproject maps to the top-level migrations/ folder; in a bare checkout, that folder itself."""
    spec = importlib.util.find_spec("referral_grpc.migrations")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(__file__).resolve().parents[2] / "migrations"


def pending_migrations(db: pw.Database) -> list[str]:
    router = Router(db, migrate_dir=migrations_dir(), logger=log)
    return list(router.diff)


def run_migrations(db: pw.Database) -> list[str]:
    """Apply every pending migration; return the names applied."""
    router = Router(db, migrate_dir=migrations_dir(), logger=log)
    if is_postgres(db):
        db.execute_sql("SELECT pg_advisory_lock(%s)", (_ADVISORY_LOCK_KEY,))  # type: ignore[no-untyped-call]
    try:
        return list(router.run())
    finally:
        if is_postgres(db):
            db.execute_sql("SELECT pg_advisory_unlock(%s)", (_ADVISORY_LOCK_KEY,))  # type: ignore[no-untyped-call]
