"""PostgreSQL: abort_statement(reason), which fails the statement that calls it (SQLSTATE RF001).

A statement that writes several tables at once and runs as a transaction of its own (autocommit)
calls it when what it finds means it must change nothing: the error rolls back every row its CTEs
wrote, and the caller, seeing RF001, takes the longer way (see rewards.RewardService._qualify_alone).
SQLite has no use for it: those statements are PostgreSQL's only.
"""

import peewee as pw

ABORT_STATEMENT = """
CREATE FUNCTION abort_statement(reason text) RETURNS boolean LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    RAISE EXCEPTION USING ERRCODE = 'RF001', MESSAGE = reason;
END
$$
"""


def migrate(migrator, database, fake=False, **kwargs):
    if isinstance(migrator.__database__, pw.PostgresqlDatabase):
        migrator.sql(ABORT_STATEMENT)


def rollback(migrator, database, fake=False, **kwargs):
    if isinstance(migrator.__database__, pw.PostgresqlDatabase):
        migrator.sql("DROP FUNCTION IF EXISTS abort_statement(text)")
