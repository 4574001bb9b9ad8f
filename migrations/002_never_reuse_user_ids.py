"""User ids are never reused: on SQLite the users table gets INTEGER PRIMARY KEY AUTOINCREMENT.

Without AUTOINCREMENT SQLite gives a deleted last user's id to the next insert, and the deleted user's
still-valid access token then names the new user. PostgreSQL's BIGSERIAL never reuses a value: nothing
to do there.

SQLite cannot alter a primary key, so the table is rebuilt. peewee-migrate runs each migration in a
transaction, where `PRAGMA foreign_keys = OFF` is a no-op, so the usual rebuild (drop the old table)
would cascade-delete every row that references a user. Instead the referencing rows are set aside in
temporary tables first and put back once the new table has taken the old one's name. The rebuild
works from the table's current definition, so columns added by other migrations are kept. Ids freed
by deletions before this migration may still be handed out once: SQLite has no record of them.
"""

import peewee as pw

USERS = "users"
REBUILT = "users_rebuilt"
PLAIN_KEY = '"id" INTEGER NOT NULL PRIMARY KEY'
AUTOINCREMENT_KEY = PLAIN_KEY + " AUTOINCREMENT"


def _rebuild_users(database: pw.SqliteDatabase, autoincrement: bool) -> None:
    def rows(sql: str, *params: object) -> list[tuple]:
        return list(database.execute_sql(sql, params).fetchall())

    (table_sql,) = rows("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?", USERS)[0]
    old_key, new_key = (PLAIN_KEY, AUTOINCREMENT_KEY) if autoincrement else (AUTOINCREMENT_KEY, PLAIN_KEY)
    if autoincrement == (AUTOINCREMENT_KEY in table_sql):
        return  # already in the wanted shape
    assert table_sql.count(old_key) == 1, "unexpected users table definition"
    # Renames the table and its self-reference (referrer_id); RENAME TO renames both back below.
    rebuilt_sql = table_sql.replace(old_key, new_key).replace(f'"{USERS}"', f'"{REBUILT}"')
    index_sqls = [
        sql
        for (sql,) in rows("SELECT sql FROM sqlite_master WHERE type = 'index' AND tbl_name = ?", USERS)
        if sql
    ]
    tables = [name for (name,) in rows("SELECT name FROM sqlite_master WHERE type = 'table'")]
    children = [
        table
        for table in tables
        if table != USERS and any(fk[2] == USERS for fk in rows(f'PRAGMA foreign_key_list("{table}")'))
    ]

    for child in children:
        database.execute_sql(f'CREATE TEMP TABLE "kept_{child}" AS SELECT * FROM "{child}"')
        database.execute_sql(f'DELETE FROM "{child}"')
    database.execute_sql(rebuilt_sql)
    database.execute_sql(f'INSERT INTO "{REBUILT}" SELECT * FROM "{USERS}"')
    database.execute_sql(f'DROP TABLE "{USERS}"')
    database.execute_sql(f'ALTER TABLE "{REBUILT}" RENAME TO "{USERS}"')
    for sql in index_sqls:
        database.execute_sql(sql)
    for child in children:
        database.execute_sql(f'INSERT INTO "{child}" SELECT * FROM "kept_{child}"')
        database.execute_sql(f'DROP TABLE "kept_{child}"')


def migrate(migrator, database, fake=False, **kwargs):
    if isinstance(database, pw.SqliteDatabase):
        migrator.run(_rebuild_users, database, autoincrement=True)


def rollback(migrator, database, fake=False, **kwargs):
    if isinstance(database, pw.SqliteDatabase):
        migrator.run(_rebuild_users, database, autoincrement=False)
