"""Hardening at the edge: undecodable input, abandoned calls, a deadline never lifting the statement cap."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import peewee as pw
import psycopg2
import pytest
import requests
from support import TEST_JWT_SECRET, make_settings
from support.api import Api, bearer, rich_error, running_api, ts
from support.envoy import Envoy, migrate, running_envoy, running_server, server_env

from referral_grpc.devstack.locations import Address
from referral_grpc.gen import referral_service_pb2 as ref_pb
from referral_grpc.request_context import DeadlineExceeded, request_deadline
from referral_grpc.store.database import init_database, single_statement_write, write_transaction
from referral_grpc.store.migrate import run_migrations
from referral_grpc.store.models import ReferralCode

LOOKUP = "/referral.v1.ReferralService/GetReferralCodeByEmail"
CREATE = "/referral.v1.ReferralService/CreateReferralCode"
REGISTER = "/referral.v1.AuthService/Register"
# Field 1 (email, a string) holding the bytes ff fe: not UTF-8.
INVALID_UTF8_REQUEST = b"\x0a\x02\xff\xfe"


def _sample(api: Api, name: str, **labels: str) -> float:
    return float(api.server.metrics.registry.get_sample_value(name, labels) or 0.0)


def handled(api: Api, method: str, code: str) -> float:
    return _sample(api, "referral_rpc_requests_total", method=method, code=code)


def abandoned(api: Api, method: str) -> float:
    return _sample(api, "referral_rpc_abandoned_total", method=method)


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


# --- input that does not decode -----------------------------------------------------------------


def test_an_undecodable_grpc_request_is_invalid_argument_counted_and_logged_in_one_line(
    sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    with running_api(make_settings(database_url=sqlite_url)) as api:
        raw = api.channel.unary_unary(LOOKUP)  # bytes in, bytes out: nothing parses on our side
        with pytest.raises(grpc.RpcError) as info:
            raw(INVALID_UTF8_REQUEST, timeout=5)
        error = rich_error(info.value)
        assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "REQUEST_UNDECODABLE")
        assert handled(api, LOOKUP, "INVALID_ARGUMENT") == 1
        assert handled(api, LOOKUP, "INTERNAL") == 0
    # No traceback: bad input is not a server fault.
    assert not [record for record in caplog.records if record.exc_info]


@pytest.fixture(scope="module")
def gateway(module_pg_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Envoy]:
    env = server_env(DATABASE_URL=module_pg_url, JWT_SECRET=TEST_JWT_SECRET)
    migrate(env)
    with running_server(env, tmp_path_factory.mktemp("server") / "server.log") as (_, address):
        backend: Address = address
        with running_envoy([backend], tmp_path_factory.mktemp("envoy")) as envoy:
            yield envoy


@pytest.mark.parametrize(
    "path",
    [
        "/referral/code/by-email?email=%ff@example.com",
        "/referral/code/by-email?email=a%c3%28@example.com",
        "/referral/referrals?page_token=%c3%28",
    ],
)
def test_invalid_utf8_in_a_query_parameter_is_a_400_with_a_reason(gateway: Envoy, path: str) -> None:
    registered = requests.post(
        gateway.url + "/auth/register",
        json={"email": f"utf8-{uuid.uuid4().hex[:8]}@example.com", "password": "correct horse battery"},
        timeout=10,
    ).json()
    headers = {"authorization": f"Bearer {registered['access_token']}"}
    response = requests.get(gateway.url + path, headers=headers, timeout=10)
    body = response.json()
    assert response.status_code == 400, body
    assert body["details"][0]["reason"] == "REQUEST_UNDECODABLE"


# --- calls that end before their work does ------------------------------------------------------


def _user_row_locked(conn: psycopg2.extensions.connection, user_id: int) -> None:
    with conn.cursor() as cur:
        cur.execute("SELECT id FROM users WHERE id = %s FOR UPDATE", (user_id,))


def _blocked_by(url: str, locker: psycopg2.extensions.connection) -> bool:
    """Whether some backend waits on a lock `locker` holds: the call under test, and nothing else on the
    server (a lock wait anywhere else would let the test cancel a call that had not started)."""
    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))",
                (locker.get_backend_pid(),),
            )
            row = cur.fetchone()
            return bool(row and row[0])
    finally:
        conn.close()


@pytest.mark.parametrize("ending", ["client cancels", "shutdown grace runs out"])
def test_a_call_that_ends_before_its_commit_changes_nothing(pg_url: str, ending: str) -> None:
    with running_api(make_settings(database_url=pg_url)) as api:
        tokens = api.register(f"blocked-{uuid.uuid4().hex[:8]}@example.com")
        locker = psycopg2.connect(pg_url)
        try:
            _user_row_locked(locker, int(tokens.user_id))
            expires = ts(datetime.now(UTC) + timedelta(days=30))
            call = api.referrals.CreateReferralCode.future(
                ref_pb.CreateReferralCodeRequest(expires_at=expires), metadata=bearer(tokens.access_token)
            )
            wait_for(lambda: _blocked_by(pg_url, locker), 10, "the call to block on the row lock")
            if ending == "client cancels":
                call.cancel()
            else:
                stopped = threading.Thread(target=api.server.stop, args=(0.2,))
                stopped.start()
                with pytest.raises(grpc.RpcError) as info:
                    call.result(timeout=10)
                assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
            # The server learns of the call's end on a thread of its own: once it has, nothing the
            # handler does after may commit (before, no server could know to hold back).
            wait_for(lambda: abandoned(api, CREATE) == 1, 10, "the server to see the call end")
        finally:
            locker.rollback()  # the blocked handler now runs on to its commit
            locker.close()
        wait_for(lambda: handled(api, CREATE, "UNAVAILABLE") == 1, 10, "the handler to finish")
        assert ReferralCode.select().where(ReferralCode.user == int(tokens.user_id)).count() == 0
        assert abandoned(api, CREATE) == 1
        # A call answered before its caller left is not counted.
        assert handled(api, REGISTER, "OK") == 1 and abandoned(api, REGISTER) == 0
        if ending == "shutdown grace runs out":
            stopped.join(10)


def test_a_client_deadline_never_lifts_the_statement_cap(pg_url: str) -> None:
    db = init_database(make_settings(database_url=pg_url, db_statement_timeout_ms=300))
    try:
        run_migrations(db)
        started = time.monotonic()
        # A REST client can send a long grpc-timeout through Envoy; the operator's cap still holds.
        with (
            request_deadline(30),
            pytest.raises(pw.OperationalError, match="statement timeout"),
            write_transaction(db),
        ):
            db.execute_sql("SELECT pg_sleep(3)")
        assert time.monotonic() - started < 2
        # A deadline shorter than the cap still bounds the statement.
        started = time.monotonic()
        with request_deadline(0.1), pytest.raises(DeadlineExceeded), write_transaction(db):
            db.execute_sql("SELECT pg_sleep(3)")
        assert time.monotonic() - started < 1
    finally:
        db.close()


def test_a_write_runs_as_one_statement_only_where_the_cap_bounds_it(pg_url: str, tmp_path: Path) -> None:
    """A one-statement write skips BEGIN/COMMIT only when nothing else needs the transaction: the
    statement cap ends it before the caller's deadline, and no transaction is open already."""
    db = init_database(make_settings(database_url=pg_url, db_statement_timeout_ms=2000))
    try:
        assert single_statement_write(db)  # no deadline: the cap bounds it
        with request_deadline(30):
            assert single_statement_write(db)  # the cap ends it first
        with request_deadline(1):
            assert not single_statement_write(db)  # needs SET LOCAL: a transaction
        with write_transaction(db):
            assert not single_statement_write(db)
        with request_deadline(-1), pytest.raises(DeadlineExceeded):
            single_statement_write(db)
    finally:
        db.close()
    sqlite = init_database(make_settings(database_url=f"sqlite:///{tmp_path / 'one.db'}"))
    try:
        assert not single_statement_write(sqlite)  # writers take the write lock up front there
    finally:
        sqlite.close()
