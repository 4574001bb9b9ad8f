"""Statements on PostgreSQL: prepared on the server (DB_PREPARE_STATEMENTS) once per connection, never lost;
a transaction's BEGIN sent with its first statement."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import grpc
import peewee as pw
import psycopg2
import pytest
from support import PG_ADMIN_URL, make_settings, wait_until
from support.api import bearer, running_api, ts

from referral_grpc.gen import referral_service_pb2 as ref_pb
from referral_grpc.store import database
from referral_grpc.store.database import init_database, run_sql, write_transaction
from referral_grpc.store.migrate import run_migrations

PASSWORD = "correct horse battery"


@pytest.fixture
def db(pg_url: str) -> Iterator[database.PostgresPool]:
    pool = init_database(make_settings(database_url=pg_url))
    assert isinstance(pool, database.PostgresPool)
    run_migrations(pool)
    try:
        yield pool
    finally:
        pool.close_all()


def _prepared(db: database.PostgresPool) -> set[str]:
    """The statements this thread's connection has prepared, as the server lists them."""
    rows = db.execute_sql("SELECT statement FROM pg_prepared_statements").fetchall()
    return {row[0] for row in rows}


def _backend_pid(db: database.PostgresPool) -> int:
    return int(db.execute_sql("SELECT pg_backend_pid()").fetchone()[0])


def test_a_statement_is_prepared_once_per_connection_and_answers_as_plain_sql(
    db: database.PostgresPool,
) -> None:
    sql = "SELECT %s::int + %s, '100%%', %s::text"
    assert run_sql(db, sql, (1, 2, "%s")).fetchone() == (3, "100%", "%s")
    assert run_sql(db, sql, (40, 2, "x")).fetchone() == (42, "100%", "x")
    prepared = _prepared(db)
    assert len(prepared) == 1
    (text,) = prepared
    assert text.startswith("PREPARE referral_") and "$1::int + $2, '100%', $3::text" in text
    # Row counts and RETURNING come back as from the statement itself.
    run_sql(db, "CREATE TEMP TABLE t (n int)")  # not preparable: run as it is
    assert run_sql(db, "INSERT INTO t VALUES (%s), (%s) RETURNING n", (1, 2)).fetchall() == [(1,), (2,)]
    assert run_sql(db, "UPDATE t SET n = n + %s WHERE n > %s", (10, 0)).rowcount == 2
    # Named values: each name one parameter, wherever and however often it appears.
    named = "SELECT %(b)s::int - %(a)s, %(a)s::int * %(b)s"
    assert run_sql(db, named, {"a": 2, "b": 7}).fetchone() == (5, 14)
    assert any("$1::int - $2, $2::int * $1" in text for text in _prepared(db))
    assert len(_prepared(db)) == 4


def test_a_statement_prepared_in_a_rolled_back_transaction_is_still_there(db: database.PostgresPool) -> None:
    class Abandoned(Exception):
        pass

    with pytest.raises(Abandoned), write_transaction(db):
        assert run_sql(db, "SELECT %s::int * 2", (21,)).fetchone() == (42,)
        raise Abandoned
    # Were PREPARE undone with the transaction, EXECUTE would now fail: the statement is unknown.
    assert run_sql(db, "SELECT %s::int * 2", (5,)).fetchone() == (10,)
    assert len(_prepared(db)) == 1


def test_a_replaced_connection_prepares_its_statements_again(db: database.PostgresPool) -> None:
    assert run_sql(db, "SELECT %s::int", (1,)).fetchone() == (1,)
    pid = _backend_pid(db)
    db.close()
    conn = psycopg2.connect(PG_ADMIN_URL)
    conn.autocommit = True
    try:
        with conn.cursor() as cursor:
            cursor.execute("SELECT pg_terminate_backend(%s)", (pid,))

            def gone() -> bool:
                cursor.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,))
                return cursor.fetchone() is None

            wait_until(gone, 5, "the terminated backend gone")
    finally:
        conn.close()
    # The pool hands out a new connection (a new server session, with nothing prepared).
    assert run_sql(db, "SELECT %s::int", (2,)).fetchone() == (2,)
    assert _backend_pid(db) != pid
    assert len(_prepared(db)) == 1


def test_a_connection_prepares_a_bounded_number_of_statements(db: database.PostgresPool) -> None:
    cap = database.MAX_PREPARED_PER_CONNECTION
    for n in range(cap + 10):
        assert run_sql(db, f"SELECT %s::int + {n}", (1,)).fetchone() == (1 + n,)
    assert len(_prepared(db)) == cap


def test_with_the_setting_off_nothing_is_prepared(pg_url: str) -> None:
    pool = init_database(make_settings(database_url=pg_url, db_prepare_statements=False))
    try:
        assert run_sql(pool, "SELECT %s::int", (7,)).fetchone() == (7,)
        assert pool.execute_sql("SELECT count(*) FROM pg_prepared_statements").fetchone() == (0,)
    finally:
        pool.close_all()


def test_the_service_runs_its_hot_statements_prepared(pg_url: str) -> None:
    with running_api(make_settings(database_url=pg_url)) as api:
        token = api.register("owner@example.com", PASSWORD).access_token
        expires = ts(datetime.now(UTC) + timedelta(days=7))
        code = api.referrals.CreateReferralCode(
            ref_pb.CreateReferralCodeRequest(expires_at=expires), metadata=bearer(token)
        ).code
        found = api.referrals.GetReferralCodeByEmail(
            ref_pb.GetReferralCodeByEmailRequest(email="Owner@Example.com")
        )
        assert found.code == code
        # Addresses nobody has: each lookup reads PostgreSQL, and nothing runs after it on its connection.
        for n in range(3):
            with pytest.raises(grpc.RpcError) as missing:
                api.referrals.GetReferralCodeByEmail(
                    ref_pb.GetReferralCodeByEmailRequest(email=f"nobody{n}@example.com")
                )
            assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        name = pg_url.rsplit("/", 1)[1]
        conn = psycopg2.connect(PG_ADMIN_URL)
        try:
            with conn.cursor() as cursor:
                cursor.execute(
                    "SELECT query FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                    (name,),
                )
                last = [row[0] for row in cursor.fetchall()]
        finally:
            conn.close()
        assert any(query.startswith("EXECUTE referral_") for query in last), last


def _statements(db: database.PostgresPool) -> list[str]:
    sent: list[str] = []
    db.query_hooks.append(lambda query: sent.append(query.sql))
    return sent


def _in_transaction(db: database.PostgresPool) -> bool:
    conn = db.connection()
    return bool(conn.get_transaction_status() != psycopg2.extensions.TRANSACTION_STATUS_IDLE)


def test_a_transaction_sends_its_begin_with_its_first_statement(db: database.PostgresPool) -> None:
    run_sql(db, "CREATE TEMP TABLE t (n int PRIMARY KEY)")
    sent = _statements(db)
    try:
        with write_transaction(db):
            first = run_sql(db, "SELECT now()").fetchone()[0]
            run_sql(db, "INSERT INTO t VALUES (%s)", (1,))
            time.sleep(0.01)
            # One transaction: its start time, whatever the clock says now.
            assert run_sql(db, "SELECT now()").fetchone()[0] == first
            assert _in_transaction(db)
    finally:
        db.query_hooks.clear()
    assert not _in_transaction(db)
    # (peewee runs COMMIT on its own cursor: the hooks see the statements, not the COMMIT.)
    assert sent[0].startswith("BEGIN;") and not any(sql.startswith("BEGIN") for sql in sent[1:])
    assert run_sql(db, "SELECT count(*) FROM t").fetchone() == (1,)


def test_a_transaction_that_runs_nothing_sends_nothing(db: database.PostgresPool) -> None:
    sent = _statements(db)
    try:
        with write_transaction(db):
            assert not _in_transaction(db)  # BEGIN waits for a first statement
        with pytest.raises(ZeroDivisionError), write_transaction(db):
            raise ZeroDivisionError
    finally:
        db.query_hooks.clear()
    assert sent == [] and not _in_transaction(db)
    # The next transaction starts as any other.
    with write_transaction(db):
        assert run_sql(db, "SELECT 1").fetchone() == (1,)
    assert not _in_transaction(db)


def test_a_first_statement_that_fails_leaves_nothing_and_the_connection_usable(
    db: database.PostgresPool,
) -> None:
    run_sql(db, "CREATE TEMP TABLE t (n int PRIMARY KEY)")
    run_sql(db, "INSERT INTO t VALUES (1)")
    with pytest.raises(pw.IntegrityError), write_transaction(db):
        run_sql(db, "INSERT INTO t VALUES (2), (1)")  # the first statement, and it fails
    assert not _in_transaction(db)
    with pytest.raises(pw.IntegrityError), write_transaction(db):
        run_sql(db, "INSERT INTO t VALUES (3)")
        run_sql(db, "INSERT INTO t VALUES (1)")  # a later one fails: the earlier one goes too
    assert run_sql(db, "SELECT n FROM t ORDER BY n").fetchall() == [(1,)]
