"""Faults: pool exhaustion, overload, oversized messages, deadlines, database outages, graceful shutdown."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import psycopg2
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support import PG_ADMIN_URL, TEST_JWT_SECRET, make_settings
from support.api import Api, bearer, expect_error, running_api, ts

from referral_grpc.devstack.processes import Child, start_server
from referral_grpc.domain.ports import SystemClock
from referral_grpc.gen import auth_service_pb2 as auth_pb
from referral_grpc.gen import auth_service_pb2_grpc, referral_service_pb2_grpc
from referral_grpc.gen import referral_service_pb2 as ref_pb
from referral_grpc.infra.tasks import create_tasks
from referral_grpc.request_context import DeadlineExceeded, request_deadline
from referral_grpc.store.database import init_database, write_transaction
from referral_grpc.store.migrate import run_migrations
from referral_grpc.store.models import EmailOutbox, User

PASSWORD = "correct horse battery"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
LOOKUP = "/referral.v1.ReferralService/GetReferralCodeByEmail"
REGISTER = "/referral.v1.AuthService/Register"


def health_status(channel: grpc.Channel) -> int:
    response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
    return int(response.status)


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll until `condition()`; return how long it took."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not {what} within {timeout} s")
        time.sleep(0.05)
    return time.monotonic() - started


def lookup(api: Api, email: str, timeout: float = 10) -> Any:
    return api.referrals.GetReferralCodeByEmail(
        ref_pb.GetReferralCodeByEmailRequest(email=email), timeout=timeout
    )


def timed(call: Callable[[], Any]) -> tuple[grpc.StatusCode, float]:
    started = time.monotonic()
    try:
        call()
        code = grpc.StatusCode.OK
    except grpc.RpcError as err:
        code = err.code()  # type: ignore[attr-defined]
    return code, time.monotonic() - started


def handled(api: Api, method: str) -> dict[str, float]:
    """The server's own count of finished RPCs of `method`, by status code (from its metrics)."""
    counts: dict[str, float] = {}
    for metric in api.server.metrics.registry.collect():
        for sample in metric.samples:
            if sample.name == "referral_rpc_requests_total" and sample.labels["method"] == method:
                counts[sample.labels["code"]] = sample.value
    return counts


# --- overload ------------------------------------------------------------------------------------


def test_pool_exhaustion_waits_a_bounded_time_then_fails_with_unavailable(pg_url: str) -> None:
    settings = make_settings(database_url=pg_url, db_pool_size=1, db_pool_timeout=0.5)
    with running_api(settings) as api:
        api.register("pool@example.com")
        api.app.db.close()
        # The test thread takes the pool's only connection and keeps it.
        api.app.db.connect()
        try:
            code, elapsed = timed(lambda: lookup(api, "pool@example.com"))
            assert code == grpc.StatusCode.UNAVAILABLE
            assert 0.4 < elapsed < 2.5, elapsed  # waited DB_POOL_TIMEOUT, not forever
            err = expect_error(lookup, api, "pool@example.com")
            assert err.reason == "DATABASE_BUSY"
            assert err.message == "the service is overloaded; retry shortly"
            # A busy pool is not a sick database: the health probe has its own connection.
            assert health_status(api.channel) == SERVING
        finally:
            api.app.db.close()
        assert timed(lambda: lookup(api, "nobody@example.com"))[0] == grpc.StatusCode.NOT_FOUND  # answered


def test_concurrency_cap_sheds_extra_rpcs_at_once_with_a_reason_and_counts_them(pg_url: str) -> None:
    settings = make_settings(
        database_url=pg_url,
        db_pool_size=1,
        db_pool_timeout=10,
        grpc_max_concurrent_rpcs=2,
        grpc_max_workers=4,
    )
    with running_api(settings) as api:
        admission = api.server.admission
        assert admission is not None
        api.app.db.close()
        api.app.db.connect()  # the two admitted RPCs wait for the pool until we let go
        try:
            waiting = [
                api.referrals.GetReferralCodeByEmail.future(
                    ref_pb.GetReferralCodeByEmailRequest(email="nobody@example.com"), timeout=20
                )
                for _ in range(2)
            ]
            wait_for(lambda: admission.in_flight.count == 2, 10, "both calls in flight")
            assert not any(future.done() for future in waiting)
            started = time.monotonic()
            error = expect_error(lookup, api, "nobody@example.com")
            assert time.monotonic() - started < 1.0  # shed at once, not queued behind the blocked ones
            assert (error.code, error.reason, error.retry_delay) == (
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "SERVER_OVERLOADED",
                1.0,
            )
            assert handled(api, LOOKUP).get("RESOURCE_EXHAUSTED") == 1
        finally:
            api.app.db.close()
        for future in waiting:
            with pytest.raises(grpc.RpcError) as answered:
                future.result(timeout=15)
            assert answered.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
        # The admitted calls finished: the server takes calls again.
        wait_for(lambda: admission.in_flight.count == 0, 10, "the calls to finish")
        assert timed(lambda: lookup(api, "nobody@example.com"))[0] == grpc.StatusCode.NOT_FOUND


def test_oversized_request_is_rejected_with_resource_exhausted(sqlite_url: str) -> None:
    with running_api(make_settings(database_url=sqlite_url, grpc_max_message_bytes=1024)) as api:
        err = expect_error(api.register, "big@example.com", "p" * 2000)
        assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert User.select().count() == 0
        assert api.register("small@example.com").user_id  # a normal request still fits


# --- deadlines -----------------------------------------------------------------------------------


def test_deadline_shorter_than_bcrypt_commits_nothing(database_url: str) -> None:
    # Cost 14 is about a second per hash here: far longer than the client waits.
    with running_api(make_settings(database_url=database_url, bcrypt_rounds=14)) as api:
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            api.auth.Register(
                auth_pb.RegisterRequest(email="late@example.com", password=PASSWORD), timeout=0.3
            )
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
        assert time.monotonic() - started < 1.0
        # The server keeps hashing after the client gave up; wait until it has finished the RPC.
        wait_for(lambda: bool(handled(api, REGISTER)), 30, "finished on the server")
        assert handled(api, REGISTER) == {"DEADLINE_EXCEEDED": 1}
        assert User.select().count() == 0
        assert EmailOutbox.select().count() == 0


def test_a_deadline_with_time_to_spare_commits(database_url: str) -> None:
    with running_api(make_settings(database_url=database_url)) as api:
        tokens = api.auth.Register(
            auth_pb.RegisterRequest(email="ok@example.com", password=PASSWORD), timeout=10
        )
        assert User.get_by_id(tokens.user_id).email == "ok@example.com"


def _user(email: str) -> User:
    return User.create(email=email, email_key=email, password_hash="x", created_at=datetime.now(UTC))


def test_a_transaction_still_open_at_the_deadline_rolls_back(database_url: str) -> None:
    db = init_database(make_settings(database_url=database_url))
    try:
        run_migrations(db)
        with request_deadline(0.2), pytest.raises(DeadlineExceeded), write_transaction(db):
            _user("slow@example.com")
            time.sleep(0.3)
        assert User.select().count() == 0
        with request_deadline(5), write_transaction(db):
            _user("quick@example.com")
        assert User.select().count() == 1
    finally:
        db.close()


def test_a_statement_running_past_the_deadline_is_cancelled(pg_url: str) -> None:
    db = init_database(make_settings(database_url=pg_url))
    try:
        run_migrations(db)
        started = time.monotonic()
        with request_deadline(0.3), pytest.raises(DeadlineExceeded), write_transaction(db):
            _user("blocked@example.com")
            db.execute_sql("SELECT pg_sleep(5)")
        assert time.monotonic() - started < 1.5
        assert User.select().count() == 0
        # The limit was SET LOCAL: the next transaction on the same pooled connection has none.
        with write_transaction(db):
            db.execute_sql("SELECT pg_sleep(0.5)")
    finally:
        db.close()


# --- the database goes away ----------------------------------------------------------------------


def _admin(sql: str) -> None:
    conn = psycopg2.connect(PG_ADMIN_URL)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(sql)
    conn.close()


def _backend(pid: int) -> tuple[str, str] | None:
    """(state, last statement) of a PostgreSQL backend, None once it is gone."""
    conn = psycopg2.connect(PG_ADMIN_URL)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT state, query FROM pg_stat_activity WHERE pid = %s", (pid,))
            row = cur.fetchone()
    finally:
        conn.close()
    return None if row is None else (row[0], row[1])


def test_a_pooled_connection_is_checked_out_without_a_round_trip_and_a_dead_one_is_replaced(
    pg_url: str,
) -> None:
    db = init_database(make_settings(database_url=pg_url))
    try:
        pid = db.execute_sql("SELECT pg_backend_pid()").fetchone()[0]
        db.close()
        for _ in range(3):
            db.connect()
            db.close()
        # The same connection came back three times and sent nothing (peewee's check sent SELECT 1).
        assert _backend(pid) == ("idle", "SELECT pg_backend_pid()")
        # What a restart or a dropped database does to an idle pooled connection: the server ends it.
        _admin(f"SELECT pg_terminate_backend({pid})")
        wait_for(lambda: _backend(pid) is None, 5, "the backend gone")
        db.connect()
        assert db.execute_sql("SELECT pg_backend_pid()").fetchone()[0] != pid
    finally:
        db.close()
        db.close_all()


def test_health_follows_the_database_and_rpcs_fail_fast_while_it_is_gone(pg_url: str) -> None:
    name = pg_url.rsplit("/", 1)[1]
    settings = make_settings(database_url=pg_url, health_probe_interval=0.2, health_probe_timeout=0.5)
    with running_api(settings) as api:
        api.register("gone@example.com")
        assert health_status(api.channel) == SERVING
        _admin(f'DROP DATABASE "{name}" WITH (FORCE)')
        try:
            wait_for(lambda: health_status(api.channel) == NOT_SERVING, 3, "NOT_SERVING")
            for _ in range(3):
                code, elapsed = timed(lambda: lookup(api, "gone@example.com"))
                assert code == grpc.StatusCode.UNAVAILABLE
                assert elapsed < 3
        finally:
            _admin(f'CREATE DATABASE "{name}"')
        run_migrations(api.app.db)
        api.app.db.close()
        wait_for(lambda: health_status(api.channel) == SERVING, 3, "SERVING again")
        assert api.register("back@example.com").user_id


def _pg_cluster(action: str) -> None:
    version = sorted(os.listdir("/etc/postgresql"))[-1]
    subprocess.run(
        [
            "pg_ctlcluster",
            "--skip-systemctl-redirect",
            version,
            "main",
            action,
            *(["-m", "fast"] * (action == "stop")),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )


@dataclass
class Outcome:
    code: grpc.StatusCode
    seconds: float


@contextmanager
def steady_load(
    call: Callable[[], Any], threads: int = 2, pause: float = 0.02
) -> Iterator[tuple[list[Outcome], threading.Event]]:
    """Calls `call` in a loop on `threads` threads, `pause` s apart on each; clear the event to pause them."""
    outcomes: list[Outcome] = []
    running, stop = threading.Event(), threading.Event()
    running.set()

    def loop() -> None:
        while not stop.is_set():
            if not running.wait(0.05):
                continue
            code, seconds = timed(call)
            outcomes.append(Outcome(code, seconds))
            time.sleep(pause)

    with ThreadPoolExecutor(threads) as pool:
        workers = [pool.submit(loop) for _ in range(threads)]
        try:
            yield outcomes, running
        finally:
            stop.set()
            for worker in workers:
                worker.result(timeout=30)


@pytest.mark.slow
def test_postgres_restart_under_load(pg_url: str) -> None:
    settings = make_settings(
        database_url=pg_url,
        health_probe_interval=0.2,
        health_probe_timeout=0.5,
        db_pool_timeout=1,
        # Logins that fail for want of a database still count against the account.
        login_max_failures=1000,
    )
    with running_api(settings) as api:
        api.register("steady@example.com")

        def login() -> Any:
            return api.auth.Login(
                auth_pb.LoginRequest(email="steady@example.com", password=PASSWORD), timeout=20
            )

        with steady_load(login) as (outcomes, running):
            time.sleep(0.5)
            assert outcomes and all(o.code == grpc.StatusCode.OK for o in outcomes)
            _pg_cluster("stop")
            try:
                wait_for(lambda: health_status(api.channel) == NOT_SERVING, 5, "NOT_SERVING")
                time.sleep(1.0)  # an outage under load
            finally:
                running.clear()
                time.sleep(0.3)  # let in-flight calls finish, so the next call is the first after recovery
                _pg_cluster("start")
            during = len(outcomes)
            assert login().user_id  # the first RPC after recovery
            running.set()
            wait_for(lambda: health_status(api.channel) == SERVING, 5, "SERVING again")
            time.sleep(0.5)
        codes = {o.code for o in outcomes}
        assert codes == {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}
        assert max(o.seconds for o in outcomes) < 3.0  # failed fast, never hung
        assert all(o.code == grpc.StatusCode.OK for o in outcomes[during:])


# --- graceful shutdown of the real process -------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serve_env(tmp_path: Path, **values: str) -> dict[str, str]:
    env = {
        "PATH": os.environ.get("PATH", ""),
        "DATABASE_URL": f"sqlite:///{tmp_path / 'referral.db'}",
        "HUEY_SQLITE_PATH": str(tmp_path / "huey.db"),
        "JWT_SECRET": TEST_JWT_SECRET,
        "GRPC_HOST": "127.0.0.1",
        "GRPC_PORT": "0",
        "BCRYPT_ROUNDS": "4",
        "LOG_FORMAT": "json",
    }
    env.update(values)
    subprocess.run(
        [sys.executable, "-m", "referral_grpc", "migrate"],
        env=env,
        cwd=tmp_path,
        check=True,
        capture_output=True,
    )
    return env


@pytest.mark.slow
def test_sigterm_drains_then_finishes_in_flight_rpcs_and_exits_0(tmp_path: Path) -> None:
    metrics_port = free_port()
    env = serve_env(
        tmp_path,
        BCRYPT_ROUNDS="15",  # about 2 s a hash: an in-flight Register outlives the drain delay
        SHUTDOWN_DRAIN_SECONDS="0.8",
        GRPC_GRACE_SECONDS="20",
        METRICS_PORT=str(metrics_port),
    )
    log_path = tmp_path / "server.log"
    with log_path.open("w") as output:
        child, (host, port) = start_server(env, output=output)
        try:
            _drain_scenario(child, f"{host}:{port}", metrics_port)
        finally:
            child.stop(signal.SIGKILL, timeout=5)
    lines = [json.loads(line.split("| ", 1)[1]) for line in log_path.read_text().splitlines()]
    messages = [line["message"] for line in lines]
    assert "received SIGTERM: draining" in messages
    assert messages[-1] == "stopped"
    # The Register was still running when the listener closed, and finished within the grace period.
    finished = next(i for i, line in enumerate(lines) if line.get("request_id") == "in-flight")
    assert messages.index("stopping: in-flight RPCs have 20 s") < finished
    access = [line for line in lines if line["logger"] == "referral_grpc.access"]
    assert {(line["request_id"], line["grpc_code"]) for line in access} >= {
        ("in-flight", "OK"),
        ("draining", "NOT_FOUND"),
    }


def test_a_stopping_server_hands_its_last_rpcs_emails_to_the_queue_before_it_exits(tmp_path: Path) -> None:
    """The email hand-off gathers ids for a moment before it enqueues them: the emails of an RPC that
    finishes as the server stops must still reach the queue, not wait half a minute for the relay."""
    env = serve_env(tmp_path, BCRYPT_ROUNDS="13", SHUTDOWN_DRAIN_SECONDS="0", GRPC_GRACE_SECONDS="20")
    with (tmp_path / "server.log").open("w") as output:
        child, (host, port) = start_server(env, output=output)
        try:
            with grpc.insecure_channel(f"{host}:{port}") as channel:
                auth = auth_service_pb2_grpc.AuthServiceStub(channel)
                in_flight = auth.Register.future(
                    auth_pb.RegisterRequest(email="last@example.com", password=PASSWORD), timeout=30
                )
                time.sleep(0.1)  # it is hashing on the server now
                child.send(signal.SIGTERM)
                assert in_flight.result().access_token
                assert child.wait(timeout=30) == 0
        finally:
            child.stop(signal.SIGKILL, timeout=5)
    queue = create_tasks(make_settings(huey_sqlite_path=tmp_path / "huey.db"), SystemClock()).huey
    tasks = []
    while (task := queue.dequeue()) is not None:
        tasks.append(task)
    init_database(make_settings(database_url=env["DATABASE_URL"]))
    ids = sorted(row.id for row in EmailOutbox.select(EmailOutbox.id))
    assert ids, "the Register queued its emails"
    assert sorted(i for task in tasks for i in task.args[0]) == ids


def test_the_serving_process_keeps_what_it_built_at_start_out_of_the_cyclic_collector(tmp_path: Path) -> None:
    """Every full collection walked all the modules, descriptors and models built at start (~65k objects,
    ~25 ms with the GIL held, twice in 10 s of cached lookups): the serving process freezes them once built
    (gc.freeze), so collections under load walk only what requests leave behind. Read from inside the real
    process at its exit by a sitecustomize hook."""
    probe, report = tmp_path / "probe", tmp_path / "gc.txt"
    probe.mkdir()
    (probe / "sitecustomize.py").write_text(
        "import atexit, gc\n"
        f"atexit.register(lambda: open({str(report)!r}, 'w').write("
        "f'{gc.get_freeze_count()} {len(gc.get_objects())}'))\n"
    )
    env = serve_env(tmp_path, PYTHONPATH=str(probe))
    with (tmp_path / "server.log").open("w") as output:
        child, (host, port) = start_server(env, output=output)
        try:
            with grpc.insecure_channel(f"{host}:{port}") as channel:
                assert health_status(channel) == SERVING
        finally:
            assert child.stop(timeout=15) == 0
    frozen, collectable = map(int, report.read_text().split())
    assert frozen > 10_000
    assert collectable < frozen / 4


def _drain_scenario(child: Child, address: str, metrics_port: int) -> None:
    with grpc.insecure_channel(address) as channel:
        auth = auth_service_pb2_grpc.AuthServiceStub(channel)
        referrals = referral_service_pb2_grpc.ReferralServiceStub(channel)
        assert health_status(channel) == SERVING
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
            assert b"referral_rpc_duration_seconds" in response.read()

        in_flight = auth.Register.future(
            auth_pb.RegisterRequest(email="inflight@example.com", password=PASSWORD),
            metadata=(("x-request-id", "in-flight"),),
            timeout=30,
        )
        time.sleep(0.2)  # it is hashing on the server now
        signalled = time.monotonic()
        child.send(signal.SIGTERM)
        took = wait_for(lambda: health_status(channel) == NOT_SERVING, 2, "NOT_SERVING after SIGTERM")
        assert took < 0.5
        # Still serving during the drain delay, for whoever has not noticed the health change yet.
        with pytest.raises(grpc.RpcError) as answered:
            referrals.GetReferralCodeByEmail(
                ref_pb.GetReferralCodeByEmailRequest(email="nobody@example.com"),
                metadata=(("x-request-id", "draining"),),
                timeout=5,
            )
        assert answered.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
        assert in_flight.result(timeout=30).user_id  # finished within the grace period
        assert child.wait(timeout=25) == 0
        assert time.monotonic() - signalled < 20


@pytest.mark.slow
def test_no_request_fails_through_envoy_while_a_server_is_replaced(tmp_path: Path) -> None:
    from support.envoy import running_envoy

    # Both processes bind the same port (SO_REUSEPORT): Envoy sees one endpoint throughout.
    env = serve_env(
        tmp_path,
        GRPC_PORT=str(free_port()),
        GRPC_REUSE_PORT="true",
        SHUTDOWN_DRAIN_SECONDS="1",
        GRPC_GRACE_SECONDS="10",
    )
    with (tmp_path / "servers.log").open("w") as output:
        old, address = start_server(env, name="old", output=output)
        new: Child | None = None
        try:
            with (
                running_envoy([address], tmp_path) as envoy,
                grpc.insecure_channel(f"127.0.0.1:{envoy.port}") as channel,
            ):
                auth = auth_service_pb2_grpc.AuthServiceStub(channel)
                referrals = referral_service_pb2_grpc.ReferralServiceStub(channel)
                owner = auth.Register(auth_pb.RegisterRequest(email="owner@example.com", password=PASSWORD))
                expires = ts(datetime.now(UTC) + timedelta(days=5))
                referrals.CreateReferralCode(
                    ref_pb.CreateReferralCodeRequest(expires_at=expires), metadata=bearer(owner.access_token)
                )
                request = ref_pb.GetReferralCodeByEmailRequest(email="owner@example.com")
                # Eight callers, back to back: calls are always arriving when the old process's stop
                # begins, and grpc cancels those it had not started (the gateway retries reads).
                load = steady_load(
                    lambda: referrals.GetReferralCodeByEmail(request, timeout=10), threads=8, pause=0
                )
                with load as (outcomes, _):
                    time.sleep(0.5)
                    new, _ = start_server(env, name="new", output=output)
                    before = len(outcomes)
                    old.send(signal.SIGTERM)
                    assert old.wait(timeout=20) == 0
                    time.sleep(1.0)  # traffic now reaches only the new process
                    during = len(outcomes) - before
        finally:
            old.stop(signal.SIGKILL, timeout=5)
            if new is not None:
                new.stop(timeout=15)
    failed = [o for o in outcomes if o.code != grpc.StatusCode.OK]
    assert not failed, failed
    assert during > 20  # the load really ran across the handover


def test_a_login_flood_does_not_take_the_threads_cheap_rpcs_need(sqlite_url: str) -> None:
    """Password hashing runs on its own pool: with ONE main thread, lookups still answer at once
    while logins keep every hashing slot busy."""
    settings = make_settings(
        database_url=sqlite_url, grpc_max_workers=1, bcrypt_rounds=12, password_hash_concurrency=1
    )
    with running_api(settings) as api:
        api.register("flood@example.com", "correct horse battery")
        login = auth_pb.LoginRequest(email="flood@example.com", password="correct horse battery")
        with ThreadPoolExecutor(4) as pool:
            logins = [pool.submit(api.auth.Login, login, timeout=30) for _ in range(4)]
            time.sleep(0.1)  # the logins are in: one hashing, three queued for the hashing slot
            assert not any(f.done() for f in logins)
            lookups = [timed(lambda: lookup(api, "nobody@example.com")) for _ in range(5)]
            assert not all(f.done() for f in logins)  # the flood was still going during the lookups
            assert all(f.result().access_token for f in logins)
    assert {code for code, _ in lookups} == {grpc.StatusCode.NOT_FOUND}
    # One bcrypt at cost 12 takes ~0.3 s; behind four of them a lookup would wait over a second.
    assert max(elapsed for _, elapsed in lookups) < 0.25
