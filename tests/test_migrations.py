"""Migrations build, on an empty database, exactly the schema the models describe."""

from __future__ import annotations

import peewee as pw
import pytest
from conftest import create_pg_database, drop_pg_database, make_settings

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


@pytest.mark.parametrize("backend", ["postgres", "sqlite"])
def test_migrations_match_models(backend: str, pg_server_url: str, tmp_path: object) -> None:
    if backend == "postgres":
        urls = [create_pg_database(pg_server_url), create_pg_database(pg_server_url)]
    else:
        urls = [f"sqlite:///{tmp_path}/migrated.db", f"sqlite:///{tmp_path}/models.db"]
    try:
        migrated = init_database(make_settings(database_url=urls[0]))
        scripts = sorted(path.stem for path in migrations_dir().glob("[0-9][0-9][0-9]_*.py"))
        assert scripts[0] == "001_initial"
        assert pending_migrations(migrated) == scripts
        assert run_migrations(migrated) == scripts
        assert run_migrations(migrated) == []  # idempotent
        migrated_schema = _schema(migrated)
        migrated.close()

        from_models = make_database(make_settings(database_url=urls[1]))
        database.initialize(from_models)
        from_models.create_tables(ALL_MODELS)
        assert migrated_schema == _schema(from_models)
        from_models.close()
        # The one-active-code guarantee is in the database, not in Python.
        assert ("referral_codes_one_active_per_user", ("user_id",), True) in migrated_schema[
            "referral_codes"
        ]["indexes"]  # type: ignore[index]
    finally:
        if backend == "postgres":
            for url in urls:
                drop_pg_database(url)
