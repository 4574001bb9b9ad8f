"""Migrations build, on an empty database, exactly the schema the models describe."""

from __future__ import annotations

import peewee as pw
import pytest
from peewee_migrate import Router
from support import create_pg_database, drop_pg_database, make_settings

from referral_grpc.store.database import init_database, make_database
from referral_grpc.store.migrate import migrations_dir, pending_migrations, run_migrations
from referral_grpc.store.models import ALL_MODELS, database


def _schema(db: pw.Database) -> dict[str, object]:
    schema: dict[str, object] = {}
    for table in sorted(t for t in db.get_tables() if t != "migratehistory"):
        columns = sorted((c.name, c.data_type, c.null, c.primary_key) for c in db.get_columns(table))
        indexes = sorted((i.name, tuple(i.columns), i.unique) for i in db.get_indexes(table))
        foreign_keys = sorted((f.column, f.dest_table, f.dest_column) for f in db.get_foreign_keys(table))
        schema[table] = {"columns": columns, "indexes": indexes, "foreign_keys": foreign_keys}
    return schema


def _users_table_sql(db: pw.Database) -> str | None:
    if not isinstance(db, pw.SqliteDatabase):
        return None
    row = db.execute_sql("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'users'").fetchone()
    return str(row[0])


@pytest.mark.parametrize("backend", ["postgres", "sqlite"])
def test_migrations_match_models(backend: str, pg_server_url: str, tmp_path: object) -> None:
    if backend == "postgres":
        urls = [create_pg_database(pg_server_url), create_pg_database(pg_server_url)]
    else:
        urls = [f"sqlite:///{tmp_path}/migrated.db", f"sqlite:///{tmp_path}/models.db"]
    try:
        migrated = init_database(make_settings(database_url=urls[0]))
        every_migration = sorted(path.stem for path in migrations_dir().glob("[0-9]*.py"))
        assert pending_migrations(migrated) == every_migration
        assert run_migrations(migrated) == every_migration
        assert run_migrations(migrated) == []  # idempotent
        migrated_schema = _schema(migrated)
        migrated_users = _users_table_sql(migrated)
        migrated.close()

        from_models = make_database(make_settings(database_url=urls[1]))
        database.initialize(from_models)
        from_models.create_tables(ALL_MODELS)
        assert migrated_schema == _schema(from_models)
        # Column introspection cannot see AUTOINCREMENT: compare SQLite's own definitions.
        assert migrated_users == _users_table_sql(from_models)
        from_models.close()
        # The one-active-code guarantee is in the database, not in Python.
        assert ("referral_codes_one_active_per_user", ("user_id",), True) in migrated_schema[
            "referral_codes"
        ]["indexes"]  # type: ignore[index]
    finally:
        if backend == "postgres":
            for url in urls:
                drop_pg_database(url)


_ADD_USER = (
    "INSERT INTO users (id, email, email_key, password_hash, token_version, referrer_id, created_at,"
    " email_status, email_recheck) VALUES (?, ?, ?, 'h', 0, ?, 't', 'unchecked', 0)"
)


def test_sqlite_user_ids_migration_keeps_every_row_and_reference(tmp_path: object) -> None:
    """002 rebuilds the SQLite users table; no user, code or token may be lost or cut from its user."""
    db = init_database(make_settings(database_url=f"sqlite:///{tmp_path}/upgraded.db"))
    assert Router(db, migrate_dir=migrations_dir()).run("001_initial") == ["001_initial"]
    for user_id, referrer in ((1, None), (2, 1), (3, 2)):
        email = f"u{user_id}@example.com"
        db.execute_sql(_ADD_USER, (user_id, email, email, referrer))
        db.execute_sql(
            "INSERT INTO referral_codes (user_id, code, created_at, expires_at, is_active)"
            " VALUES (?, ?, 't', 't', 1)",
            (user_id, f"CODE{user_id}"),
        )
        db.execute_sql(
            "INSERT INTO refresh_tokens (user_id, family, token_hash, created_at, expires_at)"
            " VALUES (?, 'f', ?, 't', 't')",
            (user_id, f"hash{user_id}"),
        )

    def snapshot() -> list[list[tuple[object, ...]]]:
        queries = (
            "SELECT * FROM users ORDER BY id",
            "SELECT * FROM referral_codes ORDER BY id",
            "SELECT * FROM refresh_tokens ORDER BY id",
        )
        return [list(db.execute_sql(query).fetchall()) for query in queries]

    before = snapshot()
    applied = Router(db, migrate_dir=migrations_dir()).run("002_never_reuse_user_ids")
    assert applied[-1] == "002_never_reuse_user_ids"
    assert snapshot() == before
    assert db.execute_sql("PRAGMA foreign_key_check").fetchall() == []
    # References still act: deleting user 3 takes its code and token and no other row; its id stays used.
    db.execute_sql("DELETE FROM users WHERE id = 3")
    assert [row[1] for row in db.execute_sql("SELECT * FROM referral_codes").fetchall()] == [1, 2]
    db.execute_sql(_ADD_USER, (None, "new@example.com", "new@example.com", None))
    assert db.execute_sql("SELECT max(id) FROM users").fetchone() == (4,)
    db.execute_sql("DELETE FROM users WHERE id = 1")
    assert db.execute_sql("SELECT id, referrer_id FROM users ORDER BY id").fetchall() == [
        (2, None),
        (4, None),
    ]
    db.close()
