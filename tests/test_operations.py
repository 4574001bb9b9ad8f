"""Operations: structured, redacted logs with request ids and an access line; Prometheus metrics over HTTP."""

from __future__ import annotations

import io
import json
import logging
import os
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from support import TEST_JWT_SECRET, FakeClock, make_settings
from support.api import Api, bearer, expect_error, in_days, running_api

from referral_grpc.gen import auth_service_pb2 as auth_pb
from referral_grpc.gen import referral_service_pb2 as ref_pb
from referral_grpc.infra.logs import AccessLog, JsonFormatter, _access_lines, configure_logging, redact
from referral_grpc.infra.metrics import Metrics, MetricsServer, RpcCollector
from referral_grpc.request_context import request_id, trace_id

REGISTER = "/referral.v1.AuthService/Register"


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """configure_logging replaces the root handlers: put pytest's back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    peewee = logging.getLogger("peewee")
    peewee_level = peewee.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    peewee.setLevel(peewee_level)


def call(method: Any, request: Any, rid: str, token: str = "") -> Any:
    metadata = (("x-request-id", rid), *(bearer(token) if token else ()))
    return method(request, metadata=metadata)


# --- logs ---------------------------------------------------------------------------------------


def test_logs_carry_request_ids_and_never_secrets_or_plain_emails(pg_url: str, restore_logging: None) -> None:
    pepper = os.urandom(24).hex()
    settings = make_settings(
        database_url=pg_url, log_level="debug", log_format="json", password_pepper=pepper
    )
    email, typed_email = "alice.wonder@example.com", "Alice.Wonder@Example.com"
    first, second, third = "first correct horse", "second correct horse", "third correct horse"
    with running_api(settings) as api:
        stream = io.StringIO()
        configure_logging(settings, stream)
        # The query log is off by default; turned on, it must still show no secrets.
        query_log = logging.getLogger("peewee")
        query_log.setLevel(logging.DEBUG)

        registered = call(
            api.auth.Register, auth_pb.RegisterRequest(email=typed_email, password=first), "r-reg"
        )
        bad = expect_error(
            call, api.auth.Login, auth_pb.LoginRequest(email=email, password="wrong pw!!"), "r-bad"
        )
        assert bad.code == grpc.StatusCode.UNAUTHENTICATED
        logged_in = call(api.auth.Login, auth_pb.LoginRequest(email=email, password=first), "r-login")
        refreshed = call(
            api.auth.RefreshToken,
            auth_pb.RefreshTokenRequest(refresh_token=logged_in.refresh_token),
            "r-refresh",
        )
        call(api.auth.RequestPasswordReset, auth_pb.RequestPasswordResetRequest(email=email), "r-reset-req")
        query_log.setLevel(logging.INFO)  # the test's own query is not part of any request
        reset_token = api.reset_token_for("Alice.Wonder@example.com")
        query_log.setLevel(logging.DEBUG)
        call(
            api.auth.ResetPassword,
            auth_pb.ResetPasswordRequest(token=reset_token, new_password=second),
            "r-reset",
        )
        relogged = call(api.auth.Login, auth_pb.LoginRequest(email=email, password=second), "r-login2")
        changed = call(
            api.auth.ChangePassword,
            auth_pb.ChangePasswordRequest(current_password=second, new_password=third),
            "r-change",
            relogged.access_token,
        )
        dup = expect_error(
            call, api.auth.Register, auth_pb.RegisterRequest(email=email, password=first), "r-dup"
        )
        assert dup.code == grpc.StatusCode.ALREADY_EXISTS
        forged = expect_error(
            call, api.referrals.ListReferrals, ref_pb.ListReferralsRequest(), "r-forged", "not.a-valid.jwt"
        )
        assert forged.code == grpc.StatusCode.UNAUTHENTICATED
        logging.getLogger().handlers[0].flush()  # access lines are written in batches
        output = stream.getvalue()

    lines = [json.loads(line) for line in output.splitlines()]
    secrets = [
        first,
        second,
        third,
        "wrong pw!!",
        reset_token,
        TEST_JWT_SECRET,
        pepper,
        *(t.access_token for t in (registered, logged_in, refreshed, relogged, changed)),
        *(t.refresh_token for t in (registered, logged_in, refreshed, relogged, changed)),
    ]
    for secret in secrets:
        assert secret not in output
    assert email not in output.lower()
    assert "$2b$" not in output  # bcrypt hashes from the query log
    # The query log really ran and carried the email, masked: redaction, not silence, kept it out.
    sql = [line for line in lines if line["logger"] == "peewee"]
    assert any("INSERT" in line["message"] for line in sql)
    assert "a***@example.com" in output

    sent = {
        "r-reg",
        "r-bad",
        "r-login",
        "r-refresh",
        "r-reset-req",
        "r-reset",
        "r-login2",
        "r-change",
        "r-dup",
    }
    sent.add("r-forged")
    # Every line was logged while serving one of our requests, and says which.
    assert {line["request_id"] for line in lines} == sent
    access = {line["request_id"]: line for line in lines if line["logger"] == "referral_grpc.access"}
    assert set(access) == sent
    assert all(line["level"] == "INFO" for line in access.values())
    assert access["r-reg"]["rpc_method"] == REGISTER
    assert access["r-reg"]["grpc_code"] == "OK"
    assert access["r-bad"]["grpc_code"] == "UNAUTHENTICATED"
    assert access["r-dup"]["grpc_code"] == "ALREADY_EXISTS"
    assert access["r-forged"]["rpc_method"] == "/referral.v1.ReferralService/ListReferrals"
    assert all(line["duration_ms"] > 0 for line in access.values())


def test_request_id_comes_back_on_errors_and_is_made_up_when_missing(database_url: str) -> None:
    with running_api(make_settings(database_url=database_url)) as api:
        with pytest.raises(grpc.RpcError) as failed:
            api.auth.Login.with_call(
                auth_pb.LoginRequest(email="nobody@example.com", password="whatever it is"),
                metadata=(("x-request-id", "err-42"),),
            )
        error: Any = failed.value
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        assert ("x-request-id", "err-42") in tuple(error.initial_metadata())

        _, call_info = api.auth.RequestPasswordReset.with_call(
            auth_pb.RequestPasswordResetRequest(email="nobody@example.com")
        )
        made_up = dict(call_info.initial_metadata())["x-request-id"]
        assert len(made_up) == 32 and made_up != "err-42"


def test_info_level_keeps_the_access_line_and_drops_the_query_log(
    sqlite_url: str, restore_logging: None
) -> None:
    settings = make_settings(database_url=sqlite_url, log_format="text")
    with running_api(settings) as api:
        stream = io.StringIO()
        configure_logging(settings, stream)
        call(
            api.auth.Register,
            auth_pb.RegisterRequest(email="bo@example.com", password="long enough pw"),
            "t-1",
        )
        output = stream.getvalue()
    lines = output.splitlines()
    assert len(lines) == 1, output
    assert "INFO referral_grpc.access [t-1] /referral.v1.AuthService/Register OK" in lines[0]
    assert lines[0].endswith("ms")


@pytest.mark.parametrize("trace", [None, "4bf92f3577b34da6a3ce929d0e0e4736"])
def test_the_quick_access_line_is_the_json_formatters_line(restore_logging: None, trace: str | None) -> None:
    stream = io.StringIO()
    configure_logging(make_settings(log_format="json"), stream)
    method = "/referral.v1.ReferralService/GetReferralCodeByEmail"
    token = request_id.set('a "quoted" \\ id \u00e9')
    traced = trace_id.set(trace)
    try:
        logging.getLogger("referral_grpc.access").info(
            "%s %s %.1fms",
            method,
            "NOT_FOUND",
            1.2345,
            extra={"rpc_method": method, "grpc_code": "NOT_FOUND", "duration_ms": 1.23},
        )
        AccessLog()(method, "NOT_FOUND", 0.0012345, logging.INFO)
        # Quiet RPCs log at DEBUG: below the INFO threshold, nothing is written.
        AccessLog()(method, "OK", 0.001, logging.DEBUG)
    finally:
        trace_id.reset(traced)
        request_id.reset(token)
    logging.getLogger().handlers[0].flush()
    ordinary, quick = (json.loads(line) for line in stream.getvalue().splitlines())
    assert ordinary.pop("time")[:10] == quick.pop("time")[:10]
    assert quick == ordinary
    assert quick["request_id"] == 'a "quoted" \\ id \u00e9'
    assert quick.get("trace_id") == trace


@settings(max_examples=400, deadline=None)
@given(
    at=st.floats(min_value=1e9, max_value=4e9, allow_nan=False, allow_infinity=False)
    | st.integers(min_value=1_000_000_000, max_value=4_000_000_000).map(float),
    seconds=st.floats(min_value=0, max_value=3600, allow_nan=False, allow_infinity=False),
    request=st.text(max_size=40),
    trace=st.none() | st.text(min_size=1, max_size=40),
    code=st.sampled_from(["OK", "NOT_FOUND", "UNAUTHENTICATED"]),
    level=st.sampled_from([logging.INFO, logging.DEBUG, logging.WARNING]),
)
def test_batched_access_lines_are_exactly_the_json_formatters_lines(
    at: float, seconds: float, request: str, trace: str | None, code: str, level: int
) -> None:
    """The flusher formats a batch with its constant parts and time prefix reused; the oracle is
    JsonFormatter itself on the equivalent record, byte for byte, whatever the time's fraction."""
    method = "/referral.v1.ReferralService/GetReferralCodeByEmail"
    ms = seconds * 1000
    record = logging.LogRecord(
        "referral_grpc.access", level, __file__, 0, "%s %s %.1fms", (method, code, ms), None
    )
    record.created = at
    record.request_id = request
    record.trace_id = trace
    record.rpc_method, record.grpc_code, record.duration_ms = method, code, round(ms, 2)
    expected = JsonFormatter().format(record) + "\n"

    batch = [(at, level, method, code, seconds, request, trace)]
    assert _access_lines(batch) == expected
    assert _access_lines(batch * 3) == expected * 3


def test_access_lines_are_batched_in_order_and_never_held_long(restore_logging: None) -> None:
    stream = io.StringIO()
    configure_logging(make_settings(log_format="json"), stream)
    handler = logging.getLogger().handlers[0]
    method = "/referral.v1.ReferralService/GetReferralCodeByEmail"
    access = AccessLog()

    access(method, "OK", 0.001)
    access(method, "NOT_FOUND", 0.001)
    held = stream.getvalue()
    logging.getLogger("referral_grpc.test").warning("an ordinary record")
    ordered = [json.loads(line)["message"] for line in stream.getvalue().splitlines()]

    access(method, "OK", 0.002)
    deadline = time.monotonic() + 2
    while stream.getvalue().count("\n") < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    unflushed_lines = stream.getvalue().count("\n")

    for _ in range(type(handler).MAX_PENDING):  # type: ignore[attr-defined]
        access(method, "OK", 0.001)
    full_batch_lines = stream.getvalue().count("\n")

    assert held == ""  # queued, not yet written
    assert ordered == [f"{method} OK 1.0ms", f"{method} NOT_FOUND 1.0ms", "an ordinary record"]
    assert unflushed_lines == 4  # the flusher wrote the third line without any other record
    assert full_batch_lines == 4 + type(handler).MAX_PENDING  # type: ignore[attr-defined]


def test_access_lines_from_many_threads_are_all_written_once_without_a_flush(
    restore_logging: None,
) -> None:
    """RPC threads queue access lines without the handler's lock: none may be lost or doubled, and
    the flusher alone (no other record, no flush) writes them all."""
    stream = io.StringIO()
    configure_logging(make_settings(log_format="json"), stream)
    access = AccessLog()
    threads, per_thread = 8, 1500

    def log_lines(thread: int) -> None:
        for n in range(per_thread):
            token = request_id.set(f"t{thread}-{n}")
            try:
                access("/referral.v1.ReferralService/GetReferralCodeByEmail", "OK", 0.001)
            finally:
                request_id.reset(token)
            if n % 100 == 0:
                time.sleep(0.001)  # let the flusher interleave with the writers

    workers = [threading.Thread(target=log_lines, args=(t,)) for t in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    deadline = time.monotonic() + 5
    while stream.getvalue().count("\n") < threads * per_thread and time.monotonic() < deadline:
        time.sleep(0.01)
    ids = [json.loads(line)["request_id"] for line in stream.getvalue().splitlines()]

    assert sorted(ids) == sorted(f"t{t}-{n}" for t in range(threads) for n in range(per_thread))
    # Each thread's own lines keep their order.
    for t in range(threads):
        mine = [int(i.split("-")[1]) for i in ids if i.startswith(f"t{t}-")]
        assert mine == sorted(mine)


def test_rpc_metrics_observed_from_many_threads_are_all_counted() -> None:
    """Observations are queued without a lock and applied in batches: every one is counted, whether
    applied by a read of the registry or by the RPC that filled the queue."""
    metrics = Metrics()
    threads, per_thread = 8, 1200
    assert threads * per_thread > 2 * RpcCollector.MAX_QUEUED  # the RPCs apply some batches themselves

    def observe(thread: int) -> None:
        for n in range(per_thread):
            code = "OK" if n % 4 else "NOT_FOUND"
            metrics.rpc.observe(f"/test.v1.Service/M{thread % 2}", code, 0.0007 if n % 2 else 0.3)

    workers = [threading.Thread(target=observe, args=(t,)) for t in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()

    def value(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(name, labels)

    for method in ("/test.v1.Service/M0", "/test.v1.Service/M1"):
        per_method = threads // 2 * per_thread
        assert value("referral_rpc_requests_total", method=method, code="OK") == per_method * 3 / 4
        assert value("referral_rpc_requests_total", method=method, code="NOT_FOUND") == per_method / 4
        assert value("referral_rpc_duration_seconds_count", method=method) == per_method
        assert value("referral_rpc_duration_seconds_bucket", method=method, le="0.001") == per_method / 2
    # Read again: nothing is counted twice.
    assert (
        value("referral_rpc_duration_seconds_count", method="/test.v1.Service/M0")
        == threads // 2 * per_thread
    )


def test_tracebacks_are_redacted_too(restore_logging: None) -> None:
    stream = io.StringIO()
    configure_logging(make_settings(log_format="json"), stream)
    log = logging.getLogger("referral_grpc.test")
    try:
        raise RuntimeError("connect failed for postgresql://app:hunter2pw@db/referral as eve@example.org")
    except RuntimeError:
        log.exception("could not connect with password=%s", "s3cr3t-value")
    entry = json.loads(stream.getvalue())
    text = json.dumps(entry)
    for secret in ("hunter2pw", "s3cr3t-value", "eve@example.org"):
        assert secret not in text
    assert "postgresql://app:[redacted]@db/referral" in entry["exception"]
    assert "e***@example.org" in entry["exception"]
    assert entry["message"] == "could not connect with password=[redacted]"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Authorization: Bearer abc.DEF-123_x", "Authorization: Bearer [redacted]"),
        ("token Bearer abc.DEF-123_x sent", "token Bearer [redacted] sent"),
        ("jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl end", "jwt [redacted] end"),
        ("dsn host=db password=pa55 user=app", "dsn host=db password=[redacted] user=app"),
        ("postgresql://app:pa55@db:5432/x", "postgresql://app:[redacted]@db:5432/x"),
        ("redis://:pa55@cache:6379/0", "redis://:[redacted]@cache:6379/0"),
        (
            "GET /v2/email-verifier?email=bob%40example.com&api_key=K3Y",
            "GET /v2/email-verifier?email=b***%40example.com&api_key=[redacted]",
        ),
        (
            'payload {"token": "RAW-TOKEN", "expires_minutes": 30}',
            'payload {"token": [redacted], "expires_minutes": 30}',
        ),
        ("hash $2b$12$" + "a" * 53 + " stored", "hash [redacted] stored"),
        ("Mail to Carol.Smith+x@Mail.Example.co.uk", "Mail to C***@Mail.Example.co.uk"),
        ("PASSWORD_PEPPER is required in production", "PASSWORD_PEPPER is required in production"),
    ],
)
def test_redaction_patterns(raw: str, expected: str) -> None:
    assert redact(raw) == expected


# --- metrics ------------------------------------------------------------------------------------


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_endpoint_reports_rpcs_latency_cache_and_outbox(database_url: str) -> None:
    clock = FakeClock()
    with running_api(make_settings(database_url=database_url), clock=clock) as api:
        metrics_http = MetricsServer(api.server.metrics.registry, "127.0.0.1", 0)
        try:
            _run_metered_rpcs(api, clock)
            clock.advance(seconds=90)
            samples = scrape(metrics_http.port)
        finally:
            metrics_http.close()

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    assert value("referral_rpc_requests_total", method=REGISTER, code="OK") == 2
    assert value("referral_rpc_requests_total", method=REGISTER, code="ALREADY_EXISTS") == 1
    lookup = "/referral.v1.ReferralService/GetReferralCodeByEmail"
    assert value("referral_rpc_requests_total", method=lookup, code="OK") == 2
    assert value("referral_rpc_requests_total", method=lookup, code="NOT_FOUND") == 1
    assert value("referral_rpc_duration_seconds_count", method=REGISTER) == 3
    assert value("referral_rpc_duration_seconds_bucket", method=REGISTER, le="+Inf") == 3
    assert 0 < value("referral_rpc_duration_seconds_sum", method=REGISTER) < 30
    # Sub-millisecond buckets, which the default histogram lacks, for the cheap lookups.
    assert ("referral_rpc_duration_seconds_bucket", (("le", "0.0005"), ("method", lookup))) in samples
    # Lookups of owner's email: a miss that fills the cache, then a hit; the unknown email misses.
    assert value("referral_cache_hits_total") == 1
    assert value("referral_cache_misses_total") == 2
    assert value("referral_cache_hit_ratio") == pytest.approx(1 / 3)
    # Two registrations' emails wait, a welcome and a verification email each (NoDispatch sends nothing),
    # all written 90 s before the scrape.
    assert value("referral_email_outbox_pending") == 4
    assert value("referral_email_outbox_lag_seconds") == pytest.approx(90)
    assert value("referral_database_up") == 1


def _run_metered_rpcs(api: Api, clock: FakeClock) -> None:
    owner = api.register("owner@example.com")
    api.register("friend@example.com")
    expect_error(api.register, "owner@example.com")
    api.referrals.CreateReferralCode(
        ref_pb.CreateReferralCodeRequest(expires_at=in_days(clock, 5)), metadata=bearer(owner.access_token)
    )
    for email in ("owner@example.com", "owner@example.com", "stranger@example.com"):
        try:
            api.referrals.GetReferralCodeByEmail(ref_pb.GetReferralCodeByEmailRequest(email=email))
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
